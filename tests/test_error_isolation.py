"""Only input errors are per-image (issue 12): a failure inside the model stops the run as one line.

A programming or version error (transformers 5.17 raised ``AttributeError: 'Dinov2WithRegistersAttention'
object has no attribute 'q_proj'`` inside the backbone) used to be reported against every image, with
``wrote 0 of N images``. These tests inject such failures into the backbone of a tiny model and check that the
CLI, the evaluation runner, the extractor and the server stop (or answer 500) with one line naming the
exception and the installed versions, while a corrupt image is still reported for that image alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_model_args as _model_args
from conftest import write_noise_image as _write_image

from talk2dino.cli import main
from talk2dino.cli.batch import BackgroundWriter
from talk2dino.errors import (
    InternalError,
    InvalidInputError,
    Talk2DinoError,
    WeightsError,
    internal_error_guard,
    internal_error_message,
    is_input_error,
    is_out_of_memory,
)
from talk2dino.models.backbones.base import VisionBackbone
from talk2dino.predictor import Segmenter

Q_PROJ = "'Dinov2WithRegistersAttention' object has no attribute 'q_proj'"
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)"
TORCH = importlib.metadata.version("torch")
TRANSFORMERS = importlib.metadata.version("transformers")


# ---------------------------------------------------------------------------------------------- helpers
def _three_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_write_image(folder / f"photo{i}.png", 36 + 4 * i, 50, seed=i) for i in range(3)]


def _segment(tiny_sources: dict[str, str], inputs: Path, out: Path, *extra: str) -> int:
    return main(["segment", str(inputs), "--labels", "cat, sofa", "--no-pamr", "--out", str(out), "--no-progress",
                 *extra, *_model_args(tiny_sources)])


class BrokenBackbone:
    """Replaces `VisionBackbone.forward` (every family's fast path) with one that raises `error` while armed.

    `calls` counts the forward passes attempted, so a test can tell "stopped at the first" from "retried".
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: Callable[[], BaseException] | None = None) -> None:
        self.calls = 0
        self.error = error
        original = VisionBackbone.forward

        def forward(backbone: VisionBackbone, pixel_values: torch.Tensor) -> Any:
            self.calls += 1
            if self.error is not None:
                raise self.error()
            return original(backbone, pixel_values)

        monkeypatch.setattr(VisionBackbone, "forward", forward)


def _q_proj() -> BaseException:
    return AttributeError(Q_PROJ)


def _oom() -> BaseException:
    return torch.OutOfMemoryError(OOM)


def _unpack() -> BaseException:
    # A ValueError from inside the model: still no image's fault (and not a "could not start" exit 2).
    return ValueError("too many values to unpack (expected 2)")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ERROR")]


# ---------------------------------------------------------------------------------------------- errors.py
def test_only_invalid_input_is_an_input_error() -> None:
    assert is_input_error(InvalidInputError("photo.jpg: cannot identify image file"))
    for other in (AttributeError(Q_PROJ), OSError("disk"), ValueError("shape"), WeightsError("hash"),
                  InternalError("x"), RuntimeError(OOM)):
        assert not is_input_error(other), other


def test_internal_error_message_is_one_line_with_type_and_versions() -> None:
    message = internal_error_message(AttributeError(Q_PROJ + "\nsecond line of a long library message"))
    assert "\n" not in message
    assert message.startswith("internal error, not a problem with the input: ")
    assert f"AttributeError: {Q_PROJ}" in message and "second line" not in message
    assert f"torch {TORCH}" in message and f"transformers {TRANSFORMERS}" in message
    assert "report" in message and "-v" in message
    assert "out of memory" not in message


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(OOM), RuntimeError("MPS backend out of memory (x)"),
                                   MemoryError()])
def test_out_of_memory_gets_its_own_message_and_the_batch_size_hint(error: BaseException) -> None:
    assert is_out_of_memory(error)
    message = internal_error_message(error)
    assert message.startswith("out of memory, not a problem with the input: ")
    assert "try a smaller --batch-size" in message and "\n" not in message
    assert "internal error" not in message
    assert internal_error_message(error, memory_hint="try a smaller --max-batch").endswith("--max-batch")
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(AttributeError(Q_PROJ))


def test_a_worker_process_failure_is_summarised_by_its_original_exception() -> None:
    from torch._utils import ExceptionWrapper  # what a DataLoader uses to re-raise a worker's exception

    try:
        raise AttributeError(Q_PROJ)
    except AttributeError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(AttributeError) as caught:
        wrapper.reraise()
    message = internal_error_message(caught.value)
    assert f"AttributeError: {Q_PROJ}" in message and "\n" not in message and "Caught" not in message


def test_guard_wraps_only_failures_that_are_not_talk2dino_errors() -> None:
    with pytest.raises(InternalError) as caught, internal_error_guard():
        raise AttributeError(Q_PROJ)
    assert isinstance(caught.value.__cause__, AttributeError) and Q_PROJ in str(caught.value)
    for deliberate in (InvalidInputError("bad image"), WeightsError("bad weights")):
        with pytest.raises(type(deliberate)), internal_error_guard():
            raise deliberate
    with pytest.raises(KeyboardInterrupt), internal_error_guard():
        raise KeyboardInterrupt
    assert issubclass(InternalError, Talk2DinoError) and not issubclass(InternalError, ValueError)


def test_errors_module_never_imports_torch() -> None:
    code = ("import sys, talk2dino.errors as e; e.internal_error_message(AttributeError('x')); "
            "e.is_out_of_memory(RuntimeError('out of memory')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_background_writer_collects_io_and_input_failures_and_raises_bugs() -> None:
    writer = BackgroundWriter(max_pending=4)

    def fail(error: BaseException) -> Callable[[], None]:
        def job() -> None:
            raise error
        return job

    writer.submit("full", fail(OSError("No space left on device")))
    writer.submit("bad", fail(InvalidInputError("bad labels")))
    writer.submit("ok", lambda: None)
    writer.close()
    assert writer.failed == ["full", "bad"]

    writer = BackgroundWriter(max_pending=4)
    writer.submit("bug", fail(AttributeError("module 'PIL.Image' has no attribute 'ANTIALIAS'")))
    writer.submit("later", lambda: None)
    with pytest.raises(AttributeError):
        writer.close()
    assert writer.failed == []


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("batch_size", ["1", "4"])
def test_cli_stops_at_the_first_internal_error_with_exit_3(tiny_sources, tmp_path: Path, monkeypatch, capsys,
                                                           batch_size: str) -> None:
    _three_images(tmp_path / "in")
    broken = BrokenBackbone(monkeypatch, _q_proj)
    code = _segment(tiny_sources, tmp_path / "in", tmp_path / "out", "--batch-size", batch_size)
    err = capsys.readouterr().err
    assert code == 3, err
    # One forward pass: no second image tried (batch size 1), no one-by-one retry of the batch (batch size 4).
    assert broken.calls == 1
    lines = _error_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert "internal error, not a problem with the input" in line and f"AttributeError: {Q_PROJ}" in line
    assert f"torch {TORCH}" in line and f"transformers {TRANSFORMERS}" in line and "report" in line
    # Nothing is blamed on the images.
    assert "photo" not in err and "image(s) failed" not in err and "wrote 0 of" not in err
    assert not list((tmp_path / "out").glob("*.json"))


def test_cli_verbose_shows_the_traceback_of_the_internal_error(tiny_sources, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    _three_images(tmp_path / "in")
    BrokenBackbone(monkeypatch, _q_proj)
    code = main(["-v", "segment", str(tmp_path / "in"), "--labels", "cat", "--out", str(tmp_path / "out"),
                 "--no-progress", *_model_args(tiny_sources)])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback (most recent call last)" in err and "in forward" in err


def test_cli_corrupt_image_among_good_ones_is_still_per_image(tiny_sources, tmp_path: Path, capsys) -> None:
    images = _three_images(tmp_path / "in")
    images[1].write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    code = _segment(tiny_sources, tmp_path / "in", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1, err
    assert "photo1.png: cannot identify image file" in err and "internal error" not in err
    assert "1 image(s) failed" in err
    assert (tmp_path / "out" / "photo0.json").is_file() and (tmp_path / "out" / "photo2.json").is_file()
    assert not (tmp_path / "out" / "photo1.json").exists()


def test_cli_input_error_in_a_batch_retries_one_by_one(tiny_sources, tmp_path: Path, monkeypatch, capsys) -> None:
    _three_images(tmp_path / "in")  # heights 36, 40, 44: the middle one is "bad" for the model
    original = Segmenter._embed_prepared  # the backbone pass under embed_images' isolate-the-bad-image fallback
    calls: list[int] = []

    def embed_prepared(self: Segmenter, images: Any, *args: Any) -> Any:
        calls.append(len(images))
        if any(image.rgb.shape[0] == 40 for image in images):
            raise InvalidInputError("an image the model cannot take")
        return original(self, images, *args)

    monkeypatch.setattr(Segmenter, "_embed_prepared", embed_prepared)
    code = _segment(tiny_sources, tmp_path / "in", tmp_path / "out", "--batch-size", "4")
    err = capsys.readouterr().err
    assert code == 1, err
    assert calls == [3, 1, 1, 1]  # the batch, then each image alone
    assert "photo1.png: an image the model cannot take" in err and "internal error" not in err
    assert (tmp_path / "out" / "photo0.json").is_file() and (tmp_path / "out" / "photo2.json").is_file()


def test_cli_out_of_memory_says_so_and_suggests_a_smaller_batch(tiny_sources, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    _three_images(tmp_path / "in")
    broken = BrokenBackbone(monkeypatch, _oom)
    code = _segment(tiny_sources, tmp_path / "in", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 3 and broken.calls == 1
    (line,) = _error_lines(err)
    assert "out of memory, not a problem with the input" in line and "Tried to allocate 20.00 GiB" in line
    assert "try a smaller --batch-size" in line and "image(s) failed" not in err


def test_cli_internal_error_while_decoding_stops_the_run(tiny_sources, tmp_path: Path, monkeypatch, capsys) -> None:
    _three_images(tmp_path / "in")

    def prepare_image(image: Any, config: Any) -> Any:
        raise TypeError("resized_size() got an unexpected keyword argument 'max_long_side'")

    monkeypatch.setattr("talk2dino.cli.batch.prepare_image", prepare_image)
    code = _segment(tiny_sources, tmp_path / "in", tmp_path / "out", "--workers", "0")
    err = capsys.readouterr().err
    assert code == 3, err
    (line,) = _error_lines(err)
    assert "internal error" in line and "TypeError: resized_size()" in line and "photo" not in err


def test_cli_unexpected_error_outside_a_loop_is_one_line_exit_3(monkeypatch, capsys) -> None:
    def run_models(args: Any) -> int:
        raise KeyError("describe_models")

    monkeypatch.setattr("talk2dino.cli.models.run", run_models)
    assert main(["models"]) == 3
    (line,) = _error_lines(capsys.readouterr().err)
    assert "internal error" in line and "KeyError" in line and f"torch {TORCH}" in line


# ---------------------------------------------------------------------------------------------- eval, extract
@pytest.mark.parametrize(("error", "shown"), [(_q_proj, f"AttributeError: {Q_PROJ}"),
                                              (_unpack, "ValueError: too many values to unpack")])
def test_eval_stops_on_an_internal_error_instead_of_skipping_samples(tiny_sources, tmp_path: Path, monkeypatch,
                                                                     capsys, error, shown: str) -> None:
    from test_eval_runner import make_voc

    data = make_voc(tmp_path / "data")
    broken = BrokenBackbone(monkeypatch, error)
    code = main(["eval", "--dataset", "voc21", "--data-root", str(data), "--out", str(tmp_path / "out"),
                 "--skip-bad", "--short-side", "56", "--window", "28", "--stride", "14", "--no-progress",
                 *_model_args(tiny_sources)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert broken.calls == 1
    (line,) = _error_lines(err)
    assert shown in line and f"transformers {TRANSFORMERS}" in line
    caches = list((tmp_path / "out").glob("voc21-*/progress.rank0.jsonl"))
    assert caches and all(cache.read_text() == "" for cache in caches)  # no sample recorded as skipped
    assert not (tmp_path / "out" / "results.json").exists()


def _tiny_coco(root: Path) -> Path:
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id in (1, 2, 3):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _write_image(root / "train2014" / name, 40, 50, seed=image_id)
        images.append({"file_name": name, "height": 40, "width": 50, "id": image_id})
        annotations.append({"image_id": image_id, "id": 10 + image_id, "caption": f"picture {image_id}"})
    data = {"images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(data), encoding="utf-8")
    return root


@pytest.mark.parametrize(("error", "shown"), [(_q_proj, f"AttributeError: {Q_PROJ}"),
                                              (_unpack, "ValueError: too many values to unpack")])
def test_extract_stops_on_an_internal_error(tiny_sources, tmp_path: Path, monkeypatch, capsys, error,
                                            shown: str) -> None:
    coco = _tiny_coco(tmp_path / "coco")
    broken = BrokenBackbone(monkeypatch, error)
    code = main(["extract", "--coco-root", str(coco), "--out", str(tmp_path / "features"), "--backbone",
                 tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"], "--image-size", "28",
                 "--batch-size", "1", "--num-workers", "0", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert broken.calls == 1
    (line,) = _error_lines(err)
    assert shown in line and f"torch {TORCH}" in line and "skipping image" not in err
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["image_shards"] == []


def test_extract_out_of_memory_names_its_batch_option(tiny_sources, tmp_path: Path, monkeypatch) -> None:
    from talk2dino.config import ExtractConfig
    from talk2dino.extract.run import run_extract

    coco = _tiny_coco(tmp_path / "coco")
    BrokenBackbone(monkeypatch, _oom)
    config = ExtractConfig(coco_root=str(coco), out=str(tmp_path / "features"), backbone=tiny_sources["backbone"],
                           text_encoder=tiny_sources["text_encoder"], image_size=28, batch_size=2, num_workers=0,
                           device="cpu")
    with pytest.raises(InternalError, match=r"out of memory.*try a smaller --batch-size \(or --text-batch-size\)"):
        run_extract(config, progress=False)


# ---------------------------------------------------------------------------------------------- server worker
class _FakeSegmenter:
    """Duck-typed `Segmenter` for the worker: images 13 rows high are bad input, 66 rows high break the model."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    # The real fallback (embed the batch, then one by one on an input error) over a fake backbone pass.
    embed_images = Segmenter.embed_images

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def _embed_prepared(self, images: list[np.ndarray], progress: Any = None) -> list[str]:
        self.calls.append(len(images))
        rows = {image.shape[0] for image in images}
        if 66 in rows:
            raise AttributeError(Q_PROJ)
        if 13 in rows:
            raise InvalidInputError("an image the model cannot take")
        return [f"features of {image.shape[0]}" for image in images]


def _job(rows: int) -> Any:
    from talk2dino.server.worker import OutputOptions, SegmentJob

    return SegmentJob(image=np.zeros((rows, 20, 3), np.uint8), labels=["cat"], background=False, bg_threshold=None,
                      bg_clean=None, pamr=None, outputs=OutputOptions(), deadline=time.monotonic() + 60)


@pytest.fixture
def worker_of() -> Iterator[Callable[..., Any]]:
    from talk2dino.server.worker import InferenceWorker

    workers: list[InferenceWorker] = []

    def make(jobs: list[Any], render: Callable[..., Any] | None = None) -> InferenceWorker:
        def default(segmenter: Any, job: Any, features: Any, timings: Any) -> dict[str, Any]:
            return {"features": features}

        worker = InferenceWorker(_FakeSegmenter(), render or default, queue_size=8, max_batch=8)  # type: ignore[arg-type]
        worker._jobs.extend(jobs)  # queued before the thread starts: one batch
        worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop(timeout=10)


def _outcome(future: Future[dict[str, Any]]) -> Any:
    try:
        return future.result(timeout=30)
    except Exception as err:  # noqa: BLE001 - the test inspects it
        return err


def test_worker_input_error_fails_one_request_and_the_batch_goes_on(worker_of) -> None:
    jobs = [_job(10), _job(13), _job(12)]
    worker = worker_of(jobs)
    good, bad, other = (_outcome(job.future) for job in jobs)
    assert good == {"features": "features of 10"} and other == {"features": "features of 12"}
    assert isinstance(bad, InvalidInputError)
    assert worker.segmenter.calls == [3, 1, 1, 1]
    assert worker.stats["completed"] == 2 and worker.stats["failed"] == 0


def test_worker_internal_error_fails_the_batch_once_without_retry(worker_of, caplog) -> None:
    jobs = [_job(10), _job(66), _job(12)]
    worker = worker_of(jobs)
    outcomes = [_outcome(job.future) for job in jobs]
    assert all(isinstance(o, InternalError) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 1  # one failure, one line, for the whole batch
    assert f"AttributeError: {Q_PROJ}" in str(outcomes[0]) and "server log" in str(outcomes[0])
    assert worker.segmenter.calls == [3]  # no image-by-image retry of a failure that is no image's fault
    assert worker.stats["failed"] == 3 and worker.alive
    assert any("inference batch of 3 request(s) failed" in r.getMessage() for r in caplog.records)
    # The worker serves the next batch.
    later = _job(11)
    worker.reserve()
    worker.submit(later)
    assert _outcome(later.future) == {"features": "features of 11"}


def test_worker_internal_error_while_rendering_is_internal(worker_of) -> None:
    def render(segmenter: Any, job: Any, features: Any, timings: Any) -> dict[str, Any]:
        if job.image.shape[0] == 12:
            raise KeyError("legend")
        return {"features": features}

    jobs = [_job(10), _job(12), _job(14)]
    worker_of(jobs, render)
    first, second, third = (_outcome(job.future) for job in jobs)
    assert first == {"features": "features of 10"}
    assert isinstance(second, InternalError) and "KeyError: 'legend'" in str(second)
    assert isinstance(third, InternalError)  # the batch stopped at the first internal error


# ---------------------------------------------------------------------------------------------- HTTP server
def test_server_answers_500_with_one_line_then_keeps_serving(tiny_model, monkeypatch) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_server import FAST, LIMITS, png_bytes, post_segment, running_server

    from talk2dino.server import create_app

    broken = BrokenBackbone(monkeypatch)
    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        broken.error = _q_proj
        response = post_segment(url, {"labels": "cat, sofa"}, png_bytes())
        assert response.status_code == 500, response.text
        body = response.json()
        assert set(body) == {"error"} and "\n" not in body["error"]
        assert body["error"].startswith("internal error, not a problem with the input: ")
        assert f"AttributeError: {Q_PROJ}" in body["error"]
        assert f"torch {TORCH}" in body["error"] and f"transformers {TRANSFORMERS}" in body["error"]

        broken.error = _oom
        response = post_segment(url, {"labels": "cat"}, png_bytes())
        assert response.status_code == 500
        assert "out of memory" in response.json()["error"] and "--max-batch" in response.json()["error"]

        broken.error = None
        response = post_segment(url, {"labels": "cat"}, b"certainly not an image", name="notes.png")
        assert response.status_code == 400 and "notes.png: cannot identify image file" in response.json()["error"]
        assert post_segment(url, {"labels": "cat, sofa"}, png_bytes()).status_code == 200
        health = httpx.get(f"{url}/healthz").json()
        assert health["worker_alive"] is True and health["queue"]["failed"] == 2
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "500" in schema["paths"]["/v1/segment"]["post"]["responses"]


def test_server_worker_thread_survives_concurrent_failures(tiny_model, monkeypatch) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_server import FAST, LIMITS, png_bytes, post_segment, running_server

    from talk2dino.server import create_app

    broken = BrokenBackbone(monkeypatch, _q_proj)
    with running_server(create_app(Segmenter(tiny_model, FAST), LIMITS)) as url:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(
            post_segment(url, {"labels": "cat"}, png_bytes()).status_code)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [500, 500, 500]
        broken.error = None
        assert post_segment(url, {"labels": "cat"}, png_bytes()).status_code == 200
        assert httpx.get(f"{url}/healthz").json()["worker_alive"] is True
