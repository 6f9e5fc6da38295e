"""Determinism on CPU with the tiny models: same input and settings -> same bits, whatever the batching.

What is bit-identical here, and what is not (and why):

* `Segmenter`: two runs, and ``predict_batch`` against one image at a time, give identical label maps and
  scores for a given ``window_batch_size``. Across *different* window batch sizes the label maps are
  identical on these inputs but scores may differ in the last bits (observed: <= 2e-7, about one float32
  ulp of the sigmoid scores): a CPU matrix product of ``[n·T, D]`` rows does not round every row as the
  same product over fewer rows does (oneDNN/MKL block by the row count), so a window's features depend on
  how many windows share its backbone call. ``window_batch_size=1`` gives the same bits everywhere.
* `talk2dino extract` stores float16 features: shards written with image batch sizes 1, 2 and 4 are
  byte-identical on these inputs (the float32 differences of the batching stay below float16 rounding).
* `talk2dino train` twice gives byte-identical ``projection.safetensors`` and identical checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_extract import make_coco, make_config
from test_training import small_config, synthetic_split, write_features

from talk2dino import InferenceConfig, Segmenter
from talk2dino.extract.run import run_extract
from talk2dino.training.run import run_train
from talk2dino.training.run_folder import CHECKPOINT_FILE

SCORE_TOLERANCE = 1e-6  # across different window batch sizes only (see the module docstring)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


IMAGES = [_image(60, 90, 0), _image(60, 90, 1), _image(40, 40, 2), _image(70, 50, 3)]


def _segment(model: Any, *, window_batch_size: int, batched: bool, pamr: bool = False,
             background: bool = True) -> list[Any]:
    segmenter = Segmenter(model, InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14,
                                                 pamr_iterations=3, pamr=pamr, background=background,
                                                 window_batch_size=window_batch_size))
    segmenter.set_classes(["cat", "dog", "sky"])
    if batched:
        return segmenter.predict_batch(IMAGES)
    results = []
    for image in IMAGES:
        segmenter.set_image(image)
        results.append(segmenter.predict())
    return results


def _identical(a: list[Any], b: list[Any]) -> bool:
    return all(torch.equal(x.labels, y.labels) and torch.equal(x.scores, y.scores) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("pamr", "background"), [(False, True), (True, False)])
def test_two_runs_and_image_batching_give_identical_bits(tiny_model: Any, pamr: bool, background: bool) -> None:
    for window_batch_size in (1, 8):
        first = _segment(tiny_model, window_batch_size=window_batch_size, batched=False, pamr=pamr,
                         background=background)
        again = _segment(tiny_model, window_batch_size=window_batch_size, batched=False, pamr=pamr,
                         background=background)
        assert _identical(first, again), f"two runs differ (window_batch_size={window_batch_size})"
    # One window per backbone call: batching images cannot change any product, so every bit is equal.
    single = _segment(tiny_model, window_batch_size=1, batched=False, pamr=pamr, background=background)
    batched = _segment(tiny_model, window_batch_size=1, batched=True, pamr=pamr, background=background)
    assert _identical(single, batched)


def test_window_batch_sizes_give_identical_labels(tiny_model: Any) -> None:
    reference = _segment(tiny_model, window_batch_size=1, batched=False)
    for window_batch_size in (2, 3, 8, 64):
        for batched in (False, True):
            got = _segment(tiny_model, window_batch_size=window_batch_size, batched=batched)
            for ref, result in zip(reference, got, strict=True):
                assert torch.equal(ref.labels, result.labels), (window_batch_size, batched)
                torch.testing.assert_close(result.scores, ref.scores, rtol=0, atol=SCORE_TOLERANCE)


def test_extract_batch_sizes_give_identical_shards(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    coco = make_coco(tmp_path / "coco")
    folders = [run_extract(make_config(coco, tmp_path / f"b{batch}", tiny_sources, batch_size=batch, shard_size=4),
                           progress=False) for batch in (1, 2, 4)]
    names = sorted(p.name for p in folders[0].glob("*.safetensors"))
    assert len(names) == 6  # 9 input images in shards of 4: 3 image + 3 caption shards
    for folder in folders[1:]:
        assert sorted(p.name for p in folder.glob("*.safetensors")) == names
        for name in names:
            assert (folder / name).read_bytes() == (folders[0] / name).read_bytes(), (folder.name, name)


def test_train_twice_gives_identical_checkpoints(tmp_path: Path) -> None:
    split = synthetic_split(24, num_heads=3, dim=8, captions_per_image=2, seed=5)
    features = {"train": write_features(tmp_path / "features", heads=split["heads"], text=split["text"],
                                        caption_image=split["caption_image"], shard_images=10, shard_captions=20)}
    features["val"] = features["train"]
    runs = [run_train(small_config(features, tmp_path / f"run{i}", epochs=2, batch_size=8), progress=False)
            for i in range(2)]
    assert (runs[0] / "projection.safetensors").read_bytes() == (runs[1] / "projection.safetensors").read_bytes()
    a, b = (torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True) for run in runs)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert all(torch.equal(a["psi"][k], b["psi"][k]) for k in a["psi"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "val")} for r in a["log"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "val")} for r in b["log"]]
    assert [r["val"]["recall@1"] for r in a["log"]] == [r["val"]["recall@1"] for r in b["log"]]
