"""Write the fuzzing regression corpus under ``tests/fuzz/corpus/`` (deterministic; rerun after editing).

    python tests/fuzz/make_corpus.py            # rewrite the generated files
    python tests/fuzz/make_corpus.py --check    # exit 1 if the committed corpus differs from what this writes

Groups and layout (see ``test_corpus.py`` for the outcome each group must have):

- ``images/*``: files for ``load_image``. ``bad_*`` must raise ``InvalidInputError``; ``ok_*`` are odd but valid
  images (EXIF orientation, CMYK, 16-bit, float, palette with transparency ...) that must decode.
- ``labels/files/*``: labels files for ``read_label_file`` followed by ``Segmenter.check_labels``;
  ``labels/strings/*``: ``--labels`` strings (UTF-8 files) for ``parse_label_list`` + ``check_labels``. All bad.
- ``datasets/classes/*`` (``read_class_names_file``), ``datasets/label_png/*`` (``load_label`` with 3 classes),
  ``datasets/captions/*.json`` (``read_coco_captions``), ``datasets/coco_json/*.json`` (``CocoStuffThingPainter``),
  ``datasets/names/*`` (``read_numbered_names_file``), ``datasets/folders/<case>/`` (``folder_benchmark`` +
  ``list_samples``). All bad.
- ``shards/files/*.safetensors`` (``read_shard`` with the image keys) and ``shards/folders/<case>/`` (a features
  folder for ``load_features`` and ``iter_shards``). All bad.

Inputs found by fuzzing live under ``<group>/found/`` and are copied there by hand, never by this script (which
only rewrites the folders it owns): ``bad_*`` files are raw parser inputs (replayed like the group's other bad
inputs), ``atheris_*`` files are harness inputs as atheris saved them (first byte = parser selector, replayed
through the harness's ``test_one_input``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import re
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

logger = logging.getLogger("make_corpus")

CORPUS = Path(__file__).resolve().parent / "corpus"
GENERATED = ("images", "labels/files", "labels/strings", "datasets/classes", "datasets/label_png",
             "datasets/captions", "datasets/coco_json", "datasets/names", "datasets/folders", "shards/files",
             "shards/folders")
SEED = 20261125


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def _gradient(height: int = 12, width: int = 10) -> np.ndarray:
    return (np.arange(height * width * 3) % 251).astype(np.uint8).reshape(height, width, 3)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """``image`` saved in ``fmt`` as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small valid images in many formats and modes: the seeds that mutations start from."""
    rgb = Image.fromarray(_gradient())
    gray16 = Image.fromarray(_gradient()[:, :, 0].astype(np.uint16) * 257)
    floats = Image.fromarray(_gradient()[:, :, 0].astype(np.float32) / 255.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    seeds = {
        "png_rgb.png": encode(rgb, "PNG"),
        "png_p.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "png_la.png": encode(rgb.convert("LA"), "PNG"),
        "png_i16.png": encode(gray16, "PNG"),
        "png_1.png": encode(rgb.convert("1"), "PNG"),
        "png_rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "jpeg_rgb.jpg": encode(rgb, "JPEG", exif=exif),
        "jpeg_cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_l.jpg": encode(rgb.convert("L"), "JPEG"),
        "gif_p.gif": encode(rgb.convert("P"), "GIF"),
        "bmp_rgb.bmp": encode(rgb, "BMP"),
        "tiff_rgb.tif": encode(rgb, "TIFF"),
        "tiff_f.tif": encode(floats, "TIFF"),
        "tiff_i16.tif": encode(gray16, "TIFF"),
        "tiff_cmyk.tif": encode(rgb.convert("CMYK"), "TIFF"),
        "webp_rgba.webp": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "ppm_rgb.ppm": encode(rgb, "PPM"),
        "tga_rgb.tga": encode(rgb, "TGA"),
        "ico_rgba.ico": encode(rgb.convert("RGBA"), "ICO"),
        "pcx_rgb.pcx": encode(rgb, "PCX"),
    }
    return seeds


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, *, depth: int = 8, color: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` but whose data is tiny (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def bmp_with_header(width: int, height: int) -> bytes:
    """A 24-bit BMP header declaring ``width`` x ``height`` with only a few bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    body = info + b"\x00" * 48
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, 54) + body


def gif_with_header(width: int, height: int) -> bytes:
    """A GIF whose logical screen and first frame declare ``width`` x ``height``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00\x3b"
    return head + frame


def tiff_nan() -> bytes:
    """A float TIFF holding NaN and infinity (refused: no defined grey level)."""
    values = np.full((4, 4), np.nan, dtype=np.float32)
    values[0, 0] = np.inf
    return encode(Image.fromarray(values), "TIFF")


def jpeg_with_exif(exif_payload: bytes) -> bytes:
    """A JPEG with an APP1 segment holding ``exif_payload`` verbatim (malformed EXIF)."""
    base = encode(Image.fromarray(_gradient()), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif_payload) + 2) + exif_payload
    return base[:2] + app1 + base[2:]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One deterministic random mutation: truncation, byte flips, a spliced run or a repeated block."""
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and len(out) > 2:
        return bytes(out[: rng.randrange(1, len(out))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if kind == 2:
        start = rng.randrange(len(out))
        out[start:start + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        return bytes(out)
    start = rng.randrange(len(out))
    return bytes(out[:start] + out[start:start + 16] * 8 + out[start:])


def _fails_cleanly(check: Callable[[Path], object], data: bytes, suffix: str, scratch: Path) -> bool:
    """Whether ``check`` on ``data`` raises a one-line Talk2DinoError (what a kept bad input must do)."""
    from talk2dino.errors import Talk2DinoError

    path = scratch / f"probe{suffix}"
    path.write_bytes(data)
    try:
        check(path)
    except Talk2DinoError as exc:
        return len(str(exc).splitlines()) == 1
    return False


def image_cases(scratch: Path) -> dict[str, bytes]:
    """``images/``: hand-written bad files, mutated seeds that fail, and odd-but-valid ``ok_`` files."""
    from talk2dino.data.images import load_image

    seeds = seed_images()
    cases: dict[str, bytes] = {
        "bad_empty.png": b"",
        "bad_text.jpg": b"this is not an image\n",
        "bad_html.png": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "bad_svg.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "bad_pdf.jpg": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
        "bad_zip.png": b"PK\x03\x04" + b"\x00" * 26,
        "bad_npy.png": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
        "bad_heic.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        "bad_png_signature_only.png": b"\x89PNG\r\n\x1a\n",
        "bad_jpeg_soi_only.jpg": b"\xff\xd8",
        "bad_jpeg_soi_eoi.jpg": b"\xff\xd8\xff\xd9",
        "bad_gif_signature_only.gif": b"GIF89a",
        "bad_bmp_signature_only.bmp": b"BM",
        "bad_riff_webp_header.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 \x00\x00\x00\x00",
        "bad_tiff_header_only.tif": b"II*\x00\x08\x00\x00\x00",
        "bad_random_bytes_1.png": random.Random(1).randbytes(256),
        "bad_random_bytes_2.jpg": random.Random(2).randbytes(1024),
        "bad_nul_bytes.png": b"\x00" * 512,
        "bad_bomb_png_100000x100000.png": png_with_header(100_000, 100_000),
        "bad_bomb_png_20000x20000.png": png_with_header(20_000, 20_000),
        "bad_bomb_png_16bit_15000x15000.png": png_with_header(15_000, 15_000, depth=16),
        "bad_bomb_gif_65535x65535.gif": gif_with_header(65_535, 65_535),
        "bad_bomb_bmp_30000x30000.bmp": bmp_with_header(30_000, 30_000),
        "bad_png_1x1.png": encode(Image.new("RGB", (1, 1)), "PNG"),
        "bad_png_1x500.png": encode(Image.new("RGB", (1, 500)), "PNG"),
        "bad_png_500x1.png": encode(Image.new("L", (500, 1)), "PNG"),
        "bad_png_zero_width.png": png_with_header(0, 10),
        "bad_png_bad_ihdr_crc.png": png_with_header(10, 10)[:29] + b"\x00\x00\x00\x00" + png_with_header(10, 10)[33:],
        "bad_png_garbage_idat.png": png_with_header(10, 10, idat=b"not zlib at all"),
        "bad_png_bad_color_type.png": png_with_header(10, 10, color=5),
        "bad_png_bad_depth.png": png_with_header(10, 10, depth=7),
        "bad_tiff_nan.tif": tiff_nan(),
        "bad_dds_unimplemented_pixel_format.dds": b"DDS |\x00\x00\x00\x07\x10\x00\x00\x0c\x00\x00\x00\x0a"
                                                  + b"\x00" * 59 + b" \x00\x00\x00" + b"\x00" * 48,
    }
    for name, data in sorted(seeds.items()):
        for cut in (0.1, 0.5, 0.9):
            truncated = data[: max(1, int(len(data) * cut))]
            # Some formats keep decodable pixels in their first 90 % (e.g. ICO padding); keep real failures only.
            if _fails_cleanly(load_image, truncated, Path(name).suffix, scratch):
                cases[f"bad_truncated_{int(cut * 100)}pct_{name}"] = truncated
    rng = random.Random(SEED)
    names = sorted(seeds)
    kept = 0
    tries = 0
    while kept < 30 and tries < 3000:
        tries += 1
        name = rng.choice(names)
        data = mutate(seeds[name], rng)
        if _fails_cleanly(load_image, data, Path(name).suffix, scratch):
            cases[f"bad_mutated_{kept:02d}_{name}"] = data
            kept += 1
    # Odd but valid inputs: they must decode to HxWx3 uint8.
    for name, data in seeds.items():
        cases[f"ok_{name}"] = data
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"ok_exif_orientation_{orientation}.jpg"] = encode(Image.fromarray(_gradient(8, 6)), "JPEG", exif=exif)
    cases["ok_exif_orientation_99.jpg"] = jpeg_with_exif(b"Exif\x00\x00" + encode_exif_orientation(99))
    cases["ok_exif_garbage.jpg"] = jpeg_with_exif(b"Exif\x00\x00garbage that is not a TIFF header")
    cases["ok_exif_truncated.jpg"] = jpeg_with_exif(b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00")
    cases["ok_exif_loop.jpg"] = jpeg_with_exif(b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00"
                                               + struct.pack("<HHII", 0x8769, 4, 1, 8) + struct.pack("<I", 8))
    cases["ok_png_2x2.png"] = encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG")
    # Thinner than 1:4096: its resize target rounded to 0 rows and segment failed without naming it (issue 14).
    cases["ok_png_3x40000.png"] = encode(Image.new("L", (40000, 3), 77), "PNG")
    cases["ok_tiff_f_outside_unit.tif"] = encode(Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32)), "TIFF")
    return cases


def encode_exif_orientation(value: int) -> bytes:
    """A little-endian TIFF/EXIF block whose only tag is Orientation = ``value``."""
    return b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", 0x0112, 3, 1, value, 0) + b"\x00\x00\x00\x00"


# ----------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------


def label_file_cases() -> dict[str, bytes]:
    """``labels/files/``: labels files that read_label_file or check_labels must refuse."""
    return {
        "empty.txt": b"",
        "only_newlines.txt": b"\n\n\n",
        "only_crlf.txt": b"\r\n\r\n",
        "only_spaces.txt": b"   \n\t\n  \r\n",
        "bom_only.txt": b"\xef\xbb\xbf",
        "bom_and_blank.txt": b"\xef\xbb\xbf\n  \n",
        "invalid_utf8_ff.txt": b"cat\n\xff\ndog\n",
        "invalid_utf8_truncated.txt": b"cat\ncaf\xc3",
        "invalid_utf8_overlong.txt": b"cat\n\xc0\xafdog\n",
        "invalid_utf8_surrogate.txt": b"cat\n\xed\xa0\x80\n",
        "latin1.txt": "caf\u00e9\nna\u00efve\n".encode("latin-1"),
        "utf16_le_bom.txt": "cat\ndog\n".encode("utf-16"),
        "utf16_be.txt": "cat\ndog\n".encode("utf-16-be"),
        "duplicate.txt": b"cat\ndog\ncat\n",
        "duplicate_after_trim.txt": b"cat\n  cat  \n",
        "duplicate_crlf.txt": b"cat\r\ndog\r\ncat\r\n",
        "duplicate_bom.txt": b"\xef\xbb\xbfcat\ncat\n",
        "nul_in_label.txt": b"cat\nd\x00og\n",
        "nul_only.txt": b"\x00\n",
        "escape_sequence.txt": b"cat\n\x1b[31mred\x1b[0m\n",
        "bell.txt": b"cat\ndo\x07g\n",
        "tab_inside.txt": b"sky\tblue\n",
        "del_char.txt": b"cat\x7f\n",
        "c1_control.txt": "cat\u0085dog\u0080\n".encode(),
        "long_label_1001.txt": b"a" * 1001 + b"\n",
        "long_label_5000_multibyte.txt": "\u732b".encode() * 5000 + b"\n",
        "png_bytes.txt": encode(Image.new("RGB", (4, 4)), "PNG"),
        "gzip_bytes.txt": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\x00" * 10,
        "many_duplicates.txt": b"".join(b"class%d\n" % (i % 100) for i in range(1000)),
        "zero_width_space_only.txt": "\u200b\n".encode(),
        # Issue 14: labels the text encoder cannot tell apart, and text that is not a label.
        "case_duplicate.txt": b"Person\nperson\n",
        "nfd_duplicate.txt": "caf\u00e9\ncafe\u0301\n".encode(),
        "whitespace_run_duplicate.txt": b"cat  dog\ncat dog\n",
        "nbsp_duplicate.txt": "cat\u00a0dog\ncat dog\n".encode(),
        "replacement_char.txt": "cat\ufffd\ndog\n".encode(),
        "endoftext_token.txt": b"cat\n<|endoftext|>\n",
    }


def label_string_cases() -> dict[str, bytes]:
    """``labels/strings/``: ``--labels`` values that parse_label_list or check_labels must refuse."""
    strings = {
        "empty.txt": "",
        "comma.txt": ",",
        "commas.txt": ",,,",
        "spaces_commas.txt": " , , ",
        "empty_middle.txt": "cat,,dog",
        "trailing_comma.txt": "cat,dog,",
        "leading_comma.txt": ",cat",
        "duplicate.txt": "cat,cat",
        "duplicate_trim.txt": "cat, cat ",
        "nul.txt": "cat,\x00",
        "nul_inside.txt": "c\x00t,dog",
        "newline_inside.txt": "cat\ndog,bird",
        "crlf_inside.txt": "cat\r\ndog,bird",
        "tab_inside.txt": "sky\tblue,cat",
        "escape.txt": "\x1b[2J,cat",
        "line_separator.txt": "cat\u2028dog,bird",
        "paragraph_separator.txt": "cat\u2029dog",
        "long_1001.txt": "b" * 1001,
        "long_among_many.txt": "cat," + "x" * 2000 + ",dog",
        "many_with_duplicate.txt": ",".join([f"c{i}" for i in range(5000)] + ["c17"]),
        "only_whitespace_unicode.txt": "\u3000,\u00a0",
        "nbsp_only.txt": "\u00a0",
        "bom_only.txt": "\ufeff,cat",
        # Issue 14: labels the text encoder cannot tell apart, quoting mistakes, text that is not a label.
        "case_duplicate.txt": "Person, person",
        "case_triple.txt": "Cat, dog, CAT",
        "nfd_duplicate.txt": "caf\u00e9, cafe\u0301",
        "whitespace_run_duplicate.txt": "cat  dog, cat dog",
        "ideographic_space_duplicate.txt": "cat\u3000dog, cat dog",
        "background_upper.txt": "BACKGROUND, cat",
        "replacement_char.txt": "cat\ufffd, dog",
        "endoftext_token.txt": "a <|endoftext|>, dog",
        "startoftext_token.txt": "<|startoftext|>cat",
        "unclosed_quote.txt": '"cat, dog',
        "text_after_quote.txt": '"cat" x, dog',
        "empty_quoted.txt": '"", cat',
        "quoted_duplicate.txt": '"cat", cat',
    }
    return {name: text.encode("utf-8") for name, text in strings.items()}


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


def class_name_cases() -> dict[str, bytes]:
    """``datasets/classes/``: class-names files read_class_names_file must refuse."""
    return {
        "empty.txt": b"",
        "only_newline.txt": b"\n",
        "blank_middle.txt": b"cat\n\ndog\n",
        "whitespace_line.txt": b"cat\n   \ndog\n",
        "crlf_blank.txt": b"cat\r\n\r\ndog\r\n",
        "bom_only.txt": b"\xef\xbb\xbf",
        "invalid_utf8.txt": b"cat\n\xfe\xff\n",
        "utf16.txt": "cat\ndog\n".encode("utf-16"),
        "binary_png.txt": encode(Image.new("L", (3, 3)), "PNG"),
        "trailing_blank_lines.txt": b"cat\ndog\n\n\n",
    }


def _png_bytes(values: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(values) if mode is None else Image.fromarray(values).convert(mode)
    return encode(image, "PNG")


def label_png_cases() -> dict[str, bytes]:
    """``datasets/label_png/``: label maps that load_label (3 classes, ignore 255) must refuse."""
    ok = np.zeros((6, 5), dtype=np.uint8)
    valid = _png_bytes(ok)
    cases = {
        "empty.png": b"",
        "text.png": b"label map\n",
        "rgb.png": _png_bytes(np.zeros((6, 5, 3), dtype=np.uint8)),
        "rgba.png": _png_bytes(np.zeros((6, 5, 4), dtype=np.uint8)),
        "la.png": _png_bytes(ok, "LA"),
        "cmyk.jpg": encode(Image.fromarray(ok).convert("CMYK"), "JPEG"),
        "value_out_of_range.png": _png_bytes(np.full((6, 5), 7, dtype=np.uint8)),
        "value_254.png": _png_bytes(np.full((6, 5), 254, dtype=np.uint8)),
        "sixteen_bit_65535.png": _png_bytes(np.full((6, 5), 65535, dtype=np.uint16)),
        "sixteen_bit_256.png": _png_bytes(np.full((6, 5), 256, dtype=np.uint16)),
        "truncated_half.png": valid[: len(valid) // 2],
        "truncated_header.png": valid[:20],
        "bomb_header.png": png_with_header(30_000, 30_000, color=0),
        "garbage_idat.png": png_with_header(5, 6, color=0, idat=b"\x00garbage"),
        "float_tiff.tif": encode(Image.fromarray(np.zeros((6, 5), dtype=np.float32)), "TIFF"),
    }
    return cases


def caption_cases() -> dict[str, bytes]:
    """``datasets/captions/``: COCO captions JSONs read_coco_captions must refuse."""
    image = {"id": 1, "file_name": "a.jpg"}
    caption = {"id": 10, "image_id": 1, "caption": "a cat"}

    def doc(images: object = None, annotations: object = None, **extra: object) -> bytes:
        data: dict[str, object] = {"images": [image] if images is None else images,
                                   "annotations": [caption] if annotations is None else annotations}
        data.update(extra)
        return json.dumps(data).encode()

    return {
        "empty.json": b"",
        "not_json.json": b"{images: []}",
        "truncated.json": doc()[:-5],
        "top_list.json": b"[]",
        "top_string.json": b'"images"',
        "top_null.json": b"null",
        "no_images.json": json.dumps({"annotations": []}).encode(),
        "no_annotations.json": json.dumps({"images": []}).encode(),
        "images_object.json": doc(images={"1": image}),
        "annotations_string.json": doc(annotations="a cat"),
        "image_entry_list.json": doc(images=[[1, "a.jpg"]]),
        "image_entry_null.json": doc(images=[None]),
        "image_id_string.json": doc(images=[{"id": "1", "file_name": "a.jpg"}]),
        "image_id_bool.json": doc(images=[{"id": True, "file_name": "a.jpg"}]),
        "image_id_float.json": doc(images=[{"id": 1.5, "file_name": "a.jpg"}]),
        "image_id_nan.json": b'{"images": [{"id": NaN, "file_name": "a.jpg"}], "annotations": []}',
        "image_id_missing.json": doc(images=[{"file_name": "a.jpg"}]),
        "file_name_missing.json": doc(images=[{"id": 1}]),
        "file_name_int.json": doc(images=[{"id": 1, "file_name": 7}]),
        "file_name_empty.json": doc(images=[{"id": 1, "file_name": ""}]),
        "file_name_absolute.json": doc(images=[{"id": 1, "file_name": "/etc/passwd"}]),
        "file_name_traversal.json": doc(images=[{"id": 1, "file_name": "../../etc/passwd"}]),
        "file_name_nul.json": doc(images=[{"id": 1, "file_name": "a\u0000.jpg"}]),
        "duplicate_image_id.json": doc(images=[image, {"id": 1, "file_name": "b.jpg"}]),
        "caption_missing.json": doc(annotations=[{"id": 10, "image_id": 1}]),
        "caption_null.json": doc(annotations=[{"id": 10, "image_id": 1, "caption": None}]),
        "caption_list.json": doc(annotations=[{"id": 10, "image_id": 1, "caption": ["a", "cat"]}]),
        "caption_id_string.json": doc(annotations=[{"id": "10", "image_id": 1, "caption": "x"}]),
        "caption_image_id_huge_float.json": b'{"images": [], "annotations": [{"id": 1, "image_id": 1e400, '
                                            b'"caption": "x"}]}',
        "duplicate_caption_id.json": doc(annotations=[caption, dict(caption, caption="another")]),
        "annotation_entry_int.json": doc(annotations=[3]),
        "invalid_utf8.json": b'{"images": [{"id": 1, "file_name": "\xff.jpg"}], "annotations": []}',
        "deeply_nested.json": b'{"images": ' + b"[" * 5_000 + b"]" * 5_000 + b', "annotations": []}',
        "image_id_5000_digits.json": b'{"images": [{"id": ' + b"9" * 5000 + b', "file_name": "a.jpg"}], '
                                     b'"annotations": []}',
        "long_file_name_newline.json": doc(images=[{"id": 1, "file_name": "../" + "x\n" * 500}]),
        # Issue 14: a key given twice (json keeps the last silently: the real list, then an empty one).
        "duplicate_annotations_key.json": doc()[:-1] + b', "annotations": []}',
        "duplicate_images_key.json": doc()[:-1] + b', "images": []}',
        "duplicate_key_in_image.json": b'{"images": [{"id": 1, "file_name": "a.jpg", "id": 2}], '
                                       b'"annotations": [{"id": 10, "image_id": 2, "caption": "a cat"}]}',
        "duplicate_key_in_caption.json": b'{"images": [{"id": 1, "file_name": "a.jpg"}], '
                                         b'"annotations": [{"id": 10, "image_id": 1, "caption": "a cat", '
                                         b'"caption": ""}]}',
        # Ids outside int64 (or negative) used to fail only when the first shard was written.
        "image_id_1e30.json": doc(images=[{"id": 10**30, "file_name": "a.jpg"}],
                                  annotations=[dict(caption, image_id=10**30)]),
        "image_id_2_pow_63.json": doc(images=[{"id": 2**63, "file_name": "a.jpg"}],
                                      annotations=[dict(caption, image_id=2**63)]),
        "image_id_negative.json": doc(images=[{"id": -1, "file_name": "a.jpg"}],
                                      annotations=[dict(caption, image_id=-1)]),
        "caption_id_huge.json": doc(annotations=[dict(caption, id=10**20)]),
        "caption_id_negative.json": doc(annotations=[dict(caption, id=-10)]),
        "caption_id_bool.json": doc(annotations=[dict(caption, id=False)]),
        "caption_image_id_huge.json": doc(annotations=[dict(caption, image_id=2**64)]),
        # Nothing to extract: an error, not an empty success.
        "no_images_listed.json": doc(images=[], annotations=[]),
        "no_captions_listed.json": doc(annotations=[]),
        "only_empty_captions.json": doc(annotations=[dict(caption, caption="  \n ")]),
        "only_orphan_captions.json": doc(annotations=[dict(caption, image_id=2)]),
    }


def coco_json_cases() -> dict[str, bytes]:
    """``datasets/coco_json/``: instance/stuff JSONs CocoStuffThingPainter must refuse while indexing."""
    image = {"id": 1, "height": 4, "width": 5, "file_name": "a.jpg"}
    annotation = {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 3]]}

    def doc(images: object = None, annotations: object = None) -> bytes:
        return json.dumps({"images": [image] if images is None else images,
                           "annotations": [annotation] if annotations is None else annotations}).encode()

    return {
        "empty.json": b"",
        "top_list.json": b"[1, 2]",
        "no_annotations.json": json.dumps({"images": [image]}).encode(),
        "annotations_string.json": doc(annotations="abc"),
        "annotations_of_ints.json": doc(annotations=[1, 2]),
        "annotation_missing_segmentation.json": doc(annotations=[{"image_id": 1, "category_id": 3}]),
        "annotation_image_id_string.json": doc(annotations=[dict(annotation, image_id="one")]),
        "annotation_image_id_infinite.json": b'{"images": [], "annotations": [{"image_id": Infinity, '
                                             b'"category_id": 1, "segmentation": []}]}',
        "annotation_category_null.json": doc(annotations=[dict(annotation, category_id=None)]),
        "images_object.json": doc(images={"id": 1}),
        "image_entry_string.json": doc(images=["a.jpg"]),
        "image_no_height.json": doc(images=[{"id": 1, "width": 5}]),
        "image_height_string.json": doc(images=[dict(image, height="4")]),
        "image_negative_size.json": doc(images=[dict(image, height=-4)]),
        "image_zero_size.json": doc(images=[dict(image, width=0)]),
        "image_huge_size.json": doc(images=[dict(image, height=1_000_000, width=1_000_000)]),
        "image_size_nan.json": b'{"images": [{"id": 1, "height": NaN, "width": 5}], "annotations": []}',
        "image_conflicting_sizes.json": doc(images=[image, dict(image, height=9)]),
        "deeply_nested.json": b"[" * 5_000 + b"]" * 5_000,
        "invalid_utf8.json": b'{"annotations": [], "images": [{"id": 1, "file_name": "\xfe"}]}',
        "height_5000_digits.json": b'{"annotations": [], "images": [{"id": 1, "height": ' + b"7" * 5000
                                   + b', "width": 5}]}',
        # The real list first, an empty one last: json.loads would keep the empty one silently.
        "duplicate_annotations_key.json": doc()[:-1] + b', "annotations": []}',
    }


def names_cases() -> dict[str, bytes]:
    """``datasets/names/``: PASCAL-Context ``labels.txt`` files read_numbered_names_file must refuse."""
    return {
        "empty.txt": b"",
        "no_id.txt": b"aeroplane\n",
        "id_only.txt": b"1:\n",
        "duplicate_id.txt": b"1: cat\n1: dog\n",
        "huge_id.txt": b"9" * 5000 + b": cat\n",
        "arabic_indic_digits.txt": "\u0661: cat\n".encode(),
        "invalid_utf8.txt": b"1: caf\xe9\n",
        "negative_id.txt": b"-1: cat\n",
    }


def folder_cases() -> dict[str, dict[str, bytes]]:
    """``datasets/folders/<case>/``: dataset folders folder_benchmark + list_samples must refuse.

    Each case may hold ``classes.txt`` (default: two classes), ``split.txt`` (used as the split file when
    present) and files under ``images/`` and ``labels/``; a ``.keep`` file keeps an otherwise empty folder in git.
    """
    png = _png_bytes(np.zeros((4, 4), dtype=np.uint8))
    classes = b"background\ncat\n"
    return {
        "no_images_folder": {"classes.txt": classes, "labels/a.png": png},
        "no_labels_folder": {"classes.txt": classes, "images/a.png": png},
        "empty_images_folder": {"classes.txt": classes, "images/.keep": b"", "labels/.keep": b""},
        "only_hidden_images": {"classes.txt": classes, "images/._a.jpg": png, "labels/a.png": png},
        "missing_label": {"classes.txt": classes, "images/a.png": png, "images/b.png": png, "labels/a.png": png},
        "duplicate_stem": {"classes.txt": classes, "images/a.png": png, "images/a.jpg": png, "labels/a.png": png},
        "empty_classes": {"classes.txt": b"", "images/a.png": png, "labels/a.png": png},
        "blank_class_line": {"classes.txt": b"cat\n\ndog\n", "images/a.png": png, "labels/a.png": png},
        "split_missing_stem": {"classes.txt": classes, "split.txt": b"a\nzzz\n", "images/a.png": png,
                               "labels/a.png": png},
        "split_duplicate_stem": {"classes.txt": classes, "split.txt": b"a\na\n", "images/a.png": png,
                                 "labels/a.png": png},
        "split_traversal": {"classes.txt": classes, "split.txt": b"../../../etc/passwd\n", "images/a.png": png,
                            "labels/a.png": png},
        "split_absolute": {"classes.txt": classes, "split.txt": b"/etc/passwd\n", "images/a.png": png,
                           "labels/a.png": png},
        "split_invalid_utf8": {"classes.txt": classes, "split.txt": b"a\n\xff\xfe\n", "images/a.png": png,
                               "labels/a.png": png},
        "split_empty": {"classes.txt": classes, "split.txt": b"\n\n", "images/a.png": png, "labels/a.png": png},
        "split_nul": {"classes.txt": classes, "split.txt": b"a\x00b\n", "images/a.png": png, "labels/a.png": png},
        "split_long_stem": {"classes.txt": classes, "split.txt": b"x" * 5000 + b"\n", "images/a.png": png,
                            "labels/a.png": png},
        "label_is_folder": {"classes.txt": classes, "images/a.png": png, "labels/a.png/.keep": b""},
    }


# ----------------------------------------------------------------------------------------------------------
# Shards and manifests
# ----------------------------------------------------------------------------------------------------------


def image_tensors(n: int = 2, heads: int = 2, dim: int = 4, first_id: int = 1) -> dict[str, torch.Tensor]:
    """A valid image shard's tensors."""
    g = torch.Generator().manual_seed(n * 100 + first_id)
    return {
        "image_ids": torch.arange(first_id, first_id + n, dtype=torch.int64),
        "heads": torch.randn(n, heads, dim, generator=g).to(torch.float16),
        "mean_heads": torch.randn(n, dim, generator=g).to(torch.float16),
        "cls": torch.randn(n, dim, generator=g).to(torch.float16),
    }


def caption_tensors(image_ids: list[int], first_id: int = 100) -> dict[str, torch.Tensor]:
    """A valid caption shard's tensors (one caption per image id)."""
    g = torch.Generator().manual_seed(first_id)
    n = len(image_ids)
    return {
        "caption_ids": torch.arange(first_id, first_id + n, dtype=torch.int64),
        "image_ids": torch.tensor(image_ids, dtype=torch.int64),
        "text": torch.randn(n, 512, generator=g).to(torch.float16),
    }


def manifest(images: list[tuple[str, bytes]], captions: list[tuple[str, bytes]], **overrides: object) -> bytes:
    """A manifest listing shard files (name, bytes) with their true sha256; ``overrides`` replace keys."""
    def entries(files: list[tuple[str, bytes]]) -> list[dict[str, object]]:
        return [{"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rank": 0,
                 "index": i} for i, (name, data) in enumerate(files)]

    data: dict[str, object] = {
        "format": "talk2dino-features/1", "complete": True,
        "backbone": {"embed_dim": 4, "num_heads": 2, "source": "tiny"},
        "image_shards": entries(images), "caption_shards": entries(captions),
    }
    data.update(overrides)
    return json.dumps(data, indent=1).encode()


def shard_file_cases() -> dict[str, bytes]:
    """``shards/files/``: image shard files read_shard must refuse (hand-written and mutated)."""
    good = image_tensors()
    valid = save(good)
    header_len = struct.unpack("<Q", valid[:8])[0]
    cases = {
        "empty.safetensors": b"",
        "short.safetensors": b"\x01\x02\x03",
        "header_len_huge.safetensors": struct.pack("<Q", 2**63) + b"{}",
        "header_len_past_end.safetensors": struct.pack("<Q", 10_000) + b"{}",
        "header_not_json.safetensors": struct.pack("<Q", 8) + b"not json",
        "header_list.safetensors": struct.pack("<Q", 2) + b"[]",
        "header_bad_dtype.safetensors": _raw_shard({"x": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, 1),
        "header_offsets_past_data.safetensors": _raw_shard({"x": {"dtype": "F16", "shape": [4],
                                                                  "data_offsets": [0, 800]}}, 8),
        "header_shape_mismatch.safetensors": _raw_shard({"x": {"dtype": "F16", "shape": [100],
                                                               "data_offsets": [0, 8]}}, 8),
        "header_negative_shape.safetensors": _raw_shard({"x": {"dtype": "F16", "shape": [-1],
                                                               "data_offsets": [0, 2]}}, 2),
        "truncated_header.safetensors": valid[: 8 + header_len // 2],
        "truncated_data.safetensors": valid[:-10],
        "no_tensors.safetensors": save({}),
        "missing_heads.safetensors": save({k: v for k, v in good.items() if k != "heads"}),
        "inconsistent_lengths.safetensors": save(dict(good, cls=torch.zeros(3, 4, dtype=torch.float16))),
        "scalar_ids.safetensors": save(dict(good, image_ids=torch.tensor(5, dtype=torch.int64))),
        "float_ids.safetensors": save(dict(good, image_ids=torch.zeros(2, dtype=torch.float32))),
        "int_heads.safetensors": save(dict(good, heads=torch.zeros(2, 2, 4, dtype=torch.int32))),
        "heads_2d.safetensors": save(dict(good, heads=torch.zeros(2, 4, dtype=torch.float16))),
        "cls_3d.safetensors": save(dict(good, cls=torch.zeros(2, 1, 4, dtype=torch.float16))),
        "caption_shard_as_image.safetensors": save(caption_tensors([1, 2])),
        "zip_bytes.safetensors": b"PK\x03\x04" + b"\x00" * 40,
        "torch_pickle.safetensors": _torch_pickle(),
    }
    rng = random.Random(SEED + 1)
    kept = 0
    tries = 0
    while kept < 30 and tries < 2000:
        tries += 1
        data = mutate(valid, rng)
        if data != valid and _shard_fails(data):
            cases[f"mutated_{kept:02d}.safetensors"] = data
            kept += 1
    return cases


def _raw_shard(header: dict[str, object], data_len: int) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\x00" * data_len


def _torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"image_ids": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _shard_fails(data: bytes) -> bool:
    from talk2dino.data.features import IMAGE_KEYS, FeatureFormatError, read_shard

    scratch = CORPUS / ".probe.safetensors"
    scratch.write_bytes(data)
    try:
        read_shard(scratch, IMAGE_KEYS)
    except FeatureFormatError:
        return True
    finally:
        scratch.unlink()
    return False


def shard_folder_cases() -> dict[str, dict[str, bytes]]:
    """``shards/folders/<case>/``: features folders that load_features and iter_shards must refuse."""
    img = save(image_tensors())
    cap = save(caption_tensors([1, 2]))
    img2 = save(image_tensors(first_id=1))
    img_wide = save(image_tensors(dim=8, first_id=3))
    files = {"images-000-00000.safetensors": img, "captions-000-00000.safetensors": cap}
    good = [("images-000-00000.safetensors", img)], [("captions-000-00000.safetensors", cap)]

    def case(manifest_bytes: bytes, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
        out = dict(files)
        out.update(extra or {})
        out["manifest.json"] = manifest_bytes
        return out

    def entry(name: str, **fields: object) -> dict[str, object]:
        return {"file": name, "rank": 0, "index": 0, **fields}

    caption_entry = [entry("captions-000-00000.safetensors")]
    return {
        "no_manifest": dict(files),
        "manifest_empty": case(b""),
        "manifest_not_json": case(b"{format: 1}"),
        "manifest_list": case(b"[]"),
        "manifest_null": case(b"null"),
        "manifest_invalid_utf8": case(b'{"format": "\xff"}'),
        "manifest_deeply_nested": case(b'{"format": "talk2dino-features/1", "x": ' + b"[" * 5_000
                                       + b"]" * 5_000 + b"}"),
        "manifest_int_5000_digits": case(b'{"format": "talk2dino-features/1", "complete": ' + b"1" * 5000 + b"}"),
        "wrong_format": case(manifest(*good, format="talk2dino-features/0")),
        "format_list": case(manifest(*good, format=["talk2dino-features/1"])),
        "incomplete": case(manifest(*good, complete=False)),
        "complete_string": case(manifest(*good, complete="yes")),
        "backbone_list": case(manifest(*good, backbone=[4, 2])),
        "image_shards_object": case(manifest(*good, image_shards={"file": "images-000-00000.safetensors"})),
        "image_shards_string": case(manifest(*good, image_shards="images-000-00000.safetensors")),
        "entry_not_object": case(manifest(*good, image_shards=["images-000-00000.safetensors"])),
        "entry_without_file": case(manifest(*good, image_shards=[{"rank": 0, "index": 0}])),
        "entry_file_int": case(manifest(*good, image_shards=[entry(7)])),  # type: ignore[arg-type]
        "entry_file_empty": case(manifest(*good, image_shards=[entry("")])),
        "entry_rank_list": case(manifest(*good, image_shards=[entry("images-000-00000.safetensors", rank=[0])])),
        "entry_sha_int": case(manifest(*good, image_shards=[entry("images-000-00000.safetensors", sha256=5)])),
        "traversal_etc_passwd": case(manifest(*good, image_shards=[entry("../../etc/passwd")])),
        "traversal_deep": case(manifest(*good, image_shards=[entry("../" * 20 + "etc/passwd")])),
        "traversal_inner": case(manifest(*good, image_shards=[entry("sub/../../images-000-00000.safetensors")])),
        "absolute_path": case(manifest(*good, image_shards=[entry("/etc/passwd")])),
        "absolute_caption_path": case(manifest(*good, caption_shards=[entry("/etc/hostname")])),
        "nul_in_file": case(manifest(*good, image_shards=[entry("images\u0000.safetensors")])),
        "file_is_folder": case(manifest(*good, image_shards=[entry("sub")]), {"sub/.keep": b""}),
        "shard_missing": case(manifest([("images-000-00009.safetensors", img)], good[1])),
        "shard_sha_mismatch": case(manifest(*good, image_shards=[entry("images-000-00000.safetensors",
                                                                       sha256="0" * 64)])),
        "shard_truncated": case(manifest(*good), {"images-000-00000.safetensors": img[:-7]}),
        "shard_garbage": case(manifest([("images-000-00000.safetensors", b"garbage")], good[1]),
                              {"images-000-00000.safetensors": b"garbage"}),
        "no_shards": case(manifest([], [])),
        "no_caption_shards": case(manifest(good[0], [])),
        # load_features does not pair shards (it concatenates them all); only iter_shards needs the pairing.
        "iter_only_image_without_caption_shard": case(
            manifest(*good, caption_shards=[entry("captions-000-00000.safetensors", index=5)])),
        "captions_of_missing_images": case(manifest(good[0], [("captions-000-00000.safetensors",
                                                                save(caption_tensors([1, 99])))]),
                                           {"captions-000-00000.safetensors": save(caption_tensors([1, 99]))}),
        "duplicate_image_ids": case(manifest([("images-000-00000.safetensors", img),
                                              ("images-000-00001.safetensors", img2)], good[1]),
                                    {"images-000-00001.safetensors": img2}),
        "shards_disagree_on_dim": case(manifest([("images-000-00000.safetensors", img),
                                                 ("images-000-00001.safetensors", img_wide)], good[1]),
                                       {"images-000-00001.safetensors": img_wide}),
        "caption_shard_entry_list": case(manifest(*good, caption_shards=[caption_entry])),
    }


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def build(scratch: Path) -> dict[str, bytes]:
    """Every generated corpus file: relative path -> bytes."""
    out: dict[str, bytes] = {}

    def put(prefix: str, cases: dict[str, bytes]) -> None:
        for name, data in cases.items():
            out[f"{prefix}/{name}"] = data

    def put_folders(prefix: str, cases: dict[str, dict[str, bytes]]) -> None:
        for case_name, files in cases.items():
            for name, data in files.items():
                out[f"{prefix}/{case_name}/{name}"] = data

    put("images", image_cases(scratch))
    put("labels/files", label_file_cases())
    put("labels/strings", label_string_cases())
    put("datasets/classes", class_name_cases())
    put("datasets/label_png", label_png_cases())
    put("datasets/captions", caption_cases())
    put("datasets/coco_json", coco_json_cases())
    put("datasets/names", names_cases())
    put_folders("datasets/folders", folder_cases())
    put("shards/files", shard_file_cases())
    put_folders("shards/folders", shard_folder_cases())
    return out


def _clear(folder: Path) -> None:
    """Remove what this script wrote under ``folder``, keeping hand-kept ``found/`` inputs from atheris and its
    coverage corpus (files named by their SHA-1), which this script never writes."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name == "found" or re.fullmatch(r"[0-9a-f]{40}", child.name):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def main(argv: list[str] | None = None) -> int:
    """Write (or, with ``--check``, compare) the generated corpus; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Probing mutated images makes Pillow warn about corrupt EXIF/TIFF tags; that is the point, not news.
    warnings.simplefilter("ignore")
    scratch = CORPUS.parent / ".corpus-scratch"
    scratch.mkdir(exist_ok=True)
    try:
        files = build(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.check:
        differ = [rel for rel, data in files.items()
                  if not (CORPUS / rel).is_file() or (CORPUS / rel).read_bytes() != data]
        for rel in differ:
            logger.error("differs: %s", rel)
        return 1 if differ else 0
    for folder in GENERATED:
        _clear(CORPUS / folder)
    for rel, data in sorted(files.items()):
        path = CORPUS / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    total = sum(len(data) for data in files.values())
    logger.info("wrote %d files, %d bytes, under %s", len(files), total, CORPUS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
