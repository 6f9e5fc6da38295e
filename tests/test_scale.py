"""``talk2dino segment-dataset`` / `talk2dino.scale` on a local Ray runtime (issue 17), with the tiny models.

One Ray runtime for the module (4 logical CPUs on this 2-core machine: a 2-actor pool holding every CPU would
starve the decode tasks). Skipped when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_args, write_noise_image
from PIL import Image

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
ds = pytest.importorskip("pyarrow.dataset")

from talk2dino.cli import main  # noqa: E402

LABELS = "cat, sofa, window"
# Under pytest-xdist the whole module runs in one worker: one Ray runtime (the module fixture), never two.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def ray_runtime():
    from talk2dino.scale import init_ray

    init_ray(num_cpus=4)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 noise images of different sizes and one file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        write_noise_image(folder / f"im{i}.png", h=40 + 9 * i, w=70 - 4 * i, seed=i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _table(out: Path):
    return ds.dataset(out, format="parquet").to_table()


def _segment_dataset(images: Path, out: Path, tiny_sources: dict[str, str], *extra: str) -> int:
    return main(["segment-dataset", str(images), "--labels", LABELS, "--out", str(out),
                 *tiny_model_args(tiny_sources), "--workers", "2", "--batch-size", "2", "--rows-per-file", "3",
                 *extra])


@pytest.fixture(scope="module")
def dataset_run(ray_runtime, images: Path, tiny_sources: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "labels.parquet"
    started = time.perf_counter()
    code = _segment_dataset(images, out, tiny_sources)
    return code, out, time.perf_counter() - started


def test_labels_equal_segment_and_bad_image_is_an_error_row(dataset_run, images: Path,
                                                            tiny_sources: dict[str, str], tmp_path: Path) -> None:
    code, out, _seconds = dataset_run
    assert code == 1  # one image failed; the others are written
    table = _table(out)
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(p.name for p in images.iterdir())
    bad = rows.pop("broken.png")
    assert bad["error"] and "broken.png" in bad["error"] and "\n" not in bad["error"]
    assert bad["labels_png"] is None and bad["class_names"] is None
    good = sorted(images / name for name in rows)
    assert main(["segment", *map(str, good), "--labels", LABELS, "--out", str(tmp_path),
                 *tiny_model_args(tiny_sources), "--no-overlay", "--no-progress"]) == 0
    for name, row in rows.items():
        assert row["error"] is None
        # The pixels and palette of the label PNG `segment` writes (encoded at the server's compression level).
        expected = Image.open(tmp_path / f"{Path(name).stem}_labels.png")
        picture = Image.open(io.BytesIO(row["labels_png"]))
        labels = np.array(picture)
        assert picture.mode == expected.mode == "P" and picture.getpalette() == expected.getpalette()
        np.testing.assert_array_equal(labels, np.array(expected))
        assert labels.shape == (row["height"], row["width"])
        summary = json.loads((tmp_path / f"{Path(name).stem}.json").read_text())
        assert row["class_names"] == [entry["name"] for entry in summary["labels"]]
        assert row["pixel_counts"] == [entry["pixels"] for entry in summary["labels"]]
        assert row["pixel_counts"] == np.bincount(labels.ravel(), minlength=len(row["class_names"])).tolist()
        assert row["settings"] and json.loads(row["settings"]) == summary["settings"]


def test_parquet_schema(dataset_run, images: Path) -> None:
    from talk2dino.scale import OUTPUT_SCHEMA

    _code, out, _seconds = dataset_run
    files = sorted(out.glob("*.parquet"))
    assert 3 <= len(files) <= 9  # 9 rows, at most 3 per part file
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    for file in files:
        assert 1 <= pq.read_metadata(file).num_rows <= 3
        assert pq.read_schema(file).remove_metadata().equals(OUTPUT_SCHEMA, check_metadata=False)
    for row in _table(out).to_pylist():
        path = Path(row["path"])
        stat = path.stat()
        assert (row["size"], row["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        if row["error"] is None:
            assert abs(sum(row["pixel_shares"]) - 1) < 1e-4
            assert sum(row["pixel_counts"]) == row["width"] * row["height"]
            info = json.loads(row["model_info"])
            assert row["model"] == info["name"] == "composed"
            assert info["weights"]["backbone"] and row["seconds"] > 0


def test_rerun_skips_done_images_and_redoes_changed_ones(dataset_run, images: Path, tiny_sources: dict[str, str],
                                                          tmp_path: Path) -> None:
    _code, out, _seconds = dataset_run
    copy = tmp_path / "out.parquet"
    copy.mkdir()
    for file in out.glob("*.parquet"):
        (copy / file.name).write_bytes(file.read_bytes())
    before = _table(copy).num_rows
    assert _segment_dataset(images, copy, tiny_sources) == 0  # nothing to do: no failure in this run
    assert _table(copy).num_rows == before
    changed = images / "im3.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    try:
        assert _segment_dataset(images, copy, tiny_sources) == 0
    finally:
        os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns - 10**9))
    table = _table(copy).to_pylist()
    assert len(table) == before + 1
    redone = [r for r in table if r["path"] == str(changed)]
    assert len(redone) == 2 and redone[0]["labels_png"] == redone[1]["labels_png"]
    assert _segment_dataset(images, copy, tiny_sources, "--retry-errors") == 1  # the broken image, tried again
    assert _table(copy).num_rows == before + 2
    # The Python API with write=True: nothing left to do, it reads every run's rows back.
    from talk2dino.scale import segment_dataset

    assert segment_dataset(str(images), ["cat", "sofa", "window"], copy, model=None, device="cpu",
                           **tiny_sources).count() == before + 2


def test_python_api_is_lazy_and_chains(ray_runtime, images: Path, tiny_sources: dict[str, str]) -> None:
    from talk2dino.scale import segment_dataset

    dataset = segment_dataset(sorted(str(p) for p in images.glob("im[01].png")), ["cat", "sofa"], write=False,
                              model=None, device="cpu", **tiny_sources, background=True, pamr=False)
    rows = dataset.filter(lambda row: row["error"] is None).take_all()
    assert len(rows) == 2
    assert all(r["class_names"] == ["background", "cat", "sofa"] and r["background_index"] == 0 for r in rows)
    assert all(json.loads(r["settings"])["pamr"] is False for r in rows)


def test_table_input_and_bad_flags(ray_runtime, images: Path, tiny_sources: dict[str, str], tmp_path: Path) -> None:
    import pyarrow as pa

    from talk2dino.scale.inputs import list_inputs

    table = tmp_path / "list.csv"
    table.write_text("image,split\n" + "".join(f"{images.name}/im{i}.png,train\n" for i in range(3)))
    (tmp_path / images.name).symlink_to(images)
    listing = list_inputs(str(table), path_column="image")
    assert listing.column("path").to_pylist() == [str(tmp_path / images.name / f"im{i}.png") for i in range(3)]
    pq.write_table(pa.table({"path": [str(images / "im0.png")]}), tmp_path / "list.parquet")
    assert list_inputs([str(tmp_path / "list.parquet"), str(images / "im[12].png")]).num_rows == 3
    assert main(["segment-dataset", str(table), "--labels", LABELS, "--out", str(tmp_path / "o"),
                 *tiny_model_args(tiny_sources)]) == 2  # no 'path' column: refused before any work
    assert main(["segment-dataset", str(images), "--labels", "cat, cat", "--out", str(tmp_path / "o"),
                 *tiny_model_args(tiny_sources)]) == 2


KILL_RUN = """
import sys
from talk2dino.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(dataset_run, images: Path, tiny_sources: dict[str, str],
                                                        tmp_path: Path) -> None:
    """SIGKILL the driver once part files appear; the rerun completes and the union equals an uninterrupted run."""
    _code, reference, _seconds = dataset_run
    out = tmp_path / "killed.parquet"
    argv = ["segment-dataset", str(images), "--labels", LABELS, "--out", str(out), *tiny_model_args(tiny_sources),
            "--workers", "1", "--batch-size", "1", "--rows-per-file", "1", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", KILL_RUN, *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("*.parquet"))) < 2 and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its Ray runtime is left to notice
        proc.wait(timeout=30)
    finally:
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever that runtime left of the processes this test started
        except ProcessLookupError:
            pass
    partial = _table(out).num_rows
    assert 2 <= partial < 9, partial
    # 1 when the broken image was among the images left for the rerun, else 0 (its error row was written before).
    assert _segment_dataset(images, out, tiny_sources) in (0, 1)
    union = {r["path"]: r for r in _table(out).to_pylist()}
    assert _table(out).num_rows == 9 == len(union)  # every image once: nothing redone, nothing lost
    expected = {r["path"]: r for r in _table(reference).to_pylist()}
    assert {p: r["labels_png"] for p, r in union.items()} == {p: r["labels_png"] for p, r in expected.items()}
    assert {p: r["error"] for p, r in union.items()} == {p: r["error"] for p, r in expected.items()}


def test_missing_extra_is_one_line_and_exit_2(images: Path, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # as if the extra were not installed
            "from talk2dino.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "segment-dataset", str(images), "--labels", "cat",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("pip install 'talk2dino[ray]'")
    assert not (tmp_path / "o").exists()
