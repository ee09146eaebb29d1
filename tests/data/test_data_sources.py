"""Reading sources: undecodable bytes and lone surrogates are replaced and counted per run, never globally."""

import json

from lunaris.data.sources import MixStats, Source, mix_documents


def test_decode_counts_only_replacements():
    stats = MixStats()
    assert stats.decode(b"plain \xef\xbf\xbd text") == "plain \ufffd text" and stats.replaced == 0
    assert stats.decode(b"a \xff\xfe b \xc3 c \xef\xbf\xbd d \xe2\xef\xbf\xbd") == \
        "a \ufffd\ufffd b \ufffd c \ufffd d \ufffd\ufffd"
    assert stats.replaced == 4  # the valid U+FFFD characters of the input are not counted


def test_lone_surrogates_replaced_and_counted():
    stats = MixStats()
    assert stats.utf8_size("ok") == ("ok", 2) and stats.utf8_size("über") == ("über", 5)
    assert stats.utf8_size("a\ud800\udc00b\udfffc") == ("a\ufffdb\ufffdc", 9)  # one U+FFFD per run
    assert stats.replaced == 2


def test_counts_belong_to_each_pass(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"x \xff y")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "lone \ud800 surrogate"}) + "\n", encoding="utf-8")
    sources = [Source(tmp_path / "bad.txt"), Source(tmp_path / "a.jsonl")]
    first, second = MixStats(), MixStats()
    docs = list(mix_documents(sources, False, first))
    assert [text for _, text, _ in docs] == ["x \ufffd y", "lone \ufffd surrogate"] and first.replaced == 2
    list(mix_documents(sources, False, second))
    assert first.replaced == 2 and second.replaced == 2
