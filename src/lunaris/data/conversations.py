"""Conversations for fine-tuning: the chat layouts people have, read into one form, bad rows named and counted.

A chat file is a JSONL file (one record per line), a JSON file holding one array of records, or a Parquet file (one
record per row), optionally gzip/bz2/xz-compressed; its layout is recognized from its first record:

| layout | record | roles |
| --- | --- | --- |
| OpenAI | `{"messages": [{"role": ..., "content": ...}, ...]}` | system, user, assistant |
| ShareGPT | `{"conversations": [{"from": ..., "value": ...}, ...]}` | system, human (or user), gpt (or assistant) |
| Alpaca | `{"instruction": ..., "input": ..., "output": ..., "system": ...}` | user, assistant (and system) |

(Alpaca: the user message is the instruction, then a blank line and the input when there is one; the assistant's,
the output; `system` is optional.)

Every record becomes a list of messages `{"role": "system" | "user" | "assistant", "content": str}` or a bad row:
a record that is not a JSON object, a message without role or content, an unknown role, empty content (blank
text), roles out of order (an optional system message first, then user and assistant in turn, ending with the
assistant), or content holding the text of one of the tokenizer's special tokens (it would render as that token).
A bad row is never dropped silently: `lunaris prepare` prints where it is (`file:line`, or `file: record N` of a
JSON array, `file: row N` of a Parquet file) and why, and counts it by reason in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lunaris.data.sources import _split_compression, interleave, read_guarded

LAYOUTS = ("openai", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class ChatRow:
    """One record of a chat file: its messages, or why it cannot be used."""

    location: str                 # "file:line", "file: record N" or "file: row N"
    messages: list | None         # [{"role", "content"}] when the record is good
    problem: str | None = None    # the reason it is bad (a short phrase, the key of the manifest's counts)
    detail: str = ""              # what exactly was wrong, for the report

    @property
    def size(self) -> int:
        """UTF-8 bytes of the contents (what --weights measures); 0 for a bad row."""
        return sum(len(m["content"].encode("utf-8", "replace")) for m in self.messages) if self.messages else 0


# ---- records -------------------------------------------------------------------------------------------------

def layout_of(record) -> str | None:
    """The chat layout a record is in, or None for a record that is no conversation (a text document, say)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "openai"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _openai(record: dict) -> list:
    messages = []
    for k, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or "role" not in message:
            raise _Bad("missing role", f"message {k + 1} has no 'role'")
        if "content" not in message or message["content"] is None:
            raise _Bad("missing content", f"message {k + 1} ({message['role']}) has no 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _sharegpt(record: dict) -> list:
    messages = []
    for k, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn:
            raise _Bad("missing role", f"turn {k + 1} has no 'from'")
        if "value" not in turn or turn["value"] is None:
            raise _Bad("missing content", f"turn {k + 1} ({turn['from']}) has no 'value'")
        role = SHAREGPT_ROLES.get(turn["from"], turn["from"])
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _alpaca(record: dict) -> list:
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    if not isinstance(extra, str) or not extra.strip():
        user = instruction
    elif isinstance(instruction, str):
        user = f"{instruction}\n\n{extra}"
    else:
        user = instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


READERS = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}


class _Bad(Exception):
    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem, self.detail = problem, detail


def _check(messages: list, specials: list) -> None:
    """Raise _Bad unless the messages are a usable conversation."""
    for k, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise _Bad("unknown role", f"message {k + 1} has role {role!r} (system, user and assistant are known)")
        if not isinstance(content, str):
            raise _Bad("missing content", f"message {k + 1} ({role}) holds {type(content).__name__}, not text")
        if not content.strip():
            raise _Bad("empty content", f"message {k + 1} ({role}) is empty")
        for special in specials:
            if special in content:
                raise _Bad("special token in content", f"message {k + 1} ({role}) contains {special!r}, the text "
                                                       f"of a special token")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if not turns or len(turns) % 2 or any(r != ("user", "assistant")[k % 2] for k, r in enumerate(turns)):
        raise _Bad("not alternating", f"roles {', '.join(roles) or '(none)'}; expected an optional system message, "
                                      f"then user and assistant in turn, ending with assistant")


def to_row(record, layout: str, location: str, specials: list) -> ChatRow:
    """A record of a file in `layout` as a ChatRow (good or bad)."""
    if layout_of(record) != layout:
        what = "not a JSON object" if not isinstance(record, dict) else f"not in the {layout} layout of its file"
        keys = f" (keys: {', '.join(list(record)[:8])})" if isinstance(record, dict) else ""
        return ChatRow(location, None, "not a conversation", f"{what}{keys}")
    try:
        messages = READERS[layout](record)
        _check(messages, specials)
    except _Bad as bad:
        return ChatRow(location, None, bad.problem, bad.detail)
    return ChatRow(location, messages)


# ---- files ---------------------------------------------------------------------------------------------------

def _records(path: Path) -> Iterator[tuple]:
    """(location, record or a parse problem) of every record of a chat file; blank lines skipped."""
    opener, name = _split_compression(path)
    if name.lower().endswith(".parquet"):
        yield from _parquet_records(path, opener)
        return
    with opener(path, "rb") as f:
        head = f.read(1024).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # one JSON array of records (Alpaca's and ShareGPT's published files)
            try:
                records = json.loads(f.read().decode("utf-8", "replace"))
            except json.JSONDecodeError as exc:
                yield f"{path}:{exc.lineno}", _Bad("not JSON", f"the JSON array does not parse ({exc.msg})")
                return
            for k, record in enumerate(records, 1):
                yield f"{path}: record {k}", record
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line.decode("utf-8", "replace"))
            except json.JSONDecodeError as exc:
                yield f"{path}:{line_no}", _Bad("not JSON", exc.msg)


def _parquet_records(path: Path, opener) -> Iterator[tuple]:
    import io

    import pyarrow.parquet as pq
    with opener(path, "rb") as raw:
        parquet = pq.ParquetFile(raw if opener is open else io.BytesIO(raw.read()))
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record


def file_layout(path: Path) -> str | None:
    """The chat layout of a file, from its first record; None when it holds no conversations (text, or a JSONL
    file of documents) or cannot be parsed as records."""
    opener, name = _split_compression(path)
    if not name.lower().endswith((".jsonl", ".ndjson", ".json", ".parquet")):
        return None
    try:
        for _, record in _records(path):
            return layout_of(record) if not isinstance(record, _Bad) else None
    except Exception:  # an unreadable file is reported by the reader that reads it as text
        return None
    return None


def read_rows(path: Path, layout: str, specials: list) -> Iterator[ChatRow]:
    """Every record of a chat file as a ChatRow, in file order."""
    for location, record in _records(path):
        if isinstance(record, _Bad):
            yield ChatRow(location, None, record.problem, record.detail)
        else:
            yield to_row(record, layout, location, specials)


# ---- sources -------------------------------------------------------------------------------------------------

def layouts(source) -> dict:
    """{file: its chat layout, or None for a file of documents} of a sources.Source (looked at once)."""
    if not source.chat_layouts:
        source.chat_layouts = {p: None if source.kind == "hf" else file_layout(p) for p in source.files}
    return source.chat_layouts


def source_rows(source, specials: list) -> Iterator[ChatRow]:
    """The ChatRow of every record of a source's chat files, file after file."""
    for path, layout in layouts(source).items():
        yield from read_guarded(path, read_rows(path, layout, specials))


def mix_conversations(sources: list, honour_weights: bool, specials: list) -> Iterator[tuple]:
    """(source index, ChatRow) of every source's chat records, bad ones included, interleaved by the bytes of
    their contents as documents are (sources.interleave: --weights apply)."""
    streams = [((row, row.size) for row in source_rows(s, specials)) for s in sources]
    for i, row, _ in interleave(streams, sources, honour_weights):
        yield i, row
