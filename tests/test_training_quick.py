"""Issue 13, point 15: --max-steps, progress bars vs log lines, sources stored as given."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from talk2dino.config import TrainConfig
from talk2dino.training.loop import Callback, Trainer
from talk2dino.training.run import run_train
from talk2dino.training.run_folder import CHECKPOINT_FILE

sys.path.insert(0, str(Path(__file__).parent))
from test_training import read_log, synthetic_split, write_features  # noqa: E402


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = synthetic_split(40, num_heads=3, dim=8, captions_per_image=3, seed=1)  # 120 captions
    return write_features(tmp_path_factory.mktemp("quick") / "train", heads=data["heads"], text=data["text"],
                          caption_image=data["caption_image"],
                          backbone="hf-hub:facebook/dinov2-with-registers-base",
                          text_source="hf-hub:openai/clip-vit-base-patch16")


def test_max_steps_stops_the_loop_and_is_recorded(features: Path, tmp_path: Path) -> None:
    config = TrainConfig(features=str(features), out=str(tmp_path / "run"), epochs=5, batch_size=16, device="cpu",
                         max_steps=10)  # 8 steps per epoch: one full epoch and 2 steps of the second
    out = run_train(config, progress=False)
    log = read_log(out)
    assert [r["step"] for r in log] == [8, 10]
    checkpoint = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 10
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 10


def test_max_steps_flag(features: Path, tmp_path: Path) -> None:
    from talk2dino.cli import main

    out = tmp_path / "run"
    code = main(["train", "--features", str(features), "--out", str(out), "--epochs", "3", "--batch-size", "16",
                 "--device", "cpu", "--max-steps", "3", "--no-progress", "-q"])
    assert code == 0
    assert [r["step"] for r in read_log(out)] == [3]
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 3


def test_max_steps_must_be_positive(features: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        run_train(TrainConfig(features=str(features), out=str(tmp_path / "run"), max_steps=0), progress=False)


def _screen(text: str) -> list[str]:
    """What a terminal shows: '\\r' returns to column 0 and overwrites, '\\n' starts a new line."""
    lines, current, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(current).rstrip())
            current, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(current):
                current[col] = ch
            else:
                current.append(ch)
            col += 1
    lines.append("".join(current).rstrip())
    return lines


class _LogMidEpoch(Callback):
    def on_batch_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.global_step == 3:
            logging.getLogger("talk2dino.test").warning("a message while the bar is shown")


def test_log_lines_and_progress_bar_do_not_overwrite_each_other(features: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's basicConfig(stream=sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        config = TrainConfig(features=str(features), out=str(tmp_path / "run"), epochs=2, batch_size=16,
                             device="cpu")
        run_train(config, progress=True, callbacks=[_LogMidEpoch()])
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    screen = _screen(stream.getvalue())
    shown = [line for line in screen if "a message while the bar is shown" in line]
    assert shown == ["WARNING talk2dino.test: a message while the bar is shown"], screen
    assert any(line.startswith("INFO talk2dino.training.run: epoch 1/2") for line in screen), screen


def test_run_folder_keeps_sources_as_given(features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(features.parent)
    out = run_train(TrainConfig(features="train", out="run", epochs=1, batch_size=64, device="cpu"), progress=False)
    assert not out.is_absolute()
    model = json.loads((tmp_path.parent / features.parent / out / "talk2dino.json").read_text())
    assert model["backbone"]["source"] == "hf-hub:facebook/dinov2-with-registers-base"
    assert model["text"]["source"] == "hf-hub:openai/clip-vit-base-patch16"
    saved = json.loads((features.parent / out / "train_config.json").read_text())
    assert (saved["features"], saved["out"]) == ("train", "run")
    info = json.loads((features.parent / out / "projection.json").read_text())
    assert info["features"]["folder"] == "train" and info["train_config"]["features"] == "train"
    everything = "".join(p.read_text(errors="replace") for p in (features.parent / out).glob("*.json*"))
    assert os.fspath(features.parent) not in everything
