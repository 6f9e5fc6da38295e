"""Property tests of label input: ``parse_label_list``, ``read_label_file`` and ``Segmenter.check_labels``.

Any string or file either gives a list of labels (trimmed, non-empty, unique, no control characters, at most
``MAX_LABEL_CHARS`` long, no two the text encoder cannot tell apart, no lone surrogate, U+FFFD or CLIP special
token text) or is refused with a one-line ``InvalidInputError``. Quoted ``--labels`` entries round-trip, and the
canonical form never merges two labels that the real CLIP tokenizer tells apart (issue 14).
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parser_fuzz_support import outcome  # noqa: E402

from talk2dino.cli.segment import read_label_file  # noqa: E402
from talk2dino.errors import InvalidInputError  # noqa: E402
from talk2dino.labels import SPECIAL_TOKEN_TEXTS, canonical_label, split_labels  # noqa: E402
from talk2dino.labels import split_labels as parse_label_list  # noqa: E402
from talk2dino.predictor import Segmenter  # noqa: E402
from talk2dino.vocabulary import MAX_LABEL_CHARS  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NASTY = st.sampled_from(["\x00", "\r", "\n", "\r\n", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff",
                         "\u200b", "\u00a0", "\u3000", ",", " ", "background", "\ud800", "\U0001f431", "cat", "#",
                         '"', '""', "CAT", "Cat", "e\u0301", "\u00e9", "\ufffd", "\udcff", "<|endoftext|>", "  "])
LABEL_TEXT = st.lists(st.text(max_size=12) | NASTY, max_size=12).map("".join)


def check_vocabulary(names: list[str]) -> None:
    assert names and len(set(names)) == len(names)
    for name in names:
        assert isinstance(name, str) and name.strip() and len(name) <= MAX_LABEL_CHARS
        assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") for ch in name)
        assert "\ufffd" not in name and not any(special in name for special in SPECIAL_TOKEN_TEXTS)
    assert len({canonical_label(name) for name in names}) == len(names)  # all distinguishable by the encoder


def pipeline_from_text(text: str, background: bool) -> list[str]:
    return Segmenter.check_labels(parse_label_list(text), background=background)


@SETTINGS
@given(text=LABEL_TEXT, background=st.booleans())
def test_label_strings(text: str, background: bool) -> None:
    parsed = outcome(lambda: parse_label_list(text))
    if isinstance(parsed, InvalidInputError):
        return
    if '"' not in text:
        assert parsed == [part.strip() for part in text.split(",")]
    result = outcome(lambda: Segmenter.check_labels(parsed, background=background))
    if not isinstance(result, InvalidInputError):
        check_vocabulary(result)
        assert result == parsed


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("labels")


@SETTINGS
@given(data=st.binary(max_size=256) | LABEL_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
       bom=st.booleans())
def test_label_files(scratch: Path, data: bytes, bom: bool) -> None:
    path = scratch / "labels.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    labels = outcome(lambda: read_label_file(str(path)))
    if isinstance(labels, InvalidInputError):
        assert "labels.txt" in str(labels)
        return
    # One leading byte-order mark is dropped (and only one: a second one is data, refused by check_labels).
    text = data.decode("utf-8") if bom else data.decode("utf-8-sig")
    # Lines starting with '#' (after blanks) are comments.
    assert labels == [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    result = outcome(lambda: Segmenter.check_labels(labels, background=False))
    if not isinstance(result, InvalidInputError):
        check_vocabulary(result)


@SETTINGS
@given(names=st.lists(st.text(max_size=20) | NASTY | st.integers() | st.none() | st.binary(max_size=4), max_size=20)
       | st.text(max_size=10), background=st.booleans())
def test_check_labels_any_sequence(names: object, background: bool) -> None:
    result = outcome(lambda: Segmenter.check_labels(names, background=background))  # type: ignore[arg-type]
    if not isinstance(result, InvalidInputError):
        check_vocabulary(result)
        assert result == list(names)  # type: ignore[call-overload]


@settings(max_examples=20, deadline=None)
@given(length=st.integers(MAX_LABEL_CHARS - 2, MAX_LABEL_CHARS + 2), count=st.integers(1, 10_000))
def test_long_labels_and_large_vocabularies(length: int, count: int) -> None:
    names = [f"{i}-" + "x" * (length - len(f"{i}-")) for i in range(count)]
    result = outcome(lambda: Segmenter.check_labels(names, background=False))
    assert isinstance(result, InvalidInputError) == (length > MAX_LABEL_CHARS)


def _quoted(label: str) -> str:
    return '"' + label.replace('"', '""') + '"'


@SETTINGS
@given(labels=st.lists(st.text(min_size=1, max_size=12) | NASTY, min_size=1, max_size=8),
       pad=st.sampled_from(["", " ", "  \t"]))
def test_quoted_labels_round_trip(labels: list[str], pad: str) -> None:
    """Any labels written CSV-style (each quoted, quotes doubled) come back verbatim, commas and all."""
    text = ",".join(pad + _quoted(label) + pad for label in labels)
    result = outcome(lambda: split_labels(text))
    if any(label == "" for label in labels):
        assert isinstance(result, InvalidInputError) and "is empty" in str(result)
    else:
        assert result == labels


@SETTINGS
@given(text=st.text(max_size=40))
def test_split_labels_never_raises_anything_else(text: str) -> None:
    result = outcome(lambda: split_labels(text))
    if isinstance(result, InvalidInputError):
        assert "\n" not in str(result) and "\r" not in str(result)
    else:
        assert result and all(result)


WORDS = st.text(st.sampled_from("abcXYZ \u00a0\t.é\u0301ßﬁ!'"), min_size=1, max_size=10)


def _variant(text: str, how: str) -> str:
    return {"upper": text.upper(), "title": text.title(), "nfd": unicodedata.normalize("NFD", text),
            "nfc": unicodedata.normalize("NFC", text), "spaces": text.replace(" ", "  \u00a0"),
            "pad": f" {text}\u3000"}[how]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from conftest import BPE, write_clip_tokenizer  # tests/ is on sys.path under pytest's rootdir conftest

    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary missing: {BPE}")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@SETTINGS
@given(text=WORDS, how=st.sampled_from(["upper", "title", "nfd", "nfc", "spaces", "pad"]))
def test_canonical_form_matches_the_clip_tokenizer(clip_tokenizer, text: str, how: str) -> None:  # type: ignore[no-untyped-def]
    """Labels with one canonical form are the same tokens to CLIP (so refusing them loses nothing), and
    check_labels refuses such a pair unless the two are identical.

    Tokenised on their own: inside a template, blanks at a label's ends can still separate its punctuation from
    the template's (``"a ."`` + ``"."`` is ``..``, one token); check_labels trims them anyway, on purpose.
    """
    other = _variant(text, how)
    if canonical_label(text) != canonical_label(other) or not canonical_label(text):
        return
    ids = clip_tokenizer([text, other])["input_ids"]
    assert ids[0] == ids[1], (text, other)
    result = outcome(lambda: Segmenter.check_labels([text, other], background=False))
    if text.strip() and other != text:
        assert isinstance(result, InvalidInputError)
