"""`lunaris prepare` on bad input: one clear DataError naming the file and what to do, nothing left behind."""

import json

import pytest

from lunaris.cli import main
from lunaris.data.prepare import PrepareOptions, prepare
from lunaris.errors import DataError


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def attempt(tmp_path, sources, **kwargs):
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("val_tokens", 0)
    prepare(PrepareOptions(sources=[str(s) for s in sources], out=tmp_path / "out", progress=False, **kwargs))


def good(tmp_path):
    return jsonl(tmp_path / "good.jsonl", [{"text": f"document number {i} with some words"} for i in range(20)])


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        attempt(tmp_path, [tmp_path / "nope.txt"])


def test_directory_without_matching_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"d has no files matching --include.*--include '\*'"):
        attempt(tmp_path, [tmp_path / "d"])


def test_bad_json_line_named(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl, line 2, is not valid JSON"):
        attempt(tmp_path, [src])


def test_missing_or_wrong_text_field(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match=r"line 1, has no field 'text' \(it has: content\).*--text-field"):
        attempt(tmp_path, [src])
    src = jsonl(tmp_path / "b.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: field 'text' holds int"):
        attempt(tmp_path, [src])


def test_parquet_missing_column_and_corrupt_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet has no column 'text' \(it has: body\)"):
        attempt(tmp_path, [tmp_path / "a.parquet"])
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"c\.parquet cannot be read"):
        attempt(tmp_path, [tmp_path / "c.parquet"])


def test_hf_dataset_wrong_split_or_column(tmp_path):
    import datasets
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf has splits validation, not 'train'.*--hf-split"):
        attempt(tmp_path, [tmp_path / "hf"])
    with pytest.raises(DataError, match=r"hf has no column 'body'"):
        attempt(tmp_path, [tmp_path / "hf"], hf_split="validation", text_field="body")


def test_corrupt_gzip_named(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    with pytest.raises(DataError, match=r"a\.txt\.gz cannot be read"):
        attempt(tmp_path, [tmp_path / "a.txt.gz"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_only_empty_documents(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": None}])
    with pytest.raises(DataError, match=r"contain no non-empty documents \(3 empty ones skipped\)"):
        attempt(tmp_path, [src])


def test_validation_takes_everything(tmp_path):
    with pytest.raises(DataError, match=r"all of them went to the validation split.*Lower --val-tokens"):
        attempt(tmp_path, [good(tmp_path)], val_tokens=10**9)


def test_option_problems_reported_together(tmp_path):
    src = good(tmp_path)
    with pytest.raises(DataError, match=r"exactly one of --vocab-size.*--weights has 2 value\(s\) for 1 source"):
        attempt(tmp_path, [src], vocab_size=None, weights=[1.0, 2.0])
    with pytest.raises(DataError, match=r"--weights must all be positive"):
        attempt(tmp_path, [src], weights=[0.0])
    with pytest.raises(DataError, match=r"--vocab-size must be at least 258"):
        attempt(tmp_path, [src], vocab_size=100)


def test_non_empty_out_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"out already exists and is not empty.*--overwrite"):
        attempt(tmp_path, [good(tmp_path)])
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_bad_tokenizer_files(tmp_path):
    src = good(tmp_path)
    with pytest.raises(DataError, match=r"missing\.json does not exist"):
        attempt(tmp_path, [src], vocab_size=None, tokenizer=tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match=r"junk\.json cannot be loaded"):
        attempt(tmp_path, [src], vocab_size=None, tokenizer=tmp_path / "junk.json")
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeot.json"))
    with pytest.raises(DataError, match=r"noeot\.json has no token '<\|endoftext\|>'.*--eot-token"):
        attempt(tmp_path, [src], vocab_size=None, tokenizer=tmp_path / "noeot.json")


def test_cli_error_is_one_paragraph_exit_2(tmp_path, capsys):
    code = main(["prepare", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o"), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: The source") and "absent.jsonl" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # argparse: --vocab-size and --tokenizer are mutually exclusive
        main(["prepare", "x", "--out", "o", "--vocab-size", "300", "--tokenizer", "t.json"])
