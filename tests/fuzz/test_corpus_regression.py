"""The kept fuzzing corpus (``tests/fuzz/corpus``, written by ``make_corpus.py``) fed to every input parser.

Documented outcome for a bad input: the parser raises a :class:`Talk2DinoError` subclass whose message is one
non-empty line naming the file or value; never another exception type. ``images/ok_*`` inputs are odd but valid
and must decode to ``[H, W, 3]`` uint8. For the CLI, ``talk2dino segment`` exits 1 when some images fail (each
failure is one stderr line naming the file) and 2 for a bad labels file, without a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_model_args as _model_args

from talk2dino.data.benchmarks import folder_benchmark, read_class_names_file
from talk2dino.data.coco_masks import CocoStuffThingPainter
from talk2dino.data.converters import read_numbered_names_file
from talk2dino.data.features import IMAGE_KEYS, FeatureFormatError, iter_shards, load_features, read_shard
from talk2dino.data.images import load_image
from talk2dino.data.samples import list_samples, load_label
from talk2dino.errors import InvalidInputError, Talk2DinoError
from talk2dino.extract.coco import read_coco_captions

CORPUS = Path(__file__).resolve().parent / "corpus"


def _files(folder: str, pattern: str = "*") -> list[Path]:
    root = CORPUS / folder
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith(".")) if root.is_dir() else []


def _cases(folder: str) -> list[Path]:
    root = CORPUS / folder
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "found") if root.is_dir() else []


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CORPUS)) for p in paths]


def assert_one_line(exc: BaseException, *names: str) -> None:
    """The message is one non-empty line and mentions each of ``names`` (file names or values)."""
    message = str(exc)
    assert message.strip(), f"empty message from {type(exc).__name__}"
    assert len(message.splitlines()) == 1, f"multi-line message: {message[:300]!r}"
    assert len(message) < 2000, f"message of {len(message)} characters"
    for name in names:
        assert name in message, f"{name!r} not in {message[:300]!r}"


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------

BAD_IMAGES = [p for p in _files("images") if p.name.startswith("bad_")]
OK_IMAGES = [p for p in _files("images") if p.name.startswith("ok_")]


def test_corpus_sizes() -> None:
    """At least 50 bad inputs per parser group (the issue's floor), and the corpus stays small."""
    labels = _files("labels/files") + _files("labels/strings")
    datasets = (_files("datasets/classes") + _files("datasets/label_png") + _files("datasets/captions")
                + _files("datasets/coco_json") + _files("datasets/names") + _cases("datasets/folders"))
    shards = _files("shards/files") + _cases("shards/folders")
    for group, items in (("images", BAD_IMAGES), ("labels", labels), ("datasets", datasets), ("shards", shards)):
        assert len(items) >= 50, f"{group}: {len(items)} bad inputs"
    mine = [p for g in ("images", "labels", "datasets", "shards") for p in (CORPUS / g).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in mine) < 2_000_000


@pytest.mark.parametrize("path", BAD_IMAGES, ids=_ids(BAD_IMAGES))
def test_bad_image_is_refused_with_one_line(path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_image(path)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("path", OK_IMAGES, ids=_ids(OK_IMAGES))
def test_odd_but_valid_image_decodes(path: Path) -> None:
    rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] >= 2 and rgb.shape[1] >= 2 and rgb.flags.c_contiguous and rgb.flags.writeable


def test_exif_orientation_turns_the_image() -> None:
    # Orientations 5-8 swap width and height (the stored image is 6 wide, 8 high).
    for orientation in range(1, 9):
        rgb = load_image(CORPUS / "images" / f"ok_exif_orientation_{orientation}.jpg")
        assert rgb.shape[:2] == ((6, 8) if orientation >= 5 else (8, 6)), orientation


def test_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header declaring 20000x20000 pixels is refused from the header alone: no pixel is decoded."""
    from PIL import ImageFile

    def no_decoding(self: Any) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in ("bad_bomb_png_20000x20000.png", "bad_bomb_png_100000x100000.png", "bad_bomb_gif_65535x65535.gif",
                 "bad_bomb_bmp_30000x30000.bmp"):
        with pytest.raises(InvalidInputError, match="decompression bomb|above the limit") as info:
            load_image(CORPUS / "images" / name)
        assert_one_line(info.value, name)


# ------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------

LABEL_FILES = _files("labels/files")
LABEL_STRINGS = _files("labels/strings")


@pytest.mark.parametrize("path", LABEL_FILES, ids=_ids(LABEL_FILES))
def test_bad_labels_file_is_refused_with_one_line(path: Path) -> None:
    from talk2dino.cli.segment import read_label_file
    from talk2dino.predictor import Segmenter

    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(read_label_file(str(path)), background=True)
    assert_one_line(info.value)


@pytest.mark.parametrize("path", LABEL_STRINGS, ids=_ids(LABEL_STRINGS))
def test_bad_labels_string_is_refused_with_one_line(path: Path) -> None:
    from talk2dino.labels import split_labels as parse_label_list
    from talk2dino.predictor import Segmenter

    text = path.read_bytes().decode("utf-8")
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(parse_label_list(text), background=True)
    assert_one_line(info.value)


def test_ten_megabyte_label_line_is_refused_quickly(tmp_path: Path) -> None:
    from talk2dino.cli.segment import read_label_file
    from talk2dino.labels import split_labels as parse_label_list
    from talk2dino.predictor import Segmenter

    huge = "cat," + "x" * 10_000_000
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(parse_label_list(huge), background=False)
    assert_one_line(info.value, "10,000,000 characters")
    path = tmp_path / "labels.txt"
    path.write_text(huge.replace(",", "\n"), encoding="utf-8")
    with pytest.raises(InvalidInputError) as info:
        Segmenter.check_labels(read_label_file(str(path)), background=False)
    assert_one_line(info.value)


def test_ten_thousand_labels_with_bom_and_crlf_are_read(tmp_path: Path) -> None:
    from talk2dino.cli.segment import read_label_file
    from talk2dino.predictor import Segmenter

    names = [f"class {i} \u732b" for i in range(10_000)]
    path = tmp_path / "labels.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(names).encode("utf-8") + b"\r\n")
    assert Segmenter.check_labels(read_label_file(str(path)), background=False) == names


# ------------------------------------------------------------------------------------------------------------
# Dataset folders, class names, label maps, COCO JSON
# ------------------------------------------------------------------------------------------------------------

CLASS_FILES = _files("datasets/classes")
LABEL_PNGS = _files("datasets/label_png")
CAPTIONS = _files("datasets/captions")
COCO_JSONS = _files("datasets/coco_json")
NAMES = _files("datasets/names")
FOLDERS = _cases("datasets/folders")


@pytest.mark.parametrize("path", CLASS_FILES, ids=_ids(CLASS_FILES))
def test_bad_class_names_file(path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        read_class_names_file(path)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("path", LABEL_PNGS, ids=_ids(LABEL_PNGS))
def test_bad_label_map(path: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ncat\ndog\n", encoding="utf-8")
    spec = folder_benchmark(tmp_path, classes)
    with pytest.raises(InvalidInputError) as info:
        load_label(path, spec)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("path", CAPTIONS, ids=_ids(CAPTIONS))
def test_bad_coco_captions_json(path: Path, tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    shutil.copyfile(path, tmp_path / "annotations" / "captions_val2014.json")
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(tmp_path, "val")
    assert_one_line(info.value, "captions_val2014.json")


@pytest.mark.parametrize("path", COCO_JSONS, ids=_ids(COCO_JSONS))
def test_bad_coco_instances_json(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Indexing the JSON needs no mask API; a stub keeps the test independent of pycocotools being installed.
    monkeypatch.setattr("talk2dino.data.coco_masks._mask_api", lambda: object())
    with pytest.raises(InvalidInputError) as info:
        CocoStuffThingPainter(path)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("path", NAMES, ids=_ids(NAMES))
def test_bad_numbered_names_file(path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        read_numbered_names_file(path)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("case", FOLDERS, ids=_ids(FOLDERS))
def test_bad_dataset_folder(case: Path, tmp_path: Path) -> None:
    root = tmp_path / case.name
    shutil.copytree(case, root)
    split = "split.txt" if (root / "split.txt").is_file() else None
    with pytest.raises(InvalidInputError) as info:
        spec = folder_benchmark(root, root / "classes.txt", split_file=split)
        list_samples(spec, root)
    assert_one_line(info.value)


# ------------------------------------------------------------------------------------------------------------
# Feature shards and manifests
# ------------------------------------------------------------------------------------------------------------

SHARD_FILES = _files("shards/files")
SHARD_FOLDERS = _cases("shards/folders")


@pytest.mark.parametrize("path", SHARD_FILES, ids=_ids(SHARD_FILES))
def test_bad_shard_file(path: Path) -> None:
    with pytest.raises(FeatureFormatError) as info:
        read_shard(path, IMAGE_KEYS)
    assert_one_line(info.value, path.name)


@pytest.mark.parametrize("case", SHARD_FOLDERS, ids=_ids(SHARD_FOLDERS))
def test_bad_features_folder(case: Path) -> None:
    if case.name.startswith("iter_only_"):
        load_features(case)  # bad for streaming only: the shard pairing that iter_shards relies on is broken
    else:
        with pytest.raises(FeatureFormatError) as info:
            load_features(case)
        assert_one_line(info.value)
    with pytest.raises(FeatureFormatError) as info:
        list(iter_shards(case))
    assert_one_line(info.value)


def test_manifest_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    """A shard entry that is a symlink to a file outside the features folder is never read."""
    source = CORPUS / "shards" / "folders" / "shard_sha_mismatch"
    folder = tmp_path / "features"
    shutil.copytree(source, folder)
    outside = tmp_path / "secret.safetensors"
    shutil.copyfile(folder / "images-000-00000.safetensors", outside)
    (folder / "images-000-00000.safetensors").unlink()
    (folder / "images-000-00000.safetensors").symlink_to(outside)
    for load in (load_features, lambda f: list(iter_shards(f))):
        with pytest.raises(FeatureFormatError, match="leads out of the features folder") as info:
            load(folder)
        assert_one_line(info.value, "images-000-00000.safetensors")


def test_symlinked_subfolder_inside_is_accepted(tmp_path: Path) -> None:
    """A symlink that stays inside the folder is fine (only escapes are refused)."""
    from talk2dino.data.features import shard_entries

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.safetensors").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    entries = shard_entries(tmp_path, {"image_shards": [{"file": "link/a.safetensors"}]}, "image_shards")
    assert entries == [{"file": "link/a.safetensors"}]


# ------------------------------------------------------------------------------------------------------------
# The CLI: exit codes and one line per failure
# ------------------------------------------------------------------------------------------------------------


CLI_IMAGES = ("bad_empty.png", "bad_bomb_png_20000x20000.png", "bad_truncated_50pct_jpeg_rgb.jpg",
              "bad_tiff_nan.tif", "bad_png_1x500.png")


def test_cli_segment_bad_images_exit_1_one_line_each(tiny_sources: dict[str, str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from talk2dino.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in CLI_IMAGES:
        shutil.copyfile(CORPUS / "images" / name, inputs / name)
    shutil.copyfile(CORPUS / "images" / "ok_exif_orientation_6.jpg", inputs / "good.jpg")
    code = main(["segment", str(inputs), "--labels", "cat, dog", "--no-progress", "--no-overlay",
                 "--out", str(tmp_path / "out"), *_model_args(tiny_sources)])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in CLI_IMAGES:
        # One ERROR line for the file itself (the closing summary line lists the failed files too).
        lines = [line for line in err.splitlines() if line.startswith("ERROR") and f"{name}:" in line]
        assert len(lines) == 1, (name, err)
    assert (tmp_path / "out" / "good.json").is_file()


@pytest.mark.parametrize("labels_file", ["invalid_utf8_ff.txt", "nul_in_label.txt", "duplicate_crlf.txt",
                                         "empty.txt", "long_label_1001.txt"])
def test_cli_segment_bad_labels_file_exits_2_with_one_line(labels_file: str, tiny_sources: dict[str, str],
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from talk2dino.cli import main

    image = tmp_path / "a.jpg"
    shutil.copyfile(CORPUS / "images" / "ok_jpeg_rgb.jpg", image)
    code = main(["segment", str(image), "--labels-file", str(CORPUS / "labels" / "files" / labels_file),
                 "--no-progress", "--out", str(tmp_path / "out"), *_model_args(tiny_sources)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, errors


def test_talk2dino_error_is_the_only_exception_type() -> None:
    """Sanity check of the contract the whole module relies on."""
    assert issubclass(FeatureFormatError, Talk2DinoError) and issubclass(InvalidInputError, Talk2DinoError)


# ------------------------------------------------------------------------------------------------------------
# Inputs atheris found: replayed through the harness that found them (no atheris needed)
# ------------------------------------------------------------------------------------------------------------

FOUND = [p for g in ("images", "labels", "datasets", "shards") for p in _files(f"{g}/found", "atheris_*")]


@pytest.mark.parametrize("path", FOUND, ids=_ids(FOUND))
def test_atheris_findings_replay_cleanly(path: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    group = path.relative_to(CORPUS).parts[0]
    harness = importlib.import_module(f"atheris_{group}")
    harness.test_one_input(path.read_bytes())


HARNESSES = ("images", "labels", "datasets", "shards")


@pytest.mark.slow
@pytest.mark.parametrize("group", HARNESSES)
def test_atheris_harness_runs_without_crash(group: str, tmp_path: Path) -> None:
    """Each harness, seeded from its corpus, survives a bounded coverage-guided run (``-runs=2000``)."""
    import subprocess
    import sys

    pytest.importorskip("atheris")
    harness = Path(__file__).resolve().parent / f"atheris_{group}.py"
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS / group, work)  # atheris adds new inputs to its first corpus folder; keep ours clean
    result = subprocess.run(
        [sys.executable, str(harness), "-runs=2000", "-max_total_time=60", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/", str(work)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    assert result.returncode == 0 and not crashes, result.stderr[-3000:]
