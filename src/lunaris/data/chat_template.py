"""The chat template: how a conversation becomes token ids and a loss mask, written once.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an optional
system message, then user and assistant messages in turn, ending with the assistant's (conversations.py checks
this). Each message is its role token, its content, and the end token:

    <|system|>You are terse.<|end|><|user|>Add 2 and 3.<|end|><|assistant|>5<|end|>

No newline or space is added around the special tokens, so the content is encoded exactly as it is written, and
no begin token is added (Lunaris adds none); a prompt for a reply ends with `<|assistant|>`. The loss mask is 1 on
the tokens the assistant writes, its content and its end token (so the model learns to stop), and 0 on everything
else: role tokens, system and user messages.

The same template in Jinja (`JINJA`) is what a tokenizer directory holds (`tokenizer_config.json`, key
`chat_template`, as Hugging Face tokenizers keep it): `lunaris prepare` writes it beside the tokenizer it extends
with the four special tokens, the trainer copies it into the run directory, and `lunaris export` and the GGUF file
carry it, so transformers' `apply_chat_template` and llama.cpp render exactly the ids Lunaris trained on. A
tokenizer splits text at its special tokens and encodes each piece alone, which is what `render` does piece by
piece; a message whose content contains a special token's text would be split differently, so such a row is
refused when data is prepared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lunaris.errors import DataError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
CONFIG_NAME = "tokenizer_config.json"  # where a Hugging Face tokenizer directory keeps its chat template

# Rendered by transformers with trim_blocks and lstrip_blocks; one line, so no whitespace is ever added.
JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class ChatTemplate:
    """The template bound to a tokenizer that has the chat tokens: conversations -> (ids, loss mask)."""

    def __init__(self, tokenizer):
        missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise DataError(f"the tokenizer has no {', '.join(missing)} token(s), which the chat template needs; "
                            f"`lunaris prepare` adds them when it prepares conversations.")
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True  # a message typed with "<|end|>" in it stays text
        self.role_ids = {role: tokenizer.token_to_id(token) for role, token in ROLES.items()}
        self.end_id = tokenizer.token_to_id(END)

    def encode(self, text: str) -> list:
        """Ids of a message's content, special-token text kept as text."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render(self, messages: list, contents: list = None) -> tuple:
        """(ids, loss mask) of a whole conversation, int64 and uint8 arrays of equal length.

        `contents` are the messages' content ids when already encoded (prepare encodes them in batches).
        """
        ids, mask = [], []
        for k, message in enumerate(messages):
            content = contents[k] if contents is not None else self.encode(message["content"])
            trained = message["role"] == "assistant"
            ids += [self.role_ids[message["role"]], *content, self.end_id]
            mask += [0] + [int(trained)] * (len(content) + 1)   # the assistant's content and its end token
        return np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)

    def prompt(self, messages: list) -> list:
        """Ids of a conversation so far, then `<|assistant|>`: what the model continues with its reply."""
        return self.render(messages)[0].tolist() + [self.role_ids["assistant"]]

    @property
    def stop_ids(self) -> tuple:
        """The ids that end a reply: the end token (and end-of-text, which a reply should never reach)."""
        eot = self.tokenizer.token_to_id("<|endoftext|>")
        return (self.end_id,) if eot is None else (self.end_id, eot)


def special_texts(tokenizer) -> list:
    """The texts of the tokenizer's special tokens (a message containing one is refused: see the module doc)."""
    return sorted({added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special})


def add_chat_tokens(tokenizer) -> list:
    """Give `tokenizer` the chat tokens it lacks, as special tokens with new ids after its last; returns those
    added (in id order)."""
    from tokenizers import AddedToken
    missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    return missing


def write_template(directory: Path) -> None:
    """The template file of a tokenizer directory: tokenizer_config.json with `chat_template`."""
    (Path(directory) / CONFIG_NAME).write_text(json.dumps({"chat_template": JINJA}, indent=2) + "\n",
                                               encoding="utf-8")


def template_text(tokenizer_path) -> str | None:
    """The `chat_template` of the tokenizer_config.json beside a tokenizer.json, or None if there is none."""
    config = Path(tokenizer_path).parent / CONFIG_NAME
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{config} cannot be read as JSON ({exc}); it holds the tokenizer's chat template. Restore "
                        f"it from the data directory `lunaris prepare` wrote, or remove it.") from None
    return template


def load_template(tokenizer, tokenizer_path) -> ChatTemplate:
    """The chat template of a tokenizer directory; a clear error for a tokenizer without one (a base model) or
    with another template than Lunaris's."""
    text = template_text(tokenizer_path)
    if text is None:
        raise DataError(f"{Path(tokenizer_path).parent} holds no chat template ({CONFIG_NAME} with chat_template "
                        f"beside {Path(tokenizer_path).name}): this model was not fine-tuned on conversations. "
                        f"Fine-tune it first (README, From base model to assistant), or use `lunaris generate`.")
    if text != JINJA:
        raise DataError(f"the chat template in {Path(tokenizer_path).parent / CONFIG_NAME} is not the one Lunaris "
                        f"renders ({JINJA!r}); Lunaris chats only with models fine-tuned on data that "
                        f"`lunaris prepare` rendered. Pass that data's tokenizer.json with --tokenizer.")
    return ChatTemplate(tokenizer)
