"""Property tests of label input: ``parse_label_list``, ``read_label_file`` and ``Segmenter.check_labels``.

Any string or file either gives a list of labels (trimmed, non-empty, unique, no control characters, at most
``MAX_LABEL_CHARS`` long) or is refused with a one-line ``InvalidInputError``.
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

from talk2dino.cli import parse_label_list, read_label_file  # noqa: E402
from talk2dino.errors import InvalidInputError  # noqa: E402
from talk2dino.predictor import MAX_LABEL_CHARS, Segmenter  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NASTY = st.sampled_from(["\x00", "\r", "\n", "\r\n", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff",
                         "\u200b", "\u00a0", "\u3000", ",", " ", "background", "\ud800", "\U0001f431", "cat", "#"])
LABEL_TEXT = st.lists(st.text(max_size=12) | NASTY, max_size=12).map("".join)


def check_vocabulary(names: list[str]) -> None:
    assert names and len(set(names)) == len(names)
    for name in names:
        assert isinstance(name, str) and name.strip() and len(name) <= MAX_LABEL_CHARS
        assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name)


def pipeline_from_text(text: str, background: bool) -> list[str]:
    return Segmenter.check_labels(parse_label_list(text), background=background)


@SETTINGS
@given(text=LABEL_TEXT, background=st.booleans())
def test_label_strings(text: str, background: bool) -> None:
    parsed = outcome(lambda: parse_label_list(text))
    if isinstance(parsed, InvalidInputError):
        return
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
