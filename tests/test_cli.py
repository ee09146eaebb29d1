"""Command-line parsing: options that take values, exit statuses."""

import json

from lunaris.cli import main


def test_include_takes_one_glob_so_the_source_after_it_is_not_swallowed(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f():\n    return 1\n" * 50)
    (src / "b.txt").write_text("plain text " * 100)
    (src / "c.md").write_text("# notes " * 100)
    out = tmp_path / "out"
    assert main(["prepare", "--include", "*.py", str(src), "--out", str(out), "--vocab-size", "300",
                 "--val-tokens", "0", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"] > 0
    # several globs: the flag repeated, or comma-separated
    assert main(["prepare", "--include", "*.py,*.txt", "--include", "*.md", str(src), "--out", str(tmp_path / "o2"),
                 "--vocab-size", "300", "--val-tokens", "0", "--no-progress"]) == 0
    # the old multi-value form is a clear error that says what to write instead
    assert main(["prepare", "--include", "*.py", "*.txt", str(src), "--out", str(tmp_path / "o3"),
                 "--vocab-size", "300"]) == 2
    assert "looks like a file glob" in capsys.readouterr().err


def test_bare_lunaris_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: lunaris" in capsys.readouterr().err
