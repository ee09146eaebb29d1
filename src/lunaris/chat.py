"""`lunaris chat`: talk to a fine-tuned model in the terminal, or script it through stdin.

The conversation is rendered with the model's chat template (lunaris.data.chat_template, the one its training data
was rendered with), the reply is sampled as `lunaris generate` samples (the same flags; the model's own decoding
loop) and streamed as it is produced, until the model writes its end token.

- **History.** Every turn stays in the prompt while it fits the model's context (max_seq_len) with room for a reply
  (`--max-new-tokens`, at most half the context); when it does not, the oldest turns are dropped, with a note on
  stderr. The system message (`--system`, or `/system TEXT`) is always kept.
- **Commands**, typed as a message: `/reset` forgets the turns so far, `/system TEXT` sets the system message
  (`/system` alone removes it), `/quit` ends (as does end of input, Ctrl-D).
- **Input.** One message per line; a line ending with a backslash continues on the next (the backslash becomes a
  newline), so a message can span lines; blank lines are skipped. In a terminal each message is typed at a prompt;
  from a pipe or a file (stdin not a terminal) the same lines are read without prompts, and each reply is printed
  on stdout followed by a newline, notes on stderr: `printf 'Hello\\n' | lunaris chat --checkpoint RUN` scripts it.
"""

import sys
import time
import warnings

import torch

from lunaris.data.chat_template import load_template
from lunaris.data.tokenizer import StreamingDecoder, find_tokenizer, load_tokenizer
from lunaris.generate import load_model
from lunaris.model.sampling import check_sampling_args

COMMANDS = "/reset, /system TEXT, /quit"


class ChatSession:
    """A conversation with a model: its turns, and the reply to each new message, streamed to `out`."""

    def __init__(self, model, template, system: str = None, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int = None, top_p: float = None, seed: int = None, compile=None, out=None, err=None):
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        self.model, self.template = model, template
        self.system, self.turns = system or None, []      # turns: [(user, assistant)]
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens, self.compile = max_new_tokens, compile
        self.out, self.err = out or sys.stdout, err or sys.stderr
        device = model.wte.weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def messages(self, user: str, turns: list) -> list:
        system = [{"role": "system", "content": self.system}] if self.system else []
        history = [{"role": role, "content": text} for pair in turns for role, text in zip(("user", "assistant"), pair)]
        return system + history + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> list:
        """Prompt ids for a new message: the oldest turns dropped (for good, with a note) until it fits the context
        with room for a reply; None when the message alone does not fit."""
        limit = self.model.config.max_seq_len
        reserve = min(self.max_new_tokens, limit // 2)
        dropped = 0
        ids = self.template.prompt(self.messages(user, self.turns))
        while len(ids) + reserve > limit and dropped < len(self.turns):
            dropped += 1
            ids = self.template.prompt(self.messages(user, self.turns[dropped:]))
        if dropped:
            self.turns = self.turns[dropped:]
            self.err.write(f"[dropped the {dropped} oldest turn(s) to fit the model's context of {limit} tokens]\n")
        if len(ids) >= limit:
            self.err.write(f"[the message is {len(ids)} tokens with the conversation's start, and the model reads "
                           f"{limit}; shorten it, or /reset]\n")
            return None
        return ids

    def reply(self, user: str) -> str:
        """Stream the model's reply to `user` to `out`; returns it (None when the message did not fit)."""
        ids = self.prompt(user)
        if ids is None:
            return None
        tokenizer, stops = self.template.tokenizer, set(self.template.stop_ids)
        decoder, pieces, n_new = StreamingDecoder(tokenizer, ids), [], 0
        idx = torch.tensor([ids], dtype=torch.long, device=self.model.wte.weight.device)
        start, finished = time.perf_counter(), False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for token in self.model.generate_stream(idx, self.max_new_tokens, eos_token_id=self.template.end_id,
                                                    generator=self.generator, compile=self.compile, **self.sampling):
                n_new += 1
                if token.item() in stops:
                    finished = True
                    break
                pieces.append(decoder.push(token.item()))
                self.out.write(pieces[-1])
                self.out.flush()
        pieces.append(decoder.flush())
        self.out.write(pieces[-1] + "\n")
        self.out.flush()
        for warning in caught:
            self.err.write(f"note: {warning.message}\n")
        if not finished:
            self.err.write(f"[the reply was cut after {n_new} tokens (--max-new-tokens or the context's end)]\n")
        elapsed = time.perf_counter() - start
        self.err.write(f"[{n_new} tokens in {elapsed:.2f} s]\n")
        text = "".join(pieces)
        self.turns.append((user, text))
        return text

    def command(self, line: str):
        """Run `line` if it is a command: "quit" for /quit, "done" for the others, None when it is a message."""
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            return "quit"
        if command == "/reset":
            self.turns = []
            self.err.write("[conversation reset]\n")
        elif command == "/system":
            self.system = rest.strip() or None
            self.err.write(f"[system message {'set' if self.system else 'removed'}]\n")
        else:
            return None
        return "done"


def _lines(stream, prompt: str = None):
    """Lines of `stream` without their newline; with `prompt` (a terminal), read by input() at that prompt
    ("... " inside a continued message)."""
    continued = False
    while True:
        if prompt is None:
            line = stream.readline()
            if not line:
                return
        else:
            try:
                line = input("... " if continued else prompt)
            except EOFError:
                return
        line = line.rstrip("\r\n")
        continued = line.endswith("\\")
        yield line


def read_messages(stream, prompt: str = None):
    """Messages from `stream`, one per line, a trailing backslash continuing one on the next line; blank lines
    skipped. With `prompt` (a terminal), each line is read by input() at that prompt."""
    parts = []
    for line in _lines(stream, prompt):
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        message, parts = "\n".join(parts + [line]), []
        if message.strip():
            yield message
    if "\n".join(parts).strip():
        yield "\n".join(parts)


def run_chat(checkpoint, system: str = None, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = None,
             top_p: float = None, seed: int = None, tokenizer_path=None, device: str = "auto", dtype: str = "auto",
             threads: int = None, compile=None, stdin=None, out=None, err=None) -> list:
    """The chat loop over `stdin` (default sys.stdin; prompts when it is a terminal); returns the replies."""
    stdin, err = stdin or sys.stdin, err or sys.stderr
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    model = load_model(checkpoint, device, dtype, threads)
    path = find_tokenizer(checkpoint, tokenizer_path)
    template = load_template(load_tokenizer(path, model.config.vocab_size), path)
    session = ChatSession(model, template, system, max_new_tokens, temperature, top_k, top_p, seed, compile, out, err)
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        err.write(f"chatting with {checkpoint} (context {model.config.max_seq_len} tokens); commands: {COMMANDS}; "
                  f"end a line with \\ to continue it; Ctrl-D ends.\n")
    replies = []
    for message in read_messages(stdin, "> " if interactive else None):
        done = session.command(message) if message.startswith("/") else None
        if done == "quit":
            break
        if done:
            continue
        text = session.reply(message)
        if text is not None:
            replies.append(text)
        if interactive:
            session.out.write("\n")
    return replies
