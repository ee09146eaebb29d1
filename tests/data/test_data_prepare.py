"""`lunaris prepare`: round trip of every document, mixing, source formats, tokenizers, atomic output, and the
validation split (adaptive by default, exact with --val-tokens)."""

import gzip
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

import lunaris.data.prepare as prepare_module
from lunaris.cli import main
from lunaris.data import ShardDataset, read_manifest
from lunaris.data.prepare import PrepareOptions, prepare
from lunaris.runtime import file_sha256

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "models", "read", "tokens",
         "from", "shards", "über", "naïve", "東京", "😀", "{}", "[]", "42", "3.14", "<|endoftext|>"]


def make_docs(n, seed=0, min_words=3, max_words=60):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return path


def run(tmp_path, sources, **kwargs):
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("val_tokens", 0)
    options = PrepareOptions(sources=[str(s) for s in sources], out=tmp_path / "out", progress=False, **kwargs)
    return prepare(options), tmp_path / "out"


def decode_split(out, split):
    """Documents of a split, decoded from its shards; asserts each ends with end-of-text."""
    manifest = read_manifest(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    files = sorted((out / split).glob("*.npy"))
    ids = np.concatenate([np.load(f) for f in files]).astype(np.int64)
    eot = manifest["eot_id"]
    assert ids[-1] == eot, "the stream must end with end-of-text"
    cuts = np.flatnonzero(ids == eot)
    pieces = np.split(ids, cuts + 1)[:-1]
    return [tokenizer.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]


def test_round_trip_every_document_in_order(tmp_path):
    docs = make_docs(120)
    docs[5] = ""  # empty: skipped and counted
    docs[9] = "   \n\t"
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    manifest, out = run(tmp_path, [src], val_tokens=300, shard_tokens=500)
    kept = [d for d in docs if d.strip()]
    val, train = decode_split(out, "val"), decode_split(out, "train")
    assert val + train == kept  # literal "<|endoftext|>" inside documents stays text
    assert 0 < len(val) < 20
    assert manifest["report"]["empty_documents_skipped"] == 2
    for split, texts in (("val", val), ("train", train)):
        entry = manifest["splits"][split]
        assert entry["documents"] == len(texts)
        assert entry["bytes"] == sum(len(t.encode()) for t in texts)
        files = sorted((out / split).glob("*.npy"))
        assert [s["file"] for s in entry["shards"]] == [f.name for f in files]
        assert all(s["sha256"] == file_sha256(f) for s, f in zip(entry["shards"], files))
        assert entry["tokens"] == sum(len(np.load(f)) for f in files)
    assert len(manifest["splits"]["train"]["shards"]) > 2  # 500-token shards
    assert all(len(np.load(out / "train" / s["file"])) == 500 for s in manifest["splits"]["train"]["shards"][:-1])
    assert manifest["splits"]["val"]["tokens"] >= 300
    assert manifest["dtype"] == "uint16" and np.load(out / "train" / "shard_00000.npy").dtype == np.uint16
    assert manifest["tokenizer_sha256"] == file_sha256(out / "tokenizer.json")
    assert manifest["model_vocab_size"] % 64 == 0 and manifest["model_vocab_size"] >= manifest["vocab_size"]
    assert manifest["format_version"] == 1 and manifest["args"] == {}
    ds = ShardDataset(out, 16, verify="full")
    assert ds.num_tokens == manifest["splits"]["train"]["tokens"]
    assert not list(tmp_path.glob(".out*")), "the staging directory must be gone"


def test_weighted_mix_follows_weights_and_is_homogeneous(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha {d}" for d in make_docs(400, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"beta {d}" for d in make_docs(400, seed=2)])
    manifest, out = run(tmp_path, [a, b], weights=[3.0, 1.0])
    docs = decode_split(out, "train")
    from_a = [len(d.encode()) if d.startswith("alpha") else 0 for d in docs]
    total = sum(len(d.encode()) for d in docs)
    assert sum(from_a) / total == pytest.approx(0.75, abs=0.02)
    first_half = docs[:len(docs) // 2]
    share = sum(len(d.encode()) for d in first_half if d.startswith("alpha")) / sum(len(d.encode()) for d in first_half)
    assert share == pytest.approx(0.75, abs=0.03)
    sources = manifest["sources"]
    assert sources[0]["exhausted"] and not sources[1]["exhausted"]  # a runs out first: the mix stops there
    assert sources[0]["documents"] == 400 and sources[1]["documents"] < 400
    # Each source's documents keep their order.
    beta = [f"beta {d}" for d in make_docs(400, seed=2)]
    assert [d for d in docs if d.startswith("beta")] == beta[:sources[1]["documents"]]


def test_without_weights_every_document_used_once(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(300, seed=3))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(30, seed=4))
    manifest, out = run(tmp_path, [a, b], val_tokens=100)
    docs = decode_split(out, "val") + decode_split(out, "train")
    assert sorted(docs) == sorted(make_docs(300, seed=3) + make_docs(30, seed=4))
    assert all(s["exhausted"] for s in manifest["sources"])
    positions = [i for i, d in enumerate(docs) if d in set(make_docs(30, seed=4))]
    assert positions[0] < len(docs) // 5 and positions[-1] > len(docs) // 2  # b is spread, not appended


def test_all_source_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = make_docs(60, seed=5)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "one.txt").write_text(docs[0], encoding="utf-8")
    (tree / "sub" / "two.md").write_text(docs[1], encoding="utf-8")
    with gzip.open(tree / "sub" / "deeper" / "three.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[2])
    (tree / "sub" / "skip.txt").write_text("EXCLUDED", encoding="utf-8")
    (tree / "image.png").write_bytes(b"\x89PNG not text")  # not matched by the default globs
    (tree / ".hidden.txt").write_text("HIDDEN", encoding="utf-8")
    write_jsonl(tree / "sub" / "four.jsonl.gz", docs[3:10], field="content")
    pq.write_table(pa.table({"content": docs[10:20], "n": list(range(10))}), tmp_path / "five.parquet")
    datasets.Dataset.from_dict({"content": docs[20:30]}).save_to_disk(str(tmp_path / "hf_single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs[30:45]}),
                          "test": datasets.Dataset.from_dict({"content": ["TEST SPLIT"]})}
                         ).save_to_disk(str(tmp_path / "hf_dict"))
    manifest, out = run(tmp_path, [tree, tmp_path / "five.parquet", tmp_path / "hf_single", tmp_path / "hf_dict"],
                        text_field="content", exclude=("sub/skip.*",))
    got = decode_split(out, "train")
    assert sorted(got) == sorted(docs[:45])
    assert [s["kind"] for s in manifest["sources"]] == ["dir", "parquet", "hf", "hf"]
    assert manifest["sources"][0]["files"] == 4
    # Order within the parquet source is kept.
    assert [d for d in got if d in docs[10:20]] == docs[10:20]


def test_directory_file_order_shuffled_by_seed(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    docs = make_docs(20, seed=6)
    for i, d in enumerate(docs):
        (tree / f"{i:03d}.txt").write_text(d, encoding="utf-8")

    def order(seed):
        out = tmp_path / f"o{seed}"
        prepare(PrepareOptions(sources=[str(tree)], out=out, vocab_size=300, val_tokens=0, seed=seed,
                               overwrite=True, progress=False))
        return decode_split(out, "train")

    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == sorted(docs) and order(1) != docs


def test_undecodable_bytes_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"valid start \xff\xfe middle \xc3 end")
    manifest, out = run(tmp_path, [tmp_path / "bad.txt"])
    assert decode_split(out, "train") == ["valid start \ufffd\ufffd middle \ufffd end"]
    assert manifest["report"]["undecodable_sequences_replaced"] == 3


def test_existing_tokenizer_and_uint32_shards(tmp_path):
    from tokenizers import models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    src = write_jsonl(tmp_path / "a.jsonl", ["hello world", "world world hello", "other"])
    manifest, out = run(tmp_path, [src], vocab_size=None, tokenizer=tmp_path / "big.json")
    shard = np.load(out / "train" / "shard_00000.npy")
    assert manifest["dtype"] == "uint32" and shard.dtype == np.uint32
    assert shard.tolist() == [2, 70000, 0, 70000, 70000, 2, 0, 1, 0]
    assert manifest["vocab_size"] == 70001 and manifest["model_vocab_size"] == 70016
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "big.json").read_bytes()


def test_max_tokens_stops_at_a_document_boundary(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(200, seed=7))
    manifest, out = run(tmp_path, [src], max_tokens=1000, val_tokens=50, batch_docs=16)
    train = manifest["splits"]["train"]
    assert 1000 <= train["tokens"] < 1000 + 200
    docs = decode_split(out, "val") + decode_split(out, "train")
    assert docs == make_docs(200, seed=7)[:len(docs)]


def test_overwrite_replaces_only_when_complete(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(50, seed=8))
    run(tmp_path, [src])
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    corrupt = tmp_path / "broken.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"text": "fine"}\n' * 50)[:-30])  # truncated gzip stream
    from lunaris.errors import DataError
    with pytest.raises(DataError, match="broken.jsonl.gz cannot be read"):
        run(tmp_path, [src, corrupt], overwrite=True)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before, "a failed run must not touch the old output"
    assert not list(tmp_path.glob(".out*")) and not list((tmp_path / "out").rglob("*.tmp"))
    _, out = run(tmp_path, [src], overwrite=True, vocab_size=280)
    assert read_manifest(out)["args"] == {} and (out / "manifest.json").read_bytes() != before


def test_cli_prints_vocab_size_and_writes_manifest(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(80, seed=9))
    code = main(["prepare", str(src), "--out", str(tmp_path / "cli"), "--vocab-size", "320", "--val-tokens", "100",
                 "--shard-tokens", "1000", "--no-progress"])
    assert code == 0
    manifest = read_manifest(tmp_path / "cli")
    printed = capsys.readouterr().out
    assert f"model.vocab_size: {manifest['model_vocab_size']}" in printed
    assert manifest["args"]["vocab_size"] == 320 and manifest["args"]["sources"] == [str(src)]
    assert (tmp_path / "cli" / "val" / "shard_00000.npy").is_file()


# ---- the validation split: 5% of the corpus, at most 1,000,000 tokens, unless --val-tokens says ------------------

def run_split(tmp_path, docs, name, **kwargs):
    """prepare `docs` (one JSONL file) into tmp_path/name; val_tokens as given, else the adaptive default."""
    src = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    options = PrepareOptions(sources=[str(src)], out=tmp_path / name, vocab_size=300, progress=False, **kwargs)
    return prepare(options), tmp_path / name


def split_tokens(manifest) -> tuple:
    return manifest["splits"].get("val", {}).get("tokens", 0), manifest["splits"]["train"]["tokens"]


def test_a_small_corpus_prepares_with_the_default_and_holds_out_five_per_cent(tmp_path, capsys):
    docs = make_docs(200, seed=3)
    src = write_jsonl(tmp_path / "small.jsonl", docs)
    out = tmp_path / "cli"
    assert main(["prepare", str(src), "--out", str(out), "--vocab-size", "300", "--no-progress"]) == 0
    manifest = read_manifest(out)
    val, train = split_tokens(manifest)
    total = val + train
    assert total < 1_000_000 and val > 0 and train > 0      # the old default (1M) took everything: an error
    longest = max(len(d) for d in docs) + 1                 # a document has at most as many tokens as characters
    assert 0.05 * total <= val < 0.05 * total + longest     # whole documents, the last one crossing 5%
    assert manifest["report"]["val_tokens"] == int(np.ceil(0.05 * total)) and manifest["report"]["val_tokens_automatic"]
    assert manifest["args"]["val_tokens"] is None
    printed = capsys.readouterr().out
    assert f"validation: {val:,} tokens ({100 * val / total:.1f}% of the corpus; whole documents" in printed
    assert "--val-tokens N to choose" in printed
    assert decode_split(out, "val") + decode_split(out, "train") == docs   # each once, in order


def test_a_corpus_over_the_cap_gets_exactly_the_fixed_split(tmp_path, monkeypatch):
    """Above cap / 5% tokens the default is the cap: the shards are byte for byte those of --val-tokens cap."""
    monkeypatch.setattr(prepare_module, "VAL_TOKENS_CAP", 100)
    docs = make_docs(150, seed=4)
    adaptive, out_a = run_split(tmp_path, docs, "a", shard_tokens=700)
    fixed, out_f = run_split(tmp_path, docs, "f", val_tokens=100, shard_tokens=700)
    assert sum(split_tokens(adaptive)) > 100 / 0.05
    assert adaptive["splits"] == fixed["splits"] and adaptive["report"]["val_tokens"] == 100
    for split in ("val", "train"):
        assert [f.read_bytes() for f in sorted((out_a / split).glob("*.npy"))] == \
               [f.read_bytes() for f in sorted((out_f / split).glob("*.npy"))]


def test_documents_held_back_past_the_budget_train_after_the_rest(tmp_path, monkeypatch):
    """Between the cap and cap / 5%: the first documents, up to the cap, wait in memory; those past 5% of the
    corpus go to the end of train. Nothing is lost or repeated."""
    docs = make_docs(150, seed=5)
    total = sum(split_tokens(run_split(tmp_path, docs, "all", val_tokens=0)[0]))
    monkeypatch.setattr(prepare_module, "VAL_TOKENS_CAP", total // 4)
    manifest, out = run_split(tmp_path, docs, "mid", shard_tokens=300, batch_docs=16)
    val, train = split_tokens(manifest)
    assert val + train == total and 0.05 * total <= val < total // 4
    val_docs, train_docs = decode_split(out, "val"), decode_split(out, "train")
    n_val = len(val_docs)
    assert val_docs == docs[:n_val]
    held = [k for k in range(n_val + 1, len(docs)) if train_docs == docs[k:] + docs[n_val:k]]
    assert len(held) == 1, "train is the documents after the held-back ones, then the held-back rest"


def test_max_tokens_still_ends_train_where_an_explicit_split_would(tmp_path):
    docs = make_docs(300, seed=6)
    manifest, _ = run_split(tmp_path, docs, "m", max_tokens=2000)
    val, train = split_tokens(manifest)
    assert 2000 <= train < 2000 + max(len(d) for d in docs) + 1
    assert val > 0 and manifest["report"]["val_tokens"] == int(np.ceil(2000 * 0.05 / 0.95))


def test_a_single_document_trains_and_the_report_says_so(tmp_path, capsys):
    src = write_jsonl(tmp_path / "one.jsonl", ["just one document, with a handful of words in it"])
    assert main(["prepare", str(src), "--out", str(tmp_path / "one"), "--vocab-size", "300", "--no-progress"]) == 0
    manifest = read_manifest(tmp_path / "one")
    assert "val" not in manifest["splits"] and manifest["splits"]["train"]["documents"] == 1
    assert "validation: 0 tokens (0.0% of the corpus; the corpus is a single document" in capsys.readouterr().out


def test_an_explicit_val_tokens_too_large_still_gives_the_clear_error(tmp_path, capsys):
    src = write_jsonl(tmp_path / "small.jsonl", make_docs(40, seed=7))
    assert main(["prepare", str(src), "--out", str(tmp_path / "o"), "--vocab-size", "300", "--no-progress",
                 "--val-tokens", "1000000"]) == 2
    err = capsys.readouterr().err
    assert "all of them went to the validation split (--val-tokens 1,000,000)" in err and "Lower --val-tokens" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("val_tokens", [0, 50])
def test_an_explicit_val_tokens_is_exact(tmp_path, val_tokens, capsys):
    manifest, _ = run_split(tmp_path, make_docs(80, seed=8), "x", val_tokens=val_tokens)
    val, _ = split_tokens(manifest)
    assert val == 0 if val_tokens == 0 else 50 <= val < 50 + 400
    assert manifest["report"]["val_tokens"] == val_tokens and not manifest["report"]["val_tokens_automatic"]
