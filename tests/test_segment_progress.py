"""Issue 13, points 5 and 9: progress as the backbone works, per-image embed time, the parts of a composed
model named, and quiet loading and label truncation (one line per label, no transformers warning)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_model_args as _model_args
from conftest import write_noise_image as _write_image

from talk2dino.cli import main
from talk2dino.config import InferenceConfig
from talk2dino.predictor import Segmenter


def test_embed_images_reports_each_backbone_chunk(tiny_model) -> None:
    segmenter = Segmenter(tiny_model, InferenceConfig(window_batch_size=2, pamr=False))
    images = [np.zeros((60, 200, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)]
    prepared = [segmenter.prepare(image) for image in images]
    windows = [p.guides.shape[0] for p in prepared]
    assert windows[0] > 2  # several chunks for the first image
    calls: list[tuple[int, int]] = []
    segmenter.embed_images(prepared, progress=lambda image, count: calls.append((image, count)))
    assert all(0 < count <= 2 for _, count in calls)
    assert [sum(c for i, c in calls if i == k) for k in range(2)] == windows
    assert len(calls) >= (sum(windows) + 1) // 2


class _RecordingBar:
    """Stands in for tqdm in run_segment: records every update."""

    instances: list[_RecordingBar] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.total = kwargs.get("total")
        self.updates: list[float] = []
        _RecordingBar.instances.append(self)

    def update(self, n: float = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_segment_progress_moves_during_the_batch_and_embed_time_is_per_image(
        tiny_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _RecordingBar)
    _RecordingBar.instances.clear()
    images = tmp_path / "in"
    images.mkdir()
    _write_image(images / "a_wide.png", 60, 300)
    _write_image(images / "b_small.png", 40, 40, seed=1)
    _write_image(images / "c_mid.png", 60, 120, seed=2)
    out = tmp_path / "out"
    code = main(["segment", str(images), "--labels", "cat, sofa", "--no-pamr", "--window-batch-size", "1",
                 "--batch-size", "3", "--out", str(out), *_model_args(tiny_sources)])
    assert code == 0
    (bar,) = _RecordingBar.instances
    assert bar.total == 3
    assert sum(bar.updates) == pytest.approx(3)
    # The one backbone call of the batch moved the bar window by window, not 0 then 3.
    fractional = [u for u in bar.updates if 0 < u < 1]
    assert len(fractional) >= 5

    summaries = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    embed = {stem: s["timings"]["embed_image"] for stem, s in summaries.items()}
    # Per image: the batch's backbone time split by windows, so the wide image took longer than the small one
    # (before, each image reported the same batch average).
    assert embed["a_wide"] > embed["b_small"] > 0

    model = summaries["a_wide"]["model"]
    assert model["name"] == "composed"  # still short (the server and page show it)
    assert model["description"] == (f"composed: backbone={tiny_sources['backbone']}, "
                                    f"text={tiny_sources['text_encoder']}, projection={tiny_sources['projection']}")
    assert model["parts"]["backbone"] == {"source": tiny_sources["backbone"], "overridden": True}


def test_long_label_is_one_warning_line_and_no_transformers_warning(
        tiny_model, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    tokenizer = tiny_model.text_encoder.tokenizer
    # transformers warns once per tokenizer object; earlier tests (and the CLI's quiet setting) may have used it.
    getattr(tokenizer, "deprecation_warnings", {}).pop("sequence-length-is-longer-than-the-specified-maximum", None)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        segmenter = Segmenter(tiny_model, InferenceConfig(pamr=False))
        with caplog.at_level(logging.WARNING, logger="talk2dino"):
            segmenter.set_classes(["cat", "big fluffy cat " * 40, "dog"])
    finally:
        hf_logging.set_verbosity(old)
    ours = [r for r in caplog.records if r.name.startswith("talk2dino")]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    message = ours[0].getMessage()
    assert message.startswith("label 2 'big fluffy cat") and "cut to 77" in message
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_text_encoder_encode_warns_once_per_call(tiny_model, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="talk2dino"):
        tiny_model.text_encoder.encode(["cat " * 200, "dog " * 200, "bird"], batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("talk2dino")]
    assert len(lines) == 1 and lines[0].startswith("2 prompt(s) longer than 77 tokens")


def test_loading_a_model_shows_no_transformers_progress_bars(tiny_sources, capfd: pytest.CaptureFixture[str]) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    from talk2dino import create_model

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process (the CLI tests in this one turn them off)
    try:
        capfd.readouterr()
        create_model(None, device="cpu", **tiny_sources)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # the user's setting is left as it was
        registry_logger = logging.getLogger("talk2dino.factory")
        old_level = registry_logger.level
        registry_logger.setLevel(logging.DEBUG)  # the CLI's -v: the bars show
        try:
            create_model(None, device="cpu", **tiny_sources)
        finally:
            registry_logger.setLevel(old_level)
        if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x shows a bar only for sharded checkpoints
            assert "Loading weights" in capfd.readouterr().err
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
