"""`lunaris prepare` of conversations: chat files -> rendered ids and loss masks -> whole conversations in windows.

The conversation half of the pipeline (prepare.py runs it when its sources are chat files, conversations.py):

1. records are read and mixed as documents are (sources.mix_conversations); a bad one is counted by reason and
   its place (`file:line`) kept for the report and the manifest;
2. each good conversation is rendered by the chat template (chat_template.py: its ids and its loss mask, 1 on the
   assistant's tokens), followed by the end-of-text id; one longer than the window (`--seq-len`, with that id) is a
   bad row too: it is left out rather than cut, since a cut conversation trains answers without their questions;
3. whole conversations fill windows of `--seq-len` tokens (packing.py), which the splitter routes whole to the
   validation and training splits, written as token shards and loss-mask shards beside them (writer.py).

The manifest's `chat` entry records the template and its special tokens (which ids were added to the tokenizer),
the layout and window, conversations and bad rows by reason, and the loss mask's statistics.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lunaris.data.chat_template import CHAT_TOKENS, JINJA, special_texts
from lunaris.data.conversations import LAYOUTS as CHAT_LAYOUTS
from lunaris.data.conversations import layouts as file_layouts
from lunaris.data.conversations import mix_conversations
from lunaris.data.packing import WindowPacker
from lunaris.errors import DataError

BATCH = 512          # conversations encoded together (the tokenizer's multi-threaded batch encoder)
EXAMPLES_KEPT = 50   # bad rows whose place and reason the manifest keeps (every one is counted)
EXAMPLES_SHOWN = 10  # ... and the report prints


def chat_sources(sources: list) -> bool:
    """True when every file of the sources holds conversations, False when none does; a mix is an error."""
    layouts = {path: layout for source in sources for path, layout in file_layouts(source).items()}
    chat = [p for p, layout in layouts.items() if layout]
    if chat and len(chat) < len(layouts):
        text = [str(p) for p, layout in layouts.items() if not layout]
        raise DataError(f"the sources mix conversations ({chat[0]}, in a {layouts[chat[0]]} layout) with documents "
                        f"({', '.join(text[:3])}); prepare them into separate directories (fine-tuning data holds "
                        f"conversations only), or leave the documents out with --exclude.")
    return bool(chat)


def chat_sample(sources: list, honour_weights: bool, sample_bytes: int):
    """Batches of message texts from the start of the mix, for training a tokenizer (--vocab-size)."""
    taken, batch = 0, []
    for _, row in mix_conversations(sources, honour_weights, []):
        if row.messages:
            batch.append("\n".join(m["content"] for m in row.messages))
            taken += row.size
        if len(batch) >= 1024 or taken >= sample_bytes:
            yield batch
            batch = []
            if taken >= sample_bytes:
                return
    if batch:
        yield batch


class BadRows:
    """Every bad row counted by reason; the first ones' places kept."""

    def __init__(self):
        self.counts, self.examples = Counter(), []

    def add(self, location: str, problem: str, detail: str) -> None:
        self.counts[problem] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"{location}: {problem} ({detail})")

    def record(self) -> dict:
        return {"total": sum(self.counts.values()), "by_reason": dict(sorted(self.counts.items())),
                "first": self.examples}


def encode_conversations(options, sources: list, template, eot_id: int, splitter, progress) -> dict:
    """Render, pack and write every conversation of the sources through `splitter` (whose writers are
    MaskedShardWriters); returns the manifest's `chat` entry (without the per-split statistics)."""
    tokenizer = template.tokenizer
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    packer = WindowPacker(options.seq_len, eot_id, options.chat_layout)
    bad, layouts = BadRows(), Counter()
    batch = []
    rows = mix_conversations(sources, options.weights is not None, special_texts(tokenizer))
    for item in rows:
        batch.append(item)
        if len(batch) >= BATCH:
            if _write(batch, encode, template, packer, splitter, sources, bad, progress):
                break
            batch = []
    else:
        if batch:
            _write(batch, encode, template, packer, splitter, sources, bad, progress)
    if not splitter.full:
        _route(packer.finish(), splitter)
    for source in sources:
        layouts.update(layout for layout in file_layouts(source).values())
    return {"template": JINJA, "special_tokens": {t: tokenizer.token_to_id(t) for t in CHAT_TOKENS},
            "layout": options.chat_layout, "seq_len": options.seq_len, "file_layouts": dict(layouts),
            "windows": packer.windows, "padding_tokens": packer.padding,
            "fill": round(1 - packer.padding / max(packer.tokens, 1), 4), "bad_rows": bad.record()}


def _write(batch: list, encode, template, packer, splitter, sources, bad, progress) -> bool:
    """Render and pack one batch of rows; True once --max-tokens is reached."""
    texts = [m["content"] for _, row in batch if row.messages for m in row.messages]
    ids = [e.ids for e in encode(texts, add_special_tokens=False)] if texts else []
    at, windows, good = 0, [], 0
    for i, row in batch:  # in file order, so that the report lists bad rows in order
        if not row.messages:
            bad.add(row.location, row.problem, row.detail)
            continue
        good += 1
        contents = ids[at:at + len(row.messages)]
        at += len(row.messages)
        tokens, mask = template.render(row.messages, contents)
        if len(tokens) + 1 > packer.window:
            bad.add(row.location, "longer than --seq-len", f"{len(tokens) + 1} tokens with its end-of-text id, "
                                                           f"windows of {packer.window}")
            continue
        trained = sum(len(m["content"].encode("utf-8")) for m in row.messages if m["role"] == "assistant")
        source = sources[i]
        source.documents, source.bytes, source.tokens = \
            source.documents + 1, source.bytes + row.size, source.tokens + len(tokens) + 1
        windows += packer.add(tokens, mask, trained)
    progress.update(sum(row.size for _, row in batch), good, sum(len(w) for w, _ in windows))
    return _route(windows, splitter)


def _route(windows: list, splitter) -> bool:
    """Hand finished windows to the splitter as documents of one window each; True once it is full."""
    if windows:
        rows = np.concatenate([w for w, _ in windows])
        lengths = np.array([len(w) for w, _ in windows], dtype=np.int64)
        splitter.add(rows, lengths, np.array([nbytes for _, nbytes in windows], dtype=np.int64))
    return splitter.full


def check_conversations(splits: dict, record: dict) -> None:
    """A clear error when no conversation could be used at all."""
    if splits["train"]["tokens"] == 0 and not splits.get("val", {}).get("tokens"):
        bad = record["bad_rows"]
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in bad["by_reason"].items()) or "none"
        first = f" The first: {bad['first'][0]}." if bad["first"] else ""
        raise DataError(f"No conversation of the sources could be used: {bad['total']:,} bad row(s) "
                        f"({reasons}).{first} Fix the rows (the README lists the chat layouts), or raise "
                        f"--seq-len if they are too long.")


def check_options(options) -> list:
    """Problems of the chat options (`--seq-len` is needed once the sources turn out to hold conversations)."""
    problems = []
    if options.seq_len is not None and options.seq_len < 2:
        problems.append(f"--seq-len must be at least 2, got {options.seq_len}")
    if options.chat_layout not in ("packed", "padded"):
        problems.append(f"--chat-layout must be packed or padded, got {options.chat_layout!r}")
    return problems


def require_seq_len(options) -> None:
    if options.seq_len is None:
        raise DataError(f"the sources hold conversations ({', '.join(CHAT_LAYOUTS)} layouts), which are packed "
                        f"whole into windows of the length you will fine-tune with: give --seq-len N, your "
                        f"model.max_seq_len (a conversation is never cut; one longer than N is left out and "
                        f"reported).")


def report_lines(manifest: dict) -> list:
    """The chat lines of prepare's report: conversations, mask, windows, bad rows."""
    chat, lines = manifest["chat"], []
    for name, split in manifest["splits"].items():
        mask = split["loss_mask"]
        lines.append(f"  {name:5s}: {split['documents']:,} conversations in {split['windows']:,} windows of "
                     f"{chat['seq_len']}; {mask['trained_tokens']:,} trained tokens "
                     f"({100 * mask['trained_tokens'] / max(split['tokens'], 1):.1f}%: the assistant's)")
    lines.append(f"  layout {chat['layout']}: windows {100 * chat['fill']:.1f}% filled by conversations (the rest "
                 f"end-of-text padding, not trained)")
    added = manifest.get("tokenizer_added_tokens") or []
    if added:
        lines.append(f"  tokenizer extended with {', '.join(added)} (ids {manifest['base_vocab_size']} and up)")
    bad = chat["bad_rows"]
    if bad["total"]:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in bad["by_reason"].items())
        lines.append(f"  left out {bad['total']:,} bad row(s): {reasons}")
        lines += [f"    {example}" for example in bad["first"][:EXAMPLES_SHOWN]]
        if bad["total"] > EXAMPLES_SHOWN:
            lines.append(f"    ... {bad['total'] - EXAMPLES_SHOWN:,} more (the first {EXAMPLES_KEPT} are in "
                         f"manifest.json, chat.bad_rows)")
    else:
        lines.append("  no bad rows")
    return lines
