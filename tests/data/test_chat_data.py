"""`lunaris prepare` of conversations: the chat layouts, bad rows, the template and its tokens, loss-mask shards,
whole conversations in windows."""

import gzip
import json

import numpy as np
import pytest
from conftest import byte_level_tokenizer

from lunaris.cli import main
from lunaris.data import ShardDataset
from lunaris.data.chat_template import CHAT_TOKENS, JINJA, ChatTemplate, load_template
from lunaris.data.conversations import mix_conversations
from lunaris.data.prepare import PrepareOptions, prepare
from lunaris.data.sources import Source
from lunaris.data.tokenizer import load_tokenizer
from lunaris.errors import ConfigError, DataError

TALK = [("hello world", "the quick brown fox"), ("the lazy dog", "jumps over"), ("hello", "world world")]


def openai(user, assistant, system=None):
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def rows_of(path):
    source = Source(path)
    return [row for _, row in mix_conversations([source], False, list(CHAT_TOKENS))]


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "base-tokenizer.json"
    byte_level_tokenizer().save(str(path))
    return path


def prepare_chat(tmp_path, sources, tokenizer_file, **options):
    options = {"seq_len": 64, "val_tokens": 0, "progress": False, **options}
    return prepare(PrepareOptions(sources=sources, out=tmp_path / "data", tokenizer=tokenizer_file, **options))


# ---- the layouts -----------------------------------------------------------------------------------------------

def test_openai_sharegpt_and_alpaca_records_become_the_same_messages(tmp_path):
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"}]
    write_jsonl(tmp_path / "openai.jsonl", [openai("hello", "world", "be brief")])
    sharegpt = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
                                  {"from": "gpt", "value": "world"}]}
    with gzip.open(tmp_path / "sharegpt.jsonl.gz", "wt") as f:  # compressed files work like plain ones
        f.write(json.dumps(sharegpt) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([  # a JSON array, as the published Alpaca file is
        {"instruction": "hello", "input": "", "output": "world", "system": "be brief"},
        {"instruction": "Translate.", "input": "hello", "output": "bonjour"}]))
    assert rows_of(tmp_path / "openai.jsonl")[0].messages == expected
    assert rows_of(tmp_path / "sharegpt.jsonl.gz")[0].messages == expected
    alpaca = rows_of(tmp_path / "alpaca.json")
    assert alpaca[0].messages == expected
    assert alpaca[1].messages[0] == {"role": "user", "content": "Translate.\n\nhello"}
    assert alpaca[1].location.endswith("alpaca.json: record 2")


def test_parquet_chat_files_are_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist([openai(u, a) for u, a in TALK])
    pq.write_table(table, tmp_path / "chat.parquet")
    rows = rows_of(tmp_path / "chat.parquet")
    assert [r.messages[1]["content"] for r in rows] == [a for _, a in TALK]
    assert rows[2].location.endswith("chat.parquet: row 3")


BAD = [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "missing role"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing content"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": " \n"}, {"role": "assistant", "content": "x"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "not alternating"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "not alternating"),
    ({"messages": [{"role": "user", "content": "a"}]}, "not alternating"),   # no reply to learn
    ({"messages": [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "x"}]},
     "special token in content"),
    ({"text": "a document among conversations"}, "not a conversation"),
]


def test_every_bad_row_is_named_by_file_and_line_counted_and_left_out(tmp_path, tokenizer_file, capsys):
    good = [openai(u, a) for u, a in TALK * 4]
    chat = write_jsonl(tmp_path / "chat.jsonl", good + [row for row, _ in BAD], extra_lines=["{not json"])
    manifest = prepare_chat(tmp_path, [chat], tokenizer_file)
    bad = manifest["chat"]["bad_rows"]
    assert bad["total"] == len(BAD) + 1
    expected = {}
    for _, reason in BAD + [(None, "not JSON")]:
        expected[reason] = expected.get(reason, 0) + 1
    assert bad["by_reason"] == expected
    first_bad_line = len(good) + 1
    assert bad["first"][0].startswith(f"{chat}:{first_bad_line}: missing role")
    assert bad["first"][-1].startswith(f"{chat}:{first_bad_line + len(BAD)}: not JSON")
    assert manifest["splits"]["train"]["documents"] == len(good)
    assert main(["prepare", str(chat), "--tokenizer", str(tokenizer_file), "--seq-len", "64", "--out",
                 str(tmp_path / "again"), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert f"left out {len(BAD) + 1} bad row(s)" in report and f"{chat}:{first_bad_line}: missing role" in report


def test_a_conversation_longer_than_the_window_is_left_out_and_reported(tmp_path, tokenizer_file):
    chat = write_jsonl(tmp_path / "chat.jsonl", [openai("hello " * 40, "world"), *[openai(u, a) for u, a in TALK]])
    manifest = prepare_chat(tmp_path, [chat], tokenizer_file, seq_len=32)
    assert manifest["chat"]["bad_rows"]["by_reason"] == {"longer than --seq-len": 1}
    assert manifest["chat"]["bad_rows"]["first"][0].startswith(f"{chat}:1: longer than --seq-len")
    assert manifest["splits"]["train"]["documents"] == len(TALK)


def test_nothing_usable_is_an_error_that_names_the_rows(tmp_path, tokenizer_file):
    chat = write_jsonl(tmp_path / "chat.jsonl", [BAD[2][0]])
    with pytest.raises(DataError, match=r"No conversation .* could be used: 1 bad row\(s\) \(1 unknown role\)"):
        prepare_chat(tmp_path, [chat], tokenizer_file)


def test_conversations_and_documents_are_not_mixed_and_chat_needs_a_window(tmp_path, tokenizer_file):
    chat = write_jsonl(tmp_path / "chat.jsonl", [openai(u, a) for u, a in TALK])
    (tmp_path / "doc.txt").write_text("hello world")
    with pytest.raises(DataError, match="mix conversations .* with documents"):
        prepare_chat(tmp_path, [chat, tmp_path / "doc.txt"], tokenizer_file)
    with pytest.raises(DataError, match="give --seq-len N"):
        prepare_chat(tmp_path, [chat], tokenizer_file, seq_len=None)


# ---- the template, the tokenizer and the mask ------------------------------------------------------------------

def test_the_tokenizer_gains_the_chat_tokens_after_its_own_ids_and_the_template_beside_it(tmp_path, tokenizer_file):
    base = load_tokenizer(tokenizer_file)
    chat = write_jsonl(tmp_path / "chat.jsonl", [openai(u, a) for u, a in TALK])
    manifest = prepare_chat(tmp_path, [chat], tokenizer_file)
    extended = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    size = base.get_vocab_size()
    assert [extended.token_to_id(t) for t in CHAT_TOKENS] == list(range(size, size + 4))
    assert all(extended.token_to_id(t) == i for t, i in base.get_vocab().items())   # the old ids are kept
    assert manifest["tokenizer_added_tokens"] == list(CHAT_TOKENS) and manifest["base_vocab_size"] == size
    assert manifest["chat"]["special_tokens"] == {t: size + k for k, t in enumerate(CHAT_TOKENS)}
    config = json.loads((tmp_path / "data" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == JINJA
    # preparing with the extended tokenizer adds nothing
    again = prepare(PrepareOptions(sources=[chat], out=tmp_path / "again", tokenizer=tmp_path / "data/tokenizer.json",
                                   seq_len=64, val_tokens=0, progress=False))
    assert again["tokenizer_added_tokens"] == [] and again["vocab_size"] == manifest["vocab_size"]


def test_the_mask_trains_exactly_the_assistants_text_and_end_token(tmp_path, tokenizer_file):
    conversations = [openai(u, a, system="be brief" if k == 1 else None) for k, (u, a) in enumerate(TALK)]
    conversations.append({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a"},
                                       {"role": "user", "content": "world"}, {"role": "assistant", "content": "b"}]})
    prepare_chat(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", conversations)], tokenizer_file, seq_len=128)
    tokenizer = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    dataset = ShardDataset(tmp_path / "data", 128, verify="full")
    x, y, mask = dataset.get_batch([0])
    stream = tokenizer.decode(x[0].tolist(), skip_special_tokens=False)
    assert stream.startswith("<|user|>hello world<|end|><|assistant|>the quick brown fox<|end|><|endoftext|>"
                             "<|system|>be brief<|end|><|user|>the lazy dog<|end|>")
    trained = tokenizer.decode(y[0][mask[0]].tolist(), skip_special_tokens=False)
    assert trained == "".join(c["messages"][k]["content"] + "<|end|>" for c in conversations
                              for k in range(len(c["messages"])) if c["messages"][k]["role"] == "assistant")
    template = ChatTemplate(tokenizer)
    ids, expected_mask = template.render(conversations[0]["messages"])
    assert x[0, :len(ids)].tolist() == ids.tolist() and mask[0, :len(ids) - 1].tolist() == \
        expected_mask[1:].astype(bool).tolist()


def test_conversations_fill_windows_whole_packed_or_one_per_window(tmp_path, tokenizer_file):
    rng = np.random.default_rng(0)
    words = "hello world the quick brown fox jumps over lazy dog".split()
    conversations = [openai(" ".join(rng.choice(words, int(rng.integers(1, 12)))),
                            " ".join(rng.choice(words, int(rng.integers(1, 12))))) for _ in range(120)]
    chat = write_jsonl(tmp_path / "chat.jsonl", conversations)
    window = 48
    for layout in ("packed", "padded"):
        out = tmp_path / layout
        manifest = prepare(PrepareOptions(sources=[chat], out=out, tokenizer=tokenizer_file, seq_len=window,
                                          chat_layout=layout, val_tokens=0, progress=False))
        tokenizer = load_tokenizer(out / "tokenizer.json")
        user, eot = tokenizer.token_to_id("<|user|>"), tokenizer.token_to_id("<|endoftext|>")
        dataset = ShardDataset(out, window)
        stream = np.concatenate([np.load(p) for p in dataset.files])
        assert len(stream) % window == 0 and manifest["splits"]["train"]["documents"] == len(conversations)
        starts = 0
        for w in range(len(stream) // window):
            tokens = stream[w * window:(w + 1) * window].tolist()
            assert tokens[0] == user                      # every window starts with a conversation ...
            assert tokens.count(user) == tokens.count(tokenizer.token_to_id("<|assistant|>"))  # ... none cut
            assert tokens[-1] == eot
            starts += tokens.count(user)
            if layout == "padded":
                assert tokens.count(user) == 1
        assert starts == len(conversations)
        fill = manifest["chat"]["fill"]
        assert (fill > 0.8) if layout == "packed" else (fill < 0.6)


def test_loss_mask_shards_are_checked_against_the_manifest(tmp_path, tokenizer_file):
    prepare_chat(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", [openai(u, a) for u, a in TALK * 10])],
                 tokenizer_file)
    masks = tmp_path / "data" / "train" / "loss_mask"
    shard = masks / "shard_00000.npy"
    np.save(shard, np.ones_like(np.load(shard)))       # same length, other values: only the hash tells
    ShardDataset(tmp_path / "data", 64)
    with pytest.raises(DataError, match="sha256"):
        ShardDataset(tmp_path / "data", 64, verify="full")
    np.save(shard, np.ones(5, dtype=np.uint8))
    with pytest.raises(DataError, match="loss-mask shard .* holds 5 uint8 values"):
        ShardDataset(tmp_path / "data", 64)
    shard.unlink()
    with pytest.raises(DataError, match="has no shard_00000.npy"):
        ShardDataset(tmp_path / "data", 64)


def test_the_last_window_pads_the_mask_with_false(tmp_path):
    np.save(tmp_path / "shard_0.npy", np.arange(10, dtype=np.uint16))
    (tmp_path / "loss_mask").mkdir()
    np.save(tmp_path / "loss_mask" / "shard_0.npy", np.ones(10, dtype=np.uint8))   # a flat directory with a mask
    dataset = ShardDataset(tmp_path, 4)
    x, y, mask = dataset.get_batch([2])
    assert y.tolist() == [[9, -1, -1, -1]] and mask.tolist() == [[True, False, False, False]]


def test_training_checks_the_windows_and_the_attention_mask(tmp_path, tokenizer_file):
    from lunaris.config import LunarisCodexConfig
    from lunaris.data.packing import check_windows
    prepare_chat(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", [openai(u, a) for u, a in TALK])], tokenizer_file)
    with pytest.raises(ConfigError, match="model.max_seq_len 96 would cut them"):
        check_windows(tmp_path / "data", LunarisCodexConfig(max_seq_len=96, attention_mask="document"))
    with pytest.raises(ConfigError, match="set model.attention_mask: document"):
        check_windows(tmp_path / "data", LunarisCodexConfig(max_seq_len=64))
    check_windows(tmp_path / "data", LunarisCodexConfig(max_seq_len=128, attention_mask="document"))


def test_a_tokenizer_directory_without_lunaris_template_is_refused(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    with pytest.raises(DataError, match="holds no chat template"):
        load_template(tokenizer, tokenizer_file)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with pytest.raises(DataError, match="is not the one Lunaris renders"):
        load_template(tokenizer, tokenizer_file)


# ---- the example conversations ---------------------------------------------------------------------------------

def test_example_chat_is_written_and_prepared(tmp_path, tokenizer_file):
    from lunaris.data.chat_example import TRAIN_PACKAGES, example_conversations
    from lunaris.demo import EXCLUDE
    from lunaris.tasks.embedded import HELD_OUT_PACKAGES
    assert all(f"{p}/*" in EXCLUDE for p in TRAIN_PACKAGES)   # the demo's model never saw these functions
    assert not set(TRAIN_PACKAGES) & set(HELD_OUT_PACKAGES)    # nor do they hold the built-in tasks' functions
    conversations = example_conversations()
    assert len(conversations) > 200 and conversations == example_conversations()
    assert conversations[0]["messages"][1]["content"].startswith(("def ", "async def "))
    path = tmp_path / "example.jsonl"
    manifest = prepare(PrepareOptions(sources=[], example_chat=path, out=tmp_path / "data", tokenizer=tokenizer_file,
                                      seq_len=1024, max_tokens=20_000, progress=False))
    assert len(path.read_text().splitlines()) == len(conversations)
    assert manifest["chat"]["file_layouts"] == {"openai": 1} and manifest["splits"]["val"]["documents"] > 0
