"""`lunaris chat` and the chat template outside Lunaris: the scripted chat loop, transformers' apply_chat_template on
an export giving exactly the ids training read, and greedy replies of the export equal to `lunaris chat`'s."""

import dataclasses
import io
import json
import sys

import numpy as np
import processes
import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.chat import ChatSession, read_messages, run_chat
from lunaris.data.chat_template import ChatTemplate, add_chat_tokens, write_template
from lunaris.data.prepare import PrepareOptions, prepare
from lunaris.data.tokenizer import load_tokenizer
from lunaris.export import export_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick brown fox"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Café? 東京 🦊"},
     {"role": "assistant", "content": "  indented\n\tcode()\n"}, {"role": "user", "content": "again,\n\nplease"},
     {"role": "assistant", "content": "def f(x):\n    return x  # done"}],
    [{"role": "user", "content": "<|endoftext"}, {"role": "assistant", "content": " leading space"}],
]


def chat_run(root, **model_overrides):
    """A run directory with a tiny random model whose tokenizer has the chat tokens and template (as a run
    fine-tuned on `lunaris prepare` conversations has); vocab_size is the tokenizer's, so every id decodes."""
    root.mkdir(parents=True)
    tokenizer = byte_level_tokenizer()
    add_chat_tokens(tokenizer)
    tokenizer.save(str(root / "tokenizer.json"))
    write_template(root)
    torch.manual_seed(3)
    model = LunarisCodex(tiny_model_config(vocab_size=tokenizer.get_vocab_size(), tie_embeddings=False,
                                           **model_overrides))
    with torch.no_grad():  # a peaked next-token distribution (greedy choices clear-cut) that varies with the context
        model.lm_head.weight.mul_(20.0)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=model.config)), "step": 1}
    torch.save(state, root / "latest_checkpoint.pt")
    return root


def greedy_reply(run, messages, max_new_tokens):
    """The reply as the model's own decoding loop gives it: greedy from the template's prompt to the end token."""
    model = LunarisCodex.from_checkpoint(run)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    template = ChatTemplate(tokenizer)
    ids = torch.tensor([template.prompt(messages)])
    new = model.generate(ids, max_new_tokens, temperature=0.0)[0, ids.shape[1]:].tolist()
    stops = [i for i, t in enumerate(new) if t in template.stop_ids]
    return tokenizer.decode(new[:stops[0]] if stops else new, skip_special_tokens=True)


def ids_of(encoded):
    """transformers 4 returns a list, 5 a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# ---- the chat loop ---------------------------------------------------------------------------------------------

def test_messages_are_lines_and_a_backslash_continues_one():
    lines = io.StringIO("hello\n\n  \nfirst line\\\nsecond line\n/reset\nlast\\\n")
    assert list(read_messages(lines)) == ["hello", "first line\nsecond line", "/reset", "last"]


def test_scripted_chat_replies_as_greedy_decoding_and_keeps_the_history(tmp_path):
    run = chat_run(tmp_path / "run", max_seq_len=256)   # the whole history fits: nothing is dropped
    out, err = io.StringIO(), io.StringIO()
    script = "hello world\nthe fox\n/system be brief\nlazy dog\n/reset\nhello world\n"
    replies = run_chat(run, temperature=0.0, max_new_tokens=12, device="cpu", stdin=io.StringIO(script), out=out,
                       err=err)
    assert len(replies) == 4 and out.getvalue() == "".join(r + "\n" for r in replies)
    user = lambda text: {"role": "user", "content": text}            # noqa: E731
    reply = lambda text: {"role": "assistant", "content": text}      # noqa: E731
    assert replies[0] == greedy_reply(run, [user("hello world")], 12)
    assert replies[1] == greedy_reply(run, [user("hello world"), reply(replies[0]), user("the fox")], 12)
    system = [{"role": "system", "content": "be brief"}]
    assert replies[2] == greedy_reply(run, system + [user("hello world"), reply(replies[0]), user("the fox"),
                                                     reply(replies[1]), user("lazy dog")], 12)
    assert replies[3] == greedy_reply(run, system + [user("hello world")], 12)   # /reset keeps the system message
    assert "[system message set]" in err.getvalue() and "[conversation reset]" in err.getvalue()


def test_the_oldest_turns_are_dropped_with_a_note_when_the_context_is_full(tmp_path):
    run = chat_run(tmp_path / "run", max_seq_len=48)
    model = LunarisCodex.from_checkpoint(run)
    template = ChatTemplate(load_tokenizer(run / "tokenizer.json"))
    err = io.StringIO()
    session = ChatSession(model, template, max_new_tokens=8, temperature=0.0, out=io.StringIO(), err=err)
    for k in range(6):
        session.reply(f"hello world {k}")
    assert "oldest turn(s) to fit the model's context of 48 tokens" in err.getvalue()
    assert 0 < len(session.turns) < 6 and session.turns[-1][0] == "hello world 5"
    ids = session.prompt("next")                                       # the next prompt leaves room for a reply
    assert ids is not None and len(ids) + 8 <= 48
    assert session.reply("the quick brown fox jumps " * 20) is None   # alone longer than the context
    assert "shorten it, or /reset" in err.getvalue()


def test_lunaris_chat_reads_stdin_and_refuses_a_model_without_a_template(tmp_path):
    run = chat_run(tmp_path / "run")
    command = [sys.executable, "-m", "lunaris", "chat", "--checkpoint", str(run), "--temperature", "0",
               "--max-new-tokens", "6", "--device", "cpu"]
    (tmp_path / "input.txt").write_text("hello world\n/quit\nnever read\n")
    piped = ["bash", "-c", f'exec "$0" "$@" < {tmp_path / "input.txt"}', *command]   # stdin is a file, no terminal
    done = processes.run(piped, 120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy_reply(run, [{"role": "user", "content": "hello world"}], 6) + "\n"
    (run / "tokenizer_config.json").unlink()
    done = processes.run(piped, 120)
    assert done.returncode == 2 and "holds no chat template" in done.stderr and "Traceback" not in done.stderr


def test_the_readme_chat_commands_run(tmp_path):
    """The README's Chat block (```bash chat-example```), against a chat run at runs/chat, stdin not a terminal."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```bash chat-example\n(.*?)```", readme, re.S)
    assert len(blocks) == 1 and "lunaris chat" in blocks[0]
    chat_run(tmp_path / "runs/chat")
    script = blocks[0].replace("lunaris chat", f"{sys.executable} -m lunaris chat --device cpu --max-new-tokens 4")
    done = processes.run(["bash", "-euo", "pipefail", "-c", f"exec < /dev/null\n{script}"], 300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") >= 2 and "Traceback" not in done.stderr   # the two piped messages answered


# ---- the template outside Lunaris ------------------------------------------------------------------------------

def test_apply_chat_template_of_the_export_gives_exactly_the_ids_lunaris_trained_on(tmp_path):
    transformers = pytest.importorskip("transformers")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for messages in CONVERSATIONS:
            f.write(json.dumps({"messages": messages}) + "\n")
    byte_level_tokenizer().save(str(tmp_path / "base.json"))
    prepare(PrepareOptions(sources=[tmp_path / "chat.jsonl"], out=tmp_path / "data", tokenizer=tmp_path / "base.json",
                           seq_len=256, chat_layout="padded", val_tokens=0, progress=False))
    trained = np.load(tmp_path / "data" / "train" / "shard_00000.npy").reshape(len(CONVERSATIONS), 256)
    run = chat_run(tmp_path / "run")
    (run / "tokenizer.json").write_bytes((tmp_path / "data" / "tokenizer.json").read_bytes())
    export_checkpoint(run, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    template = ChatTemplate(load_tokenizer(tmp_path / "data" / "tokenizer.json"))
    for row, messages in zip(trained, CONVERSATIONS):
        ids = ids_of(hf.apply_chat_template(messages, tokenize=True))
        assert ids == row[:len(ids)].tolist() and row[len(ids)] == 0   # then the end-of-text id
        prompt = ids_of(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
        assert prompt == template.prompt(messages[:-1])
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, template.end_id]


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2, collab_mode="simple",
                                                    n_reasoning_steps=2, attention_mask="document",
                                                    document_separator_id=0)], ids=["dense", "moc"])
def test_greedy_replies_of_the_export_equal_lunaris_chat(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    run = chat_run(tmp_path / "run", max_seq_len=128, **overrides)   # both turns and replies fit the context
    summary = export_checkpoint(run, tmp_path / "hf")
    assert summary["format"] == ("llama" if not overrides else "lunaris")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    script = "hello world\nthe quick fox\n"
    replies = run_chat(run, temperature=0.0, max_new_tokens=16, device="cpu", stdin=io.StringIO(script),
                       out=io.StringIO(), err=io.StringIO())
    messages = []
    for text, expected in zip(script.splitlines(), replies):
        messages.append({"role": "user", "content": text})
        ids = torch.tensor([ids_of(tokenizer.apply_chat_template(messages, add_generation_prompt=True))])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == expected
        messages.append({"role": "assistant", "content": expected})
    assert any(replies), "the test model must say something"


# ---- the built-in task -----------------------------------------------------------------------------------------

def test_python_docstring_is_right_a_quarter_of_the_time_for_a_model_that_ignores_the_docstring():
    from lunaris.tasks import load_task, parse_spec
    task = load_task(parse_spec("python_docstring"))
    examples = task.examples
    assert len(examples) % 4 == 0 and len(examples) >= 200 and task.chance == 0.25
    for start in range(0, len(examples), 4):
        group = examples[start:start + 4]
        assert len({e.choices for e in group}) == 1 and sorted(e.label for e in group) == [0, 1, 2, 3]
        assert len({e.context for e in group}) == 4
        assert all(e.context.startswith("<|user|>") and e.context.endswith("<|end|><|assistant|>") for e in group)
    blind = [max(range(4), key=lambda k: (len(e.choices[k]) * 7919) % 13) for e in examples]  # any docstring-blind pick
    assert sum(pick == e.label for pick, e in zip(blind, examples)) == len(examples) // 4
