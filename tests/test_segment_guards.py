"""`talk2dino segment` against hostile inputs (issue 14): resource guards and failures found late.

- Memory: an image whose segmentation would need more than ``--max-image-memory`` is refused from its header,
  before decoding, with one line naming the file, its size, the estimate and the flag; the others go on.
- Flags: what can be checked from them (the memory limit, too many labels for it, a folder where an output goes,
  an unwritable --out) fails before the model loads.
- Temp files: a rerun removes the temp files a killed run left in --out (ours only, and says how many).
- Geometry: images thinner than 1:4096 (3x40000) are segmented, not failed on an empty resize target.
- Names: a 250-byte image name is written (short temp names; output stems over the file-name limit shortened
  with a hash), multi-byte names counted in bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_args, write_noise_image
from PIL import Image

from talk2dino.cli import main
from talk2dino.cli.batch import MemoryBudget, format_bytes, parse_byte_size
from talk2dino.cli.output_folder import fit_stem, max_stem_bytes, plan_stems, remove_stale_temps
from talk2dino.config import InferenceConfig
from talk2dino.data.images import load_image
from talk2dino.errors import InvalidInputError
from talk2dino.fileio import atomic_write_bytes, is_temp_name, name_bytes, temp_name, temp_target
from talk2dino.ops.sliding import resized_size
from talk2dino.render import label_colors, overlay, save_label_png, write_result_files

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from make_corpus import png_with_header  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is created: the checks under test must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("talk2dino.factory.create_model", refuse)


def _segment(tiny_sources: dict[str, str], inputs: list[Path | str], out: Path, *extra: str,
             labels: str = "cat,dog") -> int:
    return main(["segment", *map(str, inputs), "--labels", labels, "--no-pamr", "--no-progress", "--out", str(out),
                 *extra, *tiny_model_args(tiny_sources)])


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("ERROR")]


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize(("text", "size"), [
    ("8GB", 8 * 10**9), ("8GiB", 8 << 30), ("8G", 8 << 30), ("8g", 8 << 30), ("512MB", 512 * 10**6),
    ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("100", 100), ("100B", 100), (" 2 TiB ", 2 << 40), ("64KiB", 1 << 16),
])
def test_byte_sizes_accept_units(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["8XB", "-1GB", "0", "0.0001B", "", "GB", "8 G B", "1e9", "nan"])
def test_byte_sizes_refuse_nonsense_in_one_line(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_byte_size(text)
    message = str(info.value)
    assert message.startswith("--max-image-memory ") and "\n" not in message


def test_memory_estimate_matches_the_measured_peaks() -> None:
    """The estimate against the peak RSS growth of the CLI measured with the tiny model on a 4000x3000 grey PNG
    (CPU, 2-core machine; the model's own memory excluded): 296 MiB with 2 channels, 1182 with 20, 2569 with 50,
    363 and 1673 with --save-scores; 887 MiB for 8000x6000 and 3086 MiB for the issue's 13000x13000 (169 MP)
    with 2 channels, which took 15 GB before the overlay was blended in bands."""
    config = InferenceConfig()
    measured = [((4000, 3000, 2, {}), 296), ((4000, 3000, 20, {}), 1182), ((4000, 3000, 50, {}), 2569),
                ((4000, 3000, 2, {"save_scores": True}), 363), ((4000, 3000, 20, {"save_scores": True}), 1673),
                ((8000, 6000, 2, {}), 887), ((13000, 13000, 2, {}), 3086)]
    for (width, height, channels, options), peak in measured:
        need = MemoryBudget(1, channels, config, **options).need(width, height, "L") / MiB
        # Never more than 10% below a measured peak; above it by at most 40% (larger images reuse memory).
        assert 0.9 * peak <= need <= 1.4 * peak, (width, height, channels, options, need, peak)


def test_memory_estimate_grows_with_pixels_channels_and_outputs() -> None:
    config = InferenceConfig()
    small, big = MemoryBudget(1, 2, config), MemoryBudget(1, 200, config)
    assert small.need(2000, 1000) < small.need(4000, 2000) < big.need(4000, 2000)
    assert MemoryBudget(1, 50, config, save_scores=True).need(4000, 3000) > MemoryBudget(1, 50, config).need(4000, 3000)
    assert small.need(4000, 3000, "F") > small.need(4000, 3000, "RGB")  # float files decode through float64


def test_budget_refusal_names_size_estimate_and_flag() -> None:
    budget = MemoryBudget(100 * MiB, 3, InferenceConfig())
    budget(1000, 1000, "RGB")  # fits: no error
    with pytest.raises(InvalidInputError) as info:
        budget(13000, 13000, "L")
    message = str(info.value)
    assert message.startswith("image is 13000x13000 (169,000,000 pixels) and needs about ")
    assert "GiB to segment with 3 score channel(s), above --max-image-memory 100.0 MiB" in message
    assert "raise --max-image-memory" in message


def test_load_image_checks_the_header_before_decoding(tmp_path: Path) -> None:
    # A header declaring 15000x9000 over 64 bytes of data: decoding would fail, so a refusal that names the
    # memory proves that nothing was decoded.
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_header(15000, 9000))
    seen: list[tuple[int, int, str]] = []

    def check(width: int, height: int, mode: str) -> None:
        seen.append((width, height, mode))
        raise InvalidInputError("too big for the test")

    with pytest.raises(InvalidInputError, match=r"huge\.png: too big for the test$"):
        load_image(path, check_header=check)
    assert seen == [(15000, 9000, "RGB")]


def test_cli_refuses_the_big_image_only(tiny_sources, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_noise_image(inputs / "small.png")
    (inputs / "huge.png").write_bytes(png_with_header(15000, 9000))  # refused from its header alone
    out = tmp_path / "out"
    assert _segment(tiny_sources, [inputs], out, "--max-image-memory", "200MB") == 1
    errors = _errors(capsys)
    huge = [line for line in errors if "huge.png:" in line]
    assert len(huge) == 1
    assert "image is 15000x9000 (135,000,000 pixels) and needs about " in huge[0]
    assert "above --max-image-memory 190.7 MiB; raise --max-image-memory" in huge[0]
    assert sorted(p.name for p in out.iterdir()) == ["small.json", "small_labels.png", "small_legend.png",
                                                     "small_overlay.png"]


def test_default_memory_limit_is_half_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from talk2dino.cli import batch
    from talk2dino.data import image_memory

    monkeypatch.setattr(image_memory, "machine_memory", lambda: 16 << 30)
    assert batch.default_image_memory() == 8 << 30
    monkeypatch.setattr(image_memory, "machine_memory", lambda: None)
    assert batch.default_image_memory() == batch.FALLBACK_IMAGE_MEMORY == 8 << 30
    assert format_bytes(8 << 30) == "8.0 GiB"


def test_bad_memory_flag_fails_before_the_model(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    assert _segment(tiny_sources, [image], tmp_path / "out", "--max-image-memory", "lots") == 2
    assert _errors(capsys) == ["ERROR talk2dino.cli: --max-image-memory 'lots': not a size; write e.g. 8GB, 8GiB, "
                               "512MB or 8G"]


def test_labels_beyond_the_memory_limit_fail_before_the_model(tiny_sources, no_model, tmp_path: Path,
                                                              capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    labels = ",".join(f"thing {i}" for i in range(200))
    assert _segment(tiny_sources, [image], tmp_path / "out", "--max-image-memory", "100MB", labels=labels) == 2
    errors = _errors(capsys)
    assert len(errors) == 1
    assert "200 score channels need about " in errors[0]
    assert "even for a 448x448 image, above --max-image-memory 95.4 MiB; use fewer labels" in errors[0]


# ------------------------------------------------------------------------------ checks before the model


def test_more_labels_than_a_label_png_fail_before_the_model(tiny_sources, no_model, tmp_path: Path,
                                                            capsys) -> None:
    # Found late before: 1000 labels ran every image, then failed each one on its label PNG's palette. 1000 labels
    # are now written as a 16-bit label PNG; more than a 16-bit PNG holds is refused before the model loads.
    image = write_noise_image(tmp_path / "a.png")
    labels = ",".join(f"thing {i}" for i in range(65_537))
    assert _segment(tiny_sources, [image], tmp_path / "out", labels=labels) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "65,537 labels" in errors[0]


def test_a_folder_where_an_output_goes_fails_before_the_model(tiny_sources, no_model, tmp_path: Path,
                                                              capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    out = tmp_path / "out"
    (out / "a_legend.png").mkdir(parents=True)
    # Even --overwrite never replaces a folder (the rename would fail only after the image was computed).
    assert _segment(tiny_sources, [image], out, "--overwrite") == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "a_legend.png would be written where a folder is" in errors[0]
    assert (out / "a_legend.png").is_dir()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_the_model(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _segment(tiny_sources, [image], out) == 2
    finally:
        out.chmod(0o755)
    errors = _errors(capsys)
    assert len(errors) == 1 and "folder is not writable (Permission denied)" in errors[0]


def test_out_under_a_file_fails_before_the_model(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    assert _segment(tiny_sources, [image], tmp_path / "file" / "out") == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "cannot create the folder" in errors[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_named_json_in_out_is_not_read(tmp_path: Path) -> None:
    # Earlier outputs are recognised from the *.json in --out; reading a FIFO there blocked the run forever.
    from talk2dino.cli.output_folder import talk2dino_outputs

    os.mkfifo(tmp_path / "trap.json")
    (tmp_path / "x.json").write_text(json.dumps({"image": "x.png", "files": {"labels": "x_labels.png"}}))
    start = time.monotonic()
    assert talk2dino_outputs(tmp_path) == {"x.json", "x_labels.png"}
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------- temp files


def _old(path: Path, data: bytes = b"half") -> Path:
    path.write_bytes(data)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def test_stale_temps_are_removed_ours_only(tmp_path: Path) -> None:
    ours = [_old(tmp_path / ".a_overlay.0123456789ab.tmp.png"), _old(tmp_path / ".a.0123456789ab.tmp.json"),
            _old(tmp_path / ".t2d-0123456789ab.tmp.png"), _old(tmp_path / ".talk2dino-write-test-k2j4h5l6")]
    foreign = [_old(tmp_path / ".notes.txt"), _old(tmp_path / ".data.0123456789ab.tmp.csv"),  # not our output
               _old(tmp_path / "a_overlay.0123456789ab.tmp.png"),  # not hidden: not our naming
               tmp_path / ".b_labels.fedcba987654.tmp.png"]  # written after the run started: a concurrent run's
    foreign[-1].write_bytes(b"in progress")
    # The label map of an image named ".x.0123456789ab.tmp.png": listed in a talk2dino JSON, so never a temp.
    listed = _old(tmp_path / ".x.0123456789ab.tmp_labels.png")
    (tmp_path / ".t2d-aaaaaaaaaaaa.tmp.png").mkdir()  # a folder, never removed
    (tmp_path / ".t2d-bbbbbbbbbbbb.tmp.png").symlink_to(ours[0])  # a link, never removed
    removed = remove_stale_temps(tmp_path, before=time.time() - 60, keep={listed.name})
    assert sorted(removed) == sorted(p.name for p in ours)
    assert all(p.exists() for p in [*foreign, listed]) and not any(p.exists() for p in ours)
    assert (tmp_path / ".t2d-aaaaaaaaaaaa.tmp.png").is_dir()
    assert (tmp_path / ".t2d-bbbbbbbbbbbb.tmp.png").is_symlink()


def test_rerun_after_a_kill_removes_its_temp_files(tiny_sources, tmp_path: Path, capsys) -> None:
    image = write_noise_image(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["segment", str(image), "--labels", "cat,dog", "--no-pamr", "--no-progress", "--out", str(out),
            *tiny_model_args(tiny_sources)]
    # A real kill: SIGKILL just before the first rename (the label PNG), as the OOM killer would.
    env = {**os.environ, "TALK2DINO_FAULT_INJECT": "atomic-before-rename:1"}
    code = f"import sys; from talk2dino.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and is_temp_name(left[0]) and temp_target(left[0]) == "a_labels.png"
    os.utime(out / left[0], (time.time() - 5, time.time() - 5))  # mtimes have a coarse clock on some systems
    assert main(argv) == 0
    assert f"INFO talk2dino.cli: removed 1 temp file(s) left in {out} by an interrupted run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_labels.png", "a_legend.png", "a_overlay.png"]


# ---------------------------------------------------------------------------------------------- geometry


def test_resize_target_is_never_empty() -> None:
    assert resized_size(3, 40000, short_side=448, max_long_side=2048) == (1, 2048)
    assert resized_size(40000, 3, short_side=448, max_long_side=2048) == (2048, 1)
    # The protocol's sizes are unchanged wherever mmcv's rule gives a positive size (method.md §4.3).
    assert resized_size(375, 500, short_side=448, max_long_side=2048) == (448, 597)
    assert resized_size(1024, 2048, short_side=448, max_long_side=2048) == (448, 896)
    assert resized_size(10, 2000, short_side=448, max_long_side=2048) == (10, 2048)


@pytest.mark.parametrize("pamr", ["--pamr", "--no-pamr"])
def test_very_thin_images_are_segmented(tiny_sources, tmp_path: Path, pamr: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"wide.png": (40000, 3), "tall.png": (3, 40000), "sliver.png": (5000, 2)}
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 40, 200)).save(inputs / name)
    out = tmp_path / "out"
    assert main(["segment", str(inputs), "--labels", "cat,dog", pamr, "--background", "--no-progress",
                 "--out", str(out), *tiny_model_args(tiny_sources)]) == 0
    for name, (width, height) in sizes.items():
        stem = Path(name).stem
        with Image.open(out / f"{stem}_labels.png") as labels:
            assert labels.size == (width, height)
        assert json.loads((out / f"{stem}.json").read_text())["size"] == [height, width]


# ------------------------------------------------------------------------------------------------- names


def test_temp_names_fit_whatever_the_final_name(tmp_path: Path) -> None:
    assert temp_target(temp_name("a_overlay.png", tmp_path)) == "a_overlay.png"  # the usual form, unchanged
    for final in ("x" * 251 + ".png", "é" * 125 + ".png", "y" * 255):
        name = temp_name(final, tmp_path)
        assert name_bytes(name) <= 255 and is_temp_name(name) and name.startswith(".t2d-")
        atomic_write_bytes(tmp_path / final, b"data")  # failed with ENAMETOOLONG on the temp name
        assert (tmp_path / final).read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x" * 251 + ".png", "é" * 125 + ".png", "y" * 255])


def test_fit_stem_is_deterministic_and_counts_bytes() -> None:
    assert fit_stem("short", 241) == "short"
    assert fit_stem("a" * 241, 241) == "a" * 241
    long = fit_stem("a" * 251, 241)
    assert name_bytes(long) == 241 and long.startswith("a" * 232 + "~") and long == fit_stem("a" * 251, 241)
    wide = fit_stem("é" * 125, 241)  # 250 bytes in UTF-8: cut at a character boundary
    assert name_bytes(wide) <= 241 and wide.startswith("é" * 116 + "~")
    assert fit_stem("a" * 250 + "1", 241) != fit_stem("a" * 250 + "2", 241)


def test_plan_stems_keeps_long_stems_distinct(tmp_path: Path) -> None:
    limit = max_stem_bytes(tmp_path)
    assert limit == 255 - len("_attention.png")
    paths = [tmp_path / "x" / ("a" * 250 + ".png"), tmp_path / "y" / ("a" * 250 + ".png"),
             tmp_path / ("a" * 250 + ".jpg")]
    stems = plan_stems(paths, stem_bytes=limit)
    assert len(set(stems.values())) == 3 and all(name_bytes(s) <= limit for s in stems.values())


@pytest.mark.parametrize("name", ["a" * 246 + ".png", "b" * 251 + ".png", "é" * 125 + ".png", "名" * 83 + ".jpg",
                                  "c" * 237 + ".png"])
def test_long_image_names_are_segmented(tiny_sources, tmp_path: Path, name: str, capsys) -> None:
    assert name_bytes(name) <= 255
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_noise_image(inputs / name)
    out = tmp_path / "out"
    argv = ["segment", str(inputs), "--labels", "cat,dog", "--no-pamr", "--no-progress", "--save-scores",
            "--save-heatmaps", "--out", str(out), *tiny_model_args(tiny_sources)]
    assert main(argv) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 6 and all(name_bytes(n) <= 255 for n in written)
    assert not any(is_temp_name(n) for n in written)
    summary = json.loads(next((out / n) for n in written if n.endswith(".json")).read_text())
    assert summary["image"] == str(inputs / name)
    stem = Path(name).stem
    if name_bytes(stem) > 241:
        assert stem not in written[0] and "~" in written[0]
        assert "its name is too long for output file names" in capsys.readouterr().err
    else:
        assert f"{stem}.json" in written
    # A rerun finds the same, shortened names, recognises them as its own, and rewrites them.
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == written


def test_in_place_run_with_a_long_name_never_touches_inputs(tiny_sources, tmp_path: Path) -> None:
    folder = tmp_path / "inplace"
    folder.mkdir()
    images = [write_noise_image(folder / ("z" * 250 + ".png")), write_noise_image(folder / "a.png", seed=2)]
    before = {p: p.read_bytes() for p in images}
    assert _segment(tiny_sources, [folder], folder) == 0
    assert {p: p.read_bytes() for p in images} == before
    assert len(list(folder.glob("*.json"))) == 2


# ------------------------------------------------------------------------------------------- label maps


def test_label_maps_of_more_than_256_classes_are_16_bit(tmp_path: Path) -> None:
    # The library writer (SegmentationResult.save) takes any vocabulary: a palette PNG holds 256 classes, so a
    # larger map is a 16-bit greyscale PNG of the indices; the overlay and the legend keep distinct colours.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, (20, 30))
    save_label_png(tmp_path / "l.png", labels, 300)
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode in ("I;16", "I")
        np.testing.assert_array_equal(np.array(image), labels)
    colors = label_colors(300)
    assert len({tuple(c) for c in colors}) == 300
    blended = overlay(np.zeros((20, 30, 3), np.uint8), labels, 300, alpha=1.0)
    np.testing.assert_array_equal(blended, colors[labels])
    save_label_png(tmp_path / "p.png", labels % 256, 256)
    with Image.open(tmp_path / "p.png") as image:
        assert image.mode == "P"  # 256 classes or fewer: the palette PNG, as before


def test_write_result_files_with_300_labels(tiny_model, tmp_path: Path) -> None:
    from talk2dino.predictor import Segmenter

    # Small windows (the image is 40x60 whatever the resize): every stage, PAMR included, still runs on 300
    # channels, in 0.3 s instead of 5 s at the default 448-pixel resize.
    segmenter = Segmenter(tiny_model, InferenceConfig(short_side=56, window=28, stride=14))
    segmenter.set_classes([f"thing {i}" for i in range(300)])
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    result = segmenter.predict_features(segmenter.embed_images([rgb])[0])
    files = write_result_files(tmp_path, "x", None, rgb, result, segmenter.summary(result), save_scores=False,
                               overlay=True, alpha=0.5)
    with Image.open(tmp_path / files["labels"]) as image:
        np.testing.assert_array_equal(np.array(image), result.labels.numpy())
    summary = json.loads((tmp_path / "x.json").read_text())
    assert len(summary["labels"]) == 300 and len({tuple(e["color"]) for e in summary["labels"]}) == 300


def test_overlay_in_bands_equals_the_whole_image_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    from talk2dino.render import labels as render_labels

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (37, 23))
    colors = label_colors(5, background_index=0).astype(np.float64)[labels]
    expected = np.clip(np.floor(0.7 * image.astype(np.float64) + 0.3 * colors + 0.5), 0, 255).astype(np.uint8)
    expected[labels == 0] = image[labels == 0]
    monkeypatch.setattr(render_labels, "OVERLAY_CHUNK_PIXELS", 50)  # bands of 2 rows, the last one shorter
    np.testing.assert_array_equal(overlay(image, labels, 5, alpha=0.3, background_index=0), expected)


def test_overlay_memory_is_bounded_by_its_band(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blending the whole image at once in float64 took ~100 bytes a pixel (15 GB for the 169 MP image);
    # in bands, the temporaries are those of one band whatever the image size.
    import tracemalloc

    from talk2dino.render import labels as render_labels

    monkeypatch.setattr(render_labels, "OVERLAY_CHUNK_PIXELS", 1 << 16)
    image = np.zeros((1000, 2000, 3), dtype=np.uint8)
    labels = np.ones((1000, 2000), dtype=np.uint8)
    tracemalloc.start()
    try:
        overlay(image, labels, 3, alpha=0.5, background_index=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The result (6 MB) and the validated labels (2 MB), plus one band's ~7 MB; not 200 MB.
    assert peak < 30 * MiB, peak / MiB
