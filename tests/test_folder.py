"""Folder-scale segmentation (issue 6, target 4): decoding in worker processes, background writing, and
``torch.compile`` of the fast path. Every variant must give exactly the results of the plain in-process loop."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_args as _model_args
from PIL import Image

from talk2dino import InferenceConfig, Segmenter, create_model
from talk2dino.cli import main
from talk2dino.cli.batch import BackgroundWriter, PreparedFile, default_workers, prepared_batches
from talk2dino.prepare import prepare_image

CONFIG = InferenceConfig(short_side=56, window=28, stride=14, background=True)


def _images(folder: Path, count: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = 40 + 4 * i, 60 - 3 * i
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file except the JSON summaries (they record timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix != ".json"}


def test_worker_processes_prepare_exactly_what_the_main_process_does(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in")
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    order = [paths[0], bad, *paths[1:]]
    in_process = [item for batch in prepared_batches(order, CONFIG, batch_size=2, workers=0) for item in batch]
    workers = [item for batch in prepared_batches(order, CONFIG, batch_size=2, workers=2) for item in batch]
    assert [i.path for i in in_process] == [i.path for i in workers] == order  # order kept across workers
    for a, b in zip(in_process, workers, strict=True):
        assert (a.image is None) == (b.image is None) and a.error == b.error
        if a.image is not None and b.image is not None:
            assert torch.equal(a.image.guides, b.image.guides) and a.image.boxes == b.image.boxes
            assert np.array_equal(a.image.rgb, b.image.rgb)
    failed = [i for i in workers if i.image is None]
    assert len(failed) == 1 and failed[0].path == bad
    assert failed[0].error is not None and "broken.png" in failed[0].error and "\n" not in failed[0].error


def test_prepared_images_embed_like_raw_images(tiny_sources: dict[str, str]) -> None:
    segmenter = Segmenter(create_model(None, device="cpu", **tiny_sources), CONFIG)
    segmenter.set_classes(["cat", "sky"])
    rgb = np.random.default_rng(1).integers(0, 256, (44, 70, 3), dtype=np.uint8)
    prepared = prepare_image(rgb, CONFIG)
    assert segmenter.prepare(prepared) is prepared
    raw, pre = segmenter.embed_images([rgb])[0], segmenter.embed_images([prepared])[0]
    assert torch.equal(raw.output.patch_tokens, pre.output.patch_tokens)
    assert torch.equal(segmenter.predict_features(raw).labels, segmenter.predict_features(pre).labels)


def test_segment_with_workers_writes_the_same_files(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    _images(tmp_path / "in")
    (tmp_path / "in" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    outs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        code = main(["-q", "segment", str(tmp_path / "in"), "--labels", "cat, sofa", "--background",
                     "--batch-size", "2", "--workers", workers, "--out", str(out), *_model_args(tiny_sources)])
        assert code == 1  # the broken file fails, every other image is written
        outs[workers] = _digests(out)
    assert len(outs["0"]) == 15  # 5 images x (labels, legend, overlay)
    assert outs["0"] == outs["2"]


def test_negative_workers_is_a_usage_error(tiny_sources: dict[str, str], tmp_path: Path, capsys) -> None:
    _images(tmp_path / "in", count=1)
    code = main(["segment", str(tmp_path / "in"), "--labels", "cat", "--workers", "-1", *_model_args(tiny_sources)])
    assert code == 2
    assert "--workers must be >= 0" in capsys.readouterr().err


def test_background_writer_keeps_order_bounds_the_backlog_and_collects_failures() -> None:
    writer = BackgroundWriter(max_pending=2)
    done: list[str] = []
    started = threading.Event()

    def job(key: str) -> None:
        started.set()
        time.sleep(0.01)
        if key == "bad":
            raise OSError("disk full")

    for key in ("a", "bad", "b", "c"):
        writer.submit(key, lambda k=key: job(k), on_done=lambda k=key: done.append(k))
        assert len(writer._pending) <= 2
    writer.close()
    assert done == ["a", "bad", "b", "c"]  # callbacks in submission order, failures included
    assert writer.failed == ["bad"]


def test_default_workers_follow_the_device() -> None:
    assert default_workers(torch.device("cpu")) == 0
    assert 1 <= default_workers(torch.device("cuda")) <= 8


def test_prepared_file_pins_only_real_images() -> None:
    item = PreparedFile(Path("x.png"), None, "x.png: bad")
    assert item.pin_memory() is item


def test_compiled_fast_path_equals_eager(tiny_sources: dict[str, str]) -> None:
    """torch.compile (aot_eager: dynamo tracing without code generation, fast on CPU) of the fast path."""
    model = create_model(None, device="cpu", **tiny_sources)
    x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    eager = model.backbone(x)
    model.backbone.compile_fast_path(backend="aot_eager")
    compiled = model.backbone(x)
    for name in ("patch_tokens", "cls_token", "register_tokens", "attn_logits"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-5, rtol=1e-5)


def test_segment_compile_flag(tiny_sources: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TALK2DINO_COMPILE_BACKEND", "aot_eager")
    _images(tmp_path / "in", count=2)
    outs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "eager")
        assert main(["-q", "segment", str(tmp_path / "in"), "--labels", "cat, sofa", "--no-pamr", *flag,
                     "--out", str(out), *_model_args(tiny_sources)]) == 0
        outs[bool(flag)] = _digests(out)
    assert outs[True] == outs[False]


@pytest.mark.parametrize("runtime", ["onnx"])
def test_compile_refuses_the_onnx_runtime(tmp_path: Path, capsys, runtime: str) -> None:
    img = _images(tmp_path / "in", count=1)[0]
    code = main(["segment", str(img), "--labels", "cat", "--compile", "--runtime", runtime,
                 "--onnx-dir", str(tmp_path)])
    assert code == 2
