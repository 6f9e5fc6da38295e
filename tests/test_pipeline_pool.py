"""The folder pipeline of issue 16 (target 4): writer processes, bounded queues, Ctrl-C, batched prediction.

Writer processes must write byte for byte the files of the one writer thread (JSON compared without its
timings), never hold more than their bound of results, keep per-file failures per file, and leave no temporary
file behind when the run is interrupted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_model_args as _model_args
from conftest import write_noise_image

from talk2dino.cli import batch as batch_module
from talk2dino.cli import main
from talk2dino.cli.batch import BackgroundWriter, ResultFiles, default_workers, default_writers
from talk2dino.cli.segment import predict_each
from talk2dino.errors import InvalidInputError
from talk2dino.fileio import is_temp_name

EXTRAS = ["--save-scores", "--save-heatmaps", "--save-attention"]


def _folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_noise_image(folder / f"img{i:02d}.png", 36 + 2 * (i % 5), 48 + 3 * (i % 4), seed=i)
    return folder


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file; JSON summaries without their timings (measured, so never equal)."""
    digests = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            summary = json.loads(data)
            summary.pop("timings")
            data = json.dumps(summary, sort_keys=True).encode()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


def test_writer_processes_write_exactly_what_the_thread_writes(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    images = _folder(tmp_path / "in", 4)
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    outs = {}
    for writers in ("0", "2"):
        out = tmp_path / f"out{writers}"
        code = main(["-q", "segment", str(images), "--labels", "cat, sofa", "--background", "--no-pamr",
                     "--batch-size", "3", "--writers", writers, "--out", str(out), *EXTRAS, *_model_args(tiny_sources)])
        assert code == 1  # the broken file fails alone
        outs[writers] = _digests(out)
    assert len(outs["0"]) == 4 * 7  # labels, legend, overlay, scores, heatmaps, attention, JSON
    assert outs["0"] == outs["2"]


def test_result_files_job_carries_no_tensor_and_narrow_labels(tiny_model: Any, tmp_path: Path) -> None:
    import pickle

    from talk2dino import InferenceConfig, Segmenter

    segmenter = Segmenter(tiny_model, InferenceConfig(short_side=56, window=28, stride=14, pamr=False))
    segmenter.set_classes(["cat", "sky"])
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    features = segmenter.embed_images([rgb])[0]
    result = segmenter.predict_features(features)
    job = ResultFiles.from_result(tmp_path, "a", tmp_path / "a.png", rgb, result, segmenter.summary(result),
                                  overlay=True, alpha=0.5, save_scores=True, save_heatmaps=True, features=features)
    assert job.labels.dtype == np.uint8 and np.array_equal(job.labels, result.labels.numpy())
    assert np.array_equal(job.scores, result.scores.numpy()) and job.attention is not None
    assert b"torch" not in pickle.dumps(job)  # a writer process unpickles it without importing torch
    assert set(job()) == {"labels", "legend", "overlay", "scores", "heatmaps", "attention"}


def test_writer_processes_never_run_ahead_of_their_bound() -> None:
    """30 slow jobs, 2 processes, bound 3: the queue fills to the bound and never past it."""
    writer = BackgroundWriter(max_pending=3, processes=2)
    done: list[int] = []
    for i in range(30):
        writer.submit(str(i), functools.partial(time.sleep, 0.02), on_done=functools.partial(done.append, i))
        assert len(writer._pending) <= 3
    writer.close()
    assert writer.peak_pending == 3 and done == list(range(30)) and writer.failed == []


def test_segment_holds_at_most_the_bound_of_results(tiny_sources: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """30 images, batches of 2, writes slowed down: at most 2 x batch size results wait, whatever the count."""
    writers: list[BackgroundWriter] = []

    class Recording(BackgroundWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            writers.append(self)

    write = ResultFiles.__call__

    def slow(self: ResultFiles) -> dict[str, str]:
        time.sleep(0.05)
        return write(self)

    monkeypatch.setattr(batch_module, "BackgroundWriter", Recording)
    monkeypatch.setattr(ResultFiles, "__call__", slow)
    out = tmp_path / "out"
    code = main(["-q", "segment", str(_folder(tmp_path / "in", 30)), "--labels", "cat", "--no-pamr", "--no-overlay",
                 "--batch-size", "2", "--writers", "0", "--out", str(out), *_model_args(tiny_sources)])
    assert code == 0 and len(list(out.glob("*.json"))) == 30
    (writer,) = writers
    assert writer.peak_pending == 4  # reached (the writes are the slow stage) and never exceeded


def test_writer_process_failures_stay_per_file_and_bugs_stop(tmp_path: Path) -> None:
    labels = np.zeros((4, 6), np.uint8)
    summary = {"labels": [{"index": 0, "name": "cat", "pixels": 24, "share": 1.0}]}

    def job(folder: Path, rgb: np.ndarray | None) -> ResultFiles:
        return ResultFiles(folder, "x", folder / "x.png", rgb, labels, ["cat"], None, summary, 0.5)

    writer = BackgroundWriter(max_pending=4, processes=1)
    writer.submit("missing-folder", job(tmp_path / "nowhere", None))  # OSError in the process
    writer.submit("bad-overlay", job(tmp_path, np.zeros((2, 2, 3), np.uint8)))  # InvalidInputError, size mismatch
    writer.submit("ok", job(tmp_path, None))
    writer.close()
    assert writer.failed == ["missing-folder", "bad-overlay"] and (tmp_path / "x_labels.png").is_file()

    writer = BackgroundWriter(max_pending=4, processes=1)
    writer.submit("bug", functools.partial(operator.truediv, 1, 0))
    with pytest.raises(ZeroDivisionError):
        writer.close()
    writer = BackgroundWriter(max_pending=4, processes=1)
    writer.submit("killed", functools.partial(os._exit, 1))  # a writer process that dies (the OOM killer)
    with pytest.raises(Exception, match="terminated abruptly"):
        writer.close()


def test_default_pipeline_sizes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (default_workers(cpu, 16), default_writers(cpu, 16)) == (0, 0)  # a pool does not pay on a CPU
    assert (default_workers(cuda, 16), default_writers(cuda, 16)) == (3, 12)  # writing costs ~5x decoding
    assert (default_workers(cuda, 2), default_writers(cuda, 2)) == (1, 1)
    assert (default_workers(cuda, 128), default_writers(cuda, 128)) == (8, 16)


def test_negative_writers_is_a_usage_error(tiny_sources: dict[str, str], tmp_path: Path, capsys: Any) -> None:
    write_noise_image(tmp_path / "a.png")
    code = main(["segment", str(tmp_path / "a.png"), "--labels", "cat", "--writers", "-1",
                 *_model_args(tiny_sources)])
    assert code == 2 and "--writers must be >= 0" in capsys.readouterr().err


def test_batch_module_imports_without_torch() -> None:
    code = "import sys, talk2dino.cli.batch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class _FakeSegmenter:
    """`predict_features` returns its input (an error for "bad"); `predict_features_batch` as given."""

    def __init__(self, batched: Any) -> None:
        self.calls: list[str] = []
        self.predict_features_batch = batched

    def predict_features(self, features: Any) -> Any:
        self.calls.append(features)
        if features == "bad":
            raise InvalidInputError("bad image")
        return features


def test_predict_each_uses_the_batch_and_isolates_a_bad_image() -> None:
    batched = _FakeSegmenter(lambda features: [f.upper() for f in features])
    assert predict_each(batched, ["a", "b"]) == ["A", "B"] and batched.calls == []  # type: ignore[arg-type]
    assert predict_each(batched, ["a"]) == ["a"] and batched.calls == ["a"]  # type: ignore[arg-type]

    def refuse(features: Any) -> Any:
        raise InvalidInputError("one image is bad")

    refused = _FakeSegmenter(refuse)
    results = predict_each(refused, ["a", "bad", "c"])  # type: ignore[arg-type]
    assert results[0] == "a" and isinstance(results[1], InvalidInputError) and results[2] == "c"
    assert refused.calls == ["a", "bad", "c"]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_no_temp_file(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it, in the middle of writing 30 images."""
    images, out = _folder(tmp_path / "in", 30), tmp_path / "out"
    argv = ["segment", str(images), "--labels", "cat, sofa", "--no-pamr", "--batch-size", "2", "--writers", "2",
            "--workers", "1", "--no-progress", "--out", str(out), *_model_args(tiny_sources)]
    code = f"import sys\nfrom talk2dino.cli import main\nif __name__ == '__main__':\n    sys.exit(main({argv!r}))\n"
    script = tmp_path / "run.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not (out.is_dir() and list(out.glob("*.json"))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if is_temp_name(name)], left
    written = [p for p in out.glob("*.json")]
    assert 0 < len(written) < 30
    for summary in written:  # every image written is written whole
        assert all((out / name).is_file() for name in json.loads(summary.read_text())["files"].values())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_busy_counts_overlapping_kernels_once() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(BENCHMARKS))
    from bench_gpu import kernel_union_us

    def event(start: float, end: float, name: str = "gemm", device: Any = DeviceType.CUDA) -> Any:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device, name=name)

    events = [event(0, 10), event(5, 15), event(20, 30), event(25, 26), event(40, 50, "Memcpy HtoD"),
              event(0, 100, device=DeviceType.CPU)]
    prof = SimpleNamespace(events=lambda: events)
    assert kernel_union_us(prof) == 25  # [0, 15] and [20, 30]; copies and host events are not kernels
    assert kernel_union_us(prof, 100, (108, 125)) == 12  # shifted to the wall clock, cut to the window


@pytest.mark.slow
def test_bench_gpu_smoke_on_cpu(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    """`bench_gpu.py --device cpu --small` runs every row (the BPE fixture skips where the vocabulary is missing)."""
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--device", "cpu", "--small",
                           "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 5 and all(row["rate"] > 0 for row in rows)
    assert rows[-1]["exit"] == 0 and rows[-1]["images"] == 6
    assert "| our backbone (encode_image) |" in proc.stdout
