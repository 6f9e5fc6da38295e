"""Hostile labels (issue 14): labels the text encoder cannot tell apart, quoted commas, text that is not text,
more labels than a label PNG holds, and form fields that are not UTF-8. Each is refused with one line (CLI exit
2, HTTP 400) before any image is computed, instead of a silently wrong answer, a late failure or exit 3."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model_args, write_noise_image

from talk2dino import Segmenter
from talk2dino.cli import main
from talk2dino.errors import InvalidInputError
from talk2dino.labels import canonical_label, split_labels
from talk2dino.labels import split_labels as parse_label_list

# Pairs the CLIP tokenizer normalises to the same text: bit-identical embeddings before the fix.
SAME_TO_CLIP = [
    ("Person", "person"),
    ("Cat", "CAT"),
    ("caf\u00e9", "cafe\u0301"),  # NFC and NFD
    ("cat  dog", "cat dog"),
    ("cat\u00a0dog", "cat dog"),
    ("cat\u3000dog", "Cat Dog"),
    ("cat", " cat\u2003"),  # a JSON list keeps the blanks (an em space here)
    ("\u03a3\u0391\u03a3", "\u03c3\u03b1\u03c3"),  # the tokenizer lower-cases a character at a time: no final sigma
]
# Pairs that look alike but that CLIP tells apart: refusing them would lose a class.
TOLD_APART = [("\u03a3\u0391\u03a3", "\u03c3\u03b1\u03c2"), ("stra\u00dfe", "strasse"), ("\ufb01sh", "fish"),
              ("cat!!", "cat ! !"), ("cat\u200b", "cat")]
NOT_TEXT = [
    ("cat\udcff", "lone surrogate U+DCFF"),  # undecodable command-line bytes (surrogateescape)
    ("cat\ufffd", "U+FFFD"),
    ("a <|endoftext|>", "<|endoftext|>"),
    ("<|startoftext|>cat", "<|startoftext|>"),
]


def assert_one_line(err: BaseException, *fragments: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    for fragment in fragments:
        assert fragment in text, text


# ---------------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize(("text", "labels"), [
    ('"cat, dog", bird', ["cat, dog", "bird"]),
    ('bird, "cat, dog"', ["bird", "cat, dog"]),
    ('  "a ""quoted"" word" , b', ['a "quoted" word', "b"]),
    ('5" floppy, cat', ['5" floppy', "cat"]),  # a quote inside an unquoted label is kept
    (" cat ,  dining table,tv", ["cat", "dining table", "tv"]),
    ('"sky, blue"', ["sky, blue"]),
])
def test_quoted_labels_keep_their_commas(text: str, labels: list[str]) -> None:
    assert parse_label_list(text) == labels
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
    from talk2dino.server.uploads import parse_labels

    assert parse_labels(text) == labels


@pytest.mark.parametrize(("text", "fragment"), [
    ('"cat, dog', "never closed"),
    ('"cat" x, dog', "follows the quoted label"),
    ('"", cat', "entry 1 of 2 is empty"),
    ("cat,,dog", "entry 2 of 3 is empty"),
])
def test_quoting_mistakes_are_one_line(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        split_labels(text)
    assert_one_line(info.value, fragment, "--labels")


# ---------------------------------------------------------------------------------------------- check_labels
@pytest.mark.parametrize(("first", "second"), SAME_TO_CLIP)
def test_labels_the_encoder_cannot_tell_apart_are_refused(first: str, second: str) -> None:
    assert canonical_label(first) == canonical_label(second)
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(["tree", first, second], background=False)
    assert_one_line(info.value, "labels 2 ", " and 3 ", "same label to the text encoder")


def test_nfc_and_nfd_are_shown_by_code_point() -> None:
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(["caf\u00e9", "cafe\u0301"], background=False)
    assert_one_line(info.value, r"caf\xe9", r"cafe\u0301")


@pytest.mark.parametrize(("first", "second"), TOLD_APART)
def test_labels_the_encoder_tells_apart_are_kept(tiny_model, first: str, second: str) -> None:
    assert Segmenter.check_labels([first, second], background=False) == [first, second]
    embeddings = Segmenter(tiny_model).class_embeddings([first, second])
    assert not torch.equal(embeddings[0], embeddings[1])


@pytest.mark.parametrize(("label", "fragment"), NOT_TEXT)
def test_text_that_is_not_a_label_is_refused(label: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(["dog", label], background=False)
    assert_one_line(info.value, "label 2", fragment)


def test_background_in_another_case_or_spacing_clashes() -> None:
    with pytest.raises(InvalidInputError, match="clashes with the background channel"):
        Segmenter.check_labels(["cat", "\u3000BACKGROUND "], background=True)
    assert Segmenter.check_labels(["cat", "BACKGROUND"], background=False) == ["cat", "BACKGROUND"]


# ---------------------------------------------------------------------------------------------- same tokens
@pytest.mark.parametrize(("first", "second", "fragment"), [
    ("cat.", "cat .", "punctuation"),
    ("cat!", "cat !", "punctuation"),
    ("word " * 80 + "cat", "word " * 80 + "dog", "cut at the 77-token context"),
])
def test_labels_with_the_same_tokens_are_refused(tiny_model, first: str, second: str, fragment: str) -> None:
    segmenter = Segmenter(tiny_model)
    ids, _ = tiny_model.text_encoder.tokenize([f"a photo of a {first}.", f"a photo of a {second}."])
    assert torch.equal(ids[0], ids[1])  # why: the two would get bit-identical embeddings
    with pytest.raises(InvalidInputError) as info:
        segmenter.set_classes(["tree", first, second])
    assert_one_line(info.value, "labels 2 ", " and 3 ", fragment)
    segmenter.set_classes(["tree", first])  # each alone is fine


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_undecodable_label_bytes_exit_2_not_3(tiny_sources, tmp_path: Path, capsys) -> None:
    """`--labels $'cat\\xff'` arrives as a lone surrogate; it used to fail inside the tokenizer (exit 3)."""
    image = write_noise_image(tmp_path / "a.png")
    code = main(["segment", str(image), "--labels", "cat\udcff, dog", "--out", str(tmp_path / "out"),
                 *tiny_model_args(tiny_sources)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "lone surrogate U+DCFF" in err and "Traceback" not in err and "internal error" not in err


def test_cli_same_tokens_exit_2_before_any_image(tiny_sources, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    out = tmp_path / "out"
    code = main(["segment", str(image), "--labels", "cat., cat .", "--out", str(out),
                 *tiny_model_args(tiny_sources)])
    err = capsys.readouterr().err
    assert code == 2 and "same tokens to the text encoder" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_cli_quoted_label_with_a_comma(tiny_sources, tmp_path: Path) -> None:
    image = write_noise_image(tmp_path / "a.png")
    out = tmp_path / "out"
    code = main(["segment", str(image), "--labels", '"cat, dog", bird', "--out", str(out), "--no-pamr", "-q",
                 *tiny_model_args(tiny_sources)])
    assert code == 0
    summary = json.loads((out / "a.json").read_text())
    assert [entry["name"] for entry in summary["labels"]] == ["cat, dog", "bird"]


@pytest.mark.parametrize(("count", "background", "ok"), [(70_000, False, False), (65_537, False, False),
                                                         (65_536, True, False), (65_536, False, True),
                                                         (65_535, True, True), (1000, True, True)])
def test_cli_refuses_more_labels_than_a_label_png_holds_at_once(tiny_sources, tmp_path: Path, capsys,
                                                                monkeypatch, count: int, background: bool,
                                                                ok: bool) -> None:
    """1000 labels used to be computed for every image and then fail each one at the PNG (exit 0); now they are
    written as a 16-bit label PNG, and only more than a 16-bit PNG holds is refused, before the model loads."""
    import talk2dino.cli.segment as cli

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(count)), encoding="utf-8")
    image = write_noise_image(tmp_path / "a.png")

    def no_model(args: Any) -> None:
        raise AssertionError("the label count must be refused before the model loads")

    if not ok:
        monkeypatch.setattr(cli, "build_segmenter", no_model)
        code = main(["segment", str(image), "--labels-file", str(labels), "--out", str(tmp_path / "out"),
                     *(["--background"] if background else []), *tiny_model_args(tiny_sources)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{count:,} labels" in err and "65,536 a 16-bit label PNG holds" in err and "Traceback" not in err
    else:
        cli.check_label_count(count, background=background)  # accepted: no exception


# ---------------------------------------------------------------------------------------------- server
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")
pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

from test_server import FAST, LIMITS, WAIT_S, png_bytes, running_server  # noqa: E402

from talk2dino.server import create_app  # noqa: E402

BOUNDARY = "t2d-label-boundary"


def multipart(labels: bytes, charset: str = "") -> tuple[bytes, dict[str, str]]:
    """A /v1/segment body with raw `labels` bytes (httpx would encode a str itself) and a small PNG."""
    head = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n".encode()
    rest = (f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"pamr\"\r\n\r\nfalse\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    body = head + labels + rest + png_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}{charset}"}


def assert_400(response: Any, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_server_hostile_labels(tiny_model) -> None:
    app = create_app(Segmenter(tiny_model, FAST), LIMITS)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as client:
        def segment(labels: bytes, charset: str = "") -> Any:
            body, headers = multipart(labels, charset)
            return client.post("/v1/segment", content=body, headers=headers)

        def names(response: Any) -> list[str]:
            assert response.status_code == 200, response.text
            return [entry["name"] for entry in response.json()["labels"]]

        # Non-UTF-8 bytes used to become the label 'cat\xff\xfe' (Starlette's Latin-1 fallback).
        assert_400(segment(b"cat\xff\xfe"), "form field 'labels' is not UTF-8", "0xff at offset 3")
        assert_400(segment(b"cat, caf\xc3"), "not UTF-8")  # cut inside a character
        assert_400(segment(b"cat", "; charset=no-such-charset"), "unknown charset")
        assert names(segment("caf\u00e9, dog".encode())) == ["caf\u00e9", "dog"]
        assert names(segment("caf\u00e9".encode("latin-1"), "; charset=latin-1")) == ["caf\u00e9"]  # as declared
        # Raw bytes in a URL-encoded body became mojibake ('cafÃ©'); percent-encoded junk becomes U+FFFD.
        raw = client.post("/v1/segment", content=b"labels=caf\xc3\xa9&pamr=false",
                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert_400(raw, "raw byte 0xc3", "percent-encode")
        assert names(segment(b'"cat, dog", bird')) == ["cat, dog", "bird"]
        assert_400(segment(b"Person, person"), "same label to the text encoder")
        assert_400(segment(b"cat., cat ."), "same tokens to the text encoder")
        assert_400(segment("cat\ufffd".encode()), "U+FFFD")
        assert_400(segment(b"<|endoftext|>"), "special token")

        embed = client.post("/v1/embed-text", json={"labels": ["Cat", "cat"]})
        assert_400(embed, "same label to the text encoder")
        embed = client.post("/v1/embed-text", json={"labels": ["cat.", "cat ."]})
        assert_400(embed, "same tokens")
        # Bad UTF-8 in JSON: the hint names JSON, not multipart/form-data.
        embed = client.post("/v1/embed-text", content=b'{"labels": ["cat\xff"]}',
                            headers={"content-type": "application/json"})
        assert_400(embed, "UTF-8 JSON")
        assert "multipart" not in embed.json()["error"]
        # The connection and the worker are fine afterwards.
        assert names(segment(b"cat, dog")) == ["cat", "dog"]


def test_form_check_skips_file_parts_and_declared_charsets() -> None:
    """The check reads text parts only: image bytes (never UTF-8) pass, and a malformed body is Starlette's."""
    from talk2dino.server.formtext import _MultipartTextCheck

    body, _ = multipart(b"cat, dog")
    check = _MultipartTextCheck(BOUNDARY.encode())
    for start in range(0, len(body), 7):  # split anywhere, even inside a header or a character
        check.feed(body[start:start + 7])
    assert check.problem is None
    body, _ = multipart("caf\u00e9".encode())
    check = _MultipartTextCheck(BOUNDARY.encode())
    for start in range(0, len(body), 1):
        check.feed(body[start:start + 1])
    assert check.problem is None
    check = _MultipartTextCheck(b"x" * 300)  # python-multipart refuses such a boundary: no check, no crash
    check.feed(io.BytesIO(b"junk").read())
    assert check.problem is None
