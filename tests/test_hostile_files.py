"""Hostile files (issue 14): FIFOs and other non-regular files must be refused at once, never read (a read
blocks forever), and file names holding line breaks must not forge log lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import deadline, tiny_model_args, write_noise_image

from talk2dino.cli import main
from talk2dino.cli.segment import read_label_file
from talk2dino.data.image_lists import list_images
from talk2dino.data.images import load_image
from talk2dino.errors import InvalidInputError
from talk2dino.extract.coco import read_coco_captions
from talk2dino.fileio import check_regular_file, open_regular

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"),
                                reason="needs POSIX FIFOs and SIGALRM")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_helpers_name_the_kind_of_file(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "pipe.bin")
    start = time.monotonic()
    with deadline(5):
        with pytest.raises(InvalidInputError, match=r"pipe\.bin: image is a FIFO, not a regular file$"):
            open_regular(fifo, "image")
        with pytest.raises(InvalidInputError, match="is a folder, not a regular file"):
            check_regular_file(tmp_path)
        if Path("/dev/null").exists():
            with pytest.raises(InvalidInputError, match="is a character device, not a regular file"):
                open_regular("/dev/null")
    assert time.monotonic() - start < 1
    regular = tmp_path / "a.txt"
    regular.write_bytes(b"hello")
    with open_regular(regular) as handle:
        assert handle.read() == b"hello"
        assert os.get_blocking(handle.fileno())  # O_NONBLOCK was cleared after the check


def test_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        try:
            server.bind(str(path))
        except OSError:  # path too long for AF_UNIX on some systems
            pytest.skip("cannot bind a unix socket here")
        with deadline(5), pytest.raises(InvalidInputError, match="is a socket, not a regular file"):
            load_image(path)


def test_load_image_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "fifo.png")
    start = time.monotonic()
    with deadline(5), pytest.raises(InvalidInputError) as info:
        load_image(fifo)
    assert time.monotonic() - start < 1
    message = str(info.value)
    assert "fifo.png" in message and "is a FIFO, not a regular file" in message and "\n" not in message


def test_list_file_and_labels_file_fifos_are_refused(tmp_path: Path) -> None:
    start = time.monotonic()
    with deadline(5):
        with pytest.raises(InvalidInputError, match="list file is a FIFO"):
            list_images(f"@{_fifo(tmp_path / 'list.txt')}")
        with pytest.raises(InvalidInputError, match="labels file is a FIFO, not a regular file"):
            read_label_file(str(_fifo(tmp_path / "labels.txt")))
    assert time.monotonic() - start < 1


def test_labels_file_still_reads_regular_files(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbfcat\r\n# comment\n\n dog \n")
    assert read_label_file(str(labels)) == ["cat", "dog"]


def test_coco_captions_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    _fifo(tmp_path / "annotations" / "captions_train2014.json")
    start = time.monotonic()
    with deadline(5), pytest.raises(InvalidInputError, match="captions file is a FIFO, not a regular file"):
        read_coco_captions(tmp_path, "train")
    assert time.monotonic() - start < 1


def test_coco_captions_sha256_is_of_the_file(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "caption": "x"}]}
    path = tmp_path / "annotations" / "captions_train2014.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    coco = read_coco_captions(tmp_path, "train")
    assert coco.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [image.file_name for image in coco.images] == ["a.jpg"]


def test_segment_run_reports_a_fifo_and_goes_on(tiny_sources, tmp_path: Path, capsys) -> None:
    good = write_noise_image(tmp_path / "good.png")
    fifo = _fifo(tmp_path / "fifo.png")
    with deadline(120):
        code = main(["segment", str(good), str(fifo), "--labels", "cat", "--out", str(tmp_path / "out"),
                     "--no-progress", *tiny_model_args(tiny_sources)])
    assert code == 1
    assert "is a FIFO, not a regular file" in capsys.readouterr().err
    assert (tmp_path / "out" / "good_labels.png").is_file()


def test_segment_labels_file_fifo_exits_2(tiny_sources, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    with deadline(120):
        code = main(["segment", str(image), "--labels-file", str(_fifo(tmp_path / "labels.txt")),
                     "--out", str(tmp_path / "out"), *tiny_model_args(tiny_sources)])
    assert code == 2
    assert "labels file is a FIFO, not a regular file" in capsys.readouterr().err


def test_failed_summary_escapes_forged_names(tiny_sources, tmp_path: Path, capsys) -> None:
    name = "x\nERROR talk2dino.cli: FORGED LINE\n.png"
    bad = tmp_path / name
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = write_noise_image(tmp_path / "good.png")
    with deadline(120):
        code = main(["segment", str(good), str(bad), "--labels", "cat", "--out", str(tmp_path / "out"),
                     "--no-progress", *tiny_model_args(tiny_sources)])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 image(s) failed: " in err
    forged = [line for line in err.splitlines() if line.startswith("ERROR talk2dino.cli: FORGED")]
    assert not forged, err
    # The CLI's log handler writes to stderr (caplog does not see it: the CLI logger does not propagate).
    summary = [line for line in err.splitlines() if "1 image(s) failed: " in line]
    assert len(summary) == 1 and summary[0].endswith("x\\nERROR talk2dino.cli: FORGED LINE\\n.png"), err


def test_coco_image_fifo_is_refused_by_extraction(tmp_path: Path) -> None:
    """A COCO file_name that names a FIFO inside the images folder: extraction's reader refuses it at once."""
    from talk2dino.extract.preprocess import read_rgb

    fifo = _fifo(tmp_path / "COCO_train2014_000000000001.jpg")
    start = time.monotonic()
    with deadline(5), pytest.raises(InvalidInputError, match="FIFO, not a regular file"):
        read_rgb(fifo)
    assert time.monotonic() - start < 1
