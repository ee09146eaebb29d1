"""ShardDataset: windows stitched across shards, padding of the last window, directory layouts, bad shards."""

import json

import numpy as np
import pytest
import torch

from lunaris.data import ShardDataset, check_vocab, read_manifest, resolve_data_dirs, split_info, tokenizer_path
from lunaris.errors import DataError
from lunaris.runtime import file_sha256


def write_shards(directory, sizes, dtype=np.uint16, start=0):
    """Shards holding the consecutive ids start, start+1, ... so any window is easy to predict."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = np.arange(start, start + sum(sizes)) % 60000
    pos = 0
    for k, n in enumerate(sizes):
        np.save(directory / f"shard_{k:05d}.npy", stream[pos:pos + n].astype(dtype))
        pos += n
    return stream


def write_prepared(root, train_sizes=(50, 30), val_sizes=(20,)):
    """A directory in the `lunaris prepare` layout, with a correct manifest."""
    splits = {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        write_shards(root / split, sizes, start=1000 if split == "val" else 0)
        files = sorted((root / split).glob("*.npy"))
        splits[split] = {"documents": 3, "tokens": sum(sizes), "bytes": 4 * sum(sizes),
                         "shards": [{"file": f.name, "tokens": int(n), "sha256": file_sha256(f)}
                                    for f, n in zip(files, sizes)]}
    (root / "tokenizer.json").write_text("{}")
    manifest = {"format_version": 1, "vocab_size": 2000, "model_vocab_size": 2048, "eot_id": 0, "dtype": "uint16",
                "tokenizer_sha256": "x", "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_windows_are_consecutive_and_share_one_token(tmp_path):
    stream = write_shards(tmp_path, [25, 25])
    ds = ShardDataset(tmp_path, 8)
    assert len(ds) == 7  # ceil((50 - 1) / 8)
    for i in range(6):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8,)
        assert x.tolist() == stream[8 * i:8 * i + 8].tolist()
        assert y.tolist() == stream[8 * i + 1:8 * i + 9].tolist()


def test_window_crossing_shard_boundaries_equals_concatenation(tmp_path):
    # 3 shards of 5, 3 and 9 tokens: window 0 of length 10 spans the first two and part of the third.
    write_shards(tmp_path, [5, 3, 9])
    shards = [np.load(p) for p in sorted(tmp_path.glob("*.npy"))]
    joined = np.concatenate(shards).astype(np.int64)
    ds = ShardDataset(tmp_path, 10)
    x, y = ds[0]
    assert torch.equal(x, torch.from_numpy(joined[:10]))
    assert torch.equal(y, torch.from_numpy(joined[1:11]))


def test_only_last_window_padded_with_minus_one_targets_in_int64(tmp_path):
    # uint16 ids near the top of the range: 65535 must never appear as padding.
    tmp_path.mkdir(exist_ok=True)
    ids = np.array([65530, 65531, 65532, 65533, 65534, 7, 8, 9, 10, 11, 12], dtype=np.uint16)  # 11 tokens
    np.save(tmp_path / "a.npy", ids[:6])
    np.save(tmp_path / "b.npy", ids[6:])
    ds = ShardDataset(tmp_path, 4)
    assert len(ds) == 3  # ceil(10 / 4): windows start at 0, 4, 8
    x0, y0 = ds[1]  # a full window keeps real ids near the top of the uint16 range
    assert x0.tolist() == [65534, 7, 8, 9] and y0.tolist() == [7, 8, 9, 10]
    x, y = ds[2]  # tokens 8..10 exist: x = [10, 11, 12, pad], y = [11, 12, -1, -1]
    assert x.tolist() == [10, 11, 12, 0]
    assert y.tolist() == [11, 12, -1, -1]
    bx, by = ds.get_batch(range(len(ds)))
    assert not (bx == 65535).any() and not (by == 65535).any()
    assert (by == -1).sum() == 2  # padding only in the final window
    assert ds[-1][1].tolist() == y.tolist()


def test_exact_multiple_has_no_padding_and_uint32(tmp_path):
    stream = write_shards(tmp_path, [9], dtype=np.uint32, start=70000)
    ds = ShardDataset(tmp_path, 4)  # 9 tokens = 2 full windows of 4 (+1 shared)
    assert len(ds) == 2
    _, y = ds.get_batch([0, 1])
    assert (y >= 0).all()
    assert y[1].tolist() == (stream[5:9]).tolist()


def test_prepared_layout_uses_train_and_manifest(tmp_path):
    write_prepared(tmp_path)
    ds = ShardDataset(tmp_path, 10)
    assert ds.data_dir == tmp_path / "train" and ds.num_tokens == 80
    val = ShardDataset(tmp_path / "val", 10)
    assert val.num_tokens == 20 and val[0][0][0].item() == 1000
    assert resolve_data_dirs(tmp_path) == (tmp_path / "train", tmp_path / "val")
    assert resolve_data_dirs(tmp_path, tmp_path) == (tmp_path / "train", tmp_path / "val")
    assert tokenizer_path(tmp_path) == tokenizer_path(tmp_path / "val") == tmp_path / "tokenizer.json"
    assert read_manifest(tmp_path / "train")["vocab_size"] == 2000
    assert split_info(tmp_path / "val")["tokens"] == 20
    flat = tmp_path / "flat"
    write_shards(flat, [10])
    assert resolve_data_dirs(flat) == (flat, None)
    assert resolve_data_dirs(flat, tmp_path / "val") == (flat, tmp_path / "val")
    assert tokenizer_path(flat) is None and read_manifest(flat) is None


def test_manifest_mismatch_detected(tmp_path):
    write_prepared(tmp_path)
    shard = tmp_path / "train" / "shard_00001.npy"
    np.save(shard, np.arange(30, dtype=np.uint16)[::-1].copy())  # same length, different content
    ShardDataset(tmp_path, 10)  # size check passes: cheap by default
    with pytest.raises(DataError, match="sha256 of shard_00001.npy"):
        ShardDataset(tmp_path, 10, verify="full")
    np.save(shard, np.arange(31, dtype=np.uint16))
    with pytest.raises(DataError, match="shard_00001.npy has 31 tokens, the manifest says 30"):
        ShardDataset(tmp_path, 10)
    ShardDataset(tmp_path, 10, verify="none")
    shard.unlink()
    with pytest.raises(DataError, match="shard_00001.npy are missing"):
        ShardDataset(tmp_path, 10)
    np.save(tmp_path / "train" / "shard_00001.npy", np.arange(30, dtype=np.uint16))
    np.save(tmp_path / "train" / "extra.npy", np.arange(3, dtype=np.uint16))
    with pytest.raises(DataError, match="extra.npy are not in the manifest"):
        ShardDataset(tmp_path, 10)


@pytest.mark.parametrize("case, pattern", [
    ("missing", "does not exist"),
    ("empty", "has no .npy token shards.* is empty"),
    ("no_npy", "has no .npy token shards.*notes.txt"),
    ("truncated", "not a valid .npy file or is truncated"),
    ("garbage", "not a valid .npy file or is truncated"),
    ("float", "holds float32 values"),
    ("signed", "holds int64 values"),
    ("2d", r"has shape \(4, 5\)"),
    ("file", "is a file, not a directory"),
    ("one_token", "at least 2"),
])
def test_bad_shard_directories_give_clear_errors(tmp_path, case, pattern):
    d = tmp_path / "data"
    if case != "missing":
        d.mkdir()
    good = np.arange(100, dtype=np.uint16)
    if case == "no_npy":
        (d / "notes.txt").write_text("hi")
    elif case == "truncated":
        np.save(d / "a.npy", good)
        raw = (d / "a.npy").read_bytes()
        (d / "a.npy").write_bytes(raw[:-40])
    elif case == "garbage":
        (d / "a.npy").write_bytes(b"not numpy at all")
    elif case == "float":
        np.save(d / "a.npy", good.astype(np.float32))
    elif case == "signed":
        np.save(d / "a.npy", good.astype(np.int64))
    elif case == "2d":
        np.save(d / "a.npy", good[:20].reshape(4, 5))
    elif case == "file":
        d.rmdir()
        d.write_text("x")
    elif case == "one_token":
        np.save(d / "a.npy", good[:1])
    with pytest.raises(DataError, match=pattern) as info:
        ShardDataset(d, 8)
    assert str(d) in str(info.value)


def test_check_vocab_flat_and_manifest(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "a.npy", np.array([1, 2, 3], dtype=np.uint16))
    np.save(flat / "b.npy", np.array([5, 300, 4], dtype=np.uint16))
    check_vocab(flat, 301)
    with pytest.raises(DataError, match=r"b\.npy contains token id 300.*vocab_size is 300"):
        check_vocab(flat, 300)
    prepared = tmp_path / "prepared"
    write_prepared(prepared)
    check_vocab(prepared, 2048)
    check_vocab(prepared / "val", 2000)
    with pytest.raises(DataError, match="2,000-id vocabulary.*at least 2,048"):
        check_vocab(prepared, 1999)


def test_dataset_pickles_without_token_data(tmp_path):
    import pickle
    write_shards(tmp_path, [100_000])
    ds = ShardDataset(tmp_path, 16)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert torch.equal(clone[5][0], ds[5][0])
