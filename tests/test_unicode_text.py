"""toolbox/unicode_text.py is what OpenAI's tokenizer gets from ftfy: fix_text equals ftfy's, character for
character. (clip_min.clean, which calls it, and the pre-tokenizer's use of `category` are tested in
test_clip_min.py against OpenAI's own cleaning and `regex` pattern.)"""

import pytest

from toolbox import unicode_text


def test_fix_text_is_ftfy_without_mojibake_repair(monkeypatch):
    """clean's ftfy part equals ftfy.fix_text(fix_encoding=False) on every text, character for character."""
    ftfy = pytest.importorskip("ftfy")
    from make_fixtures import PIECES, random_corpus

    texts = [p for kind in PIECES.values() for p in kind] + random_corpus(2000, seed=2)
    assert [t for t in texts if unicode_text.fix_text(t) != ftfy.fix_text(t, fix_encoding=False)] == []
    # ftfy cuts lines longer than its max_decode_length (10^6) into segments: shown here with segments of 5
    monkeypatch.setattr(unicode_text, "FTFY_SEGMENT", 5)
    texts = random_corpus(500, seed=3)
    assert [t for t in texts if unicode_text.fix_text(t) != ftfy.fix_text(t, fix_encoding=False, max_decode_length=5)
            ] == []
