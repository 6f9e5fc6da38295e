"""`talk2dino segment` end to end on a tiny model, called in-process through `main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_args as _model_args
from conftest import write_noise_image as _write_image
from PIL import Image

from talk2dino.cli import main
from talk2dino.cli.main import build_parser
from talk2dino.labels import split_labels


def test_segment_writes_every_output_and_reports_bad_files(tiny_sources, tmp_path: Path, capsys) -> None:
    images = tmp_path / "in"
    images.mkdir()
    good = _write_image(images / "photo.png", 40, 60)
    _write_image(images / "other.jpg", 30, 20, seed=1)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code = main(["segment", str(images), "--labels", "cat, sofa ,window", "--background", "--save-scores",
                 "--out", str(out), "--no-progress", *_model_args(tiny_sources)])
    assert code == 1  # one file failed, the others were written
    assert "broken.png: cannot identify image file" in capsys.readouterr().err
    labels = Image.open(out / "photo_labels.png")
    assert labels.mode == "P" and labels.size == (60, 40)
    overlay = Image.open(out / "photo_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (60, 40)
    summary = json.loads((out / "photo.json").read_text())
    assert summary["image"] == str(good)
    assert [e["name"] for e in summary["labels"]] == ["background", "cat", "sofa", "window"]
    assert abs(sum(e["share"] for e in summary["labels"]) - 1) < 1e-5
    assert summary["settings"]["background"] is True and summary["settings"]["bg_clean"] is True
    assert summary["settings"]["pamr"] is True
    scores = np.load(out / "photo_scores.npz")
    assert scores["scores"].dtype == np.float16 and scores["scores"].shape == (4, 40, 60)
    assert list(scores["class_names"]) == ["background", "cat", "sofa", "window"]
    # The label PNG is the argmax of the saved scores' softmax, up to float16 rounding at near-ties.
    agree = (np.asarray(labels) == scores["scores"].astype(np.float32).argmax(0)).mean()
    assert agree > 0.99
    assert (out / "other.json").is_file()
    assert not (out / "broken.json").exists()


def test_segment_all_good_exits_zero_and_honours_options(tiny_sources, tmp_path: Path) -> None:
    img = _write_image(tmp_path / "a.png")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\n\n  dog  \nsky_blue\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["-q", "segment", str(img), "--labels-file", str(labels_file), "--underscores-to-spaces",
                 "--no-pamr", "--no-overlay", "--out", str(out), *_model_args(tiny_sources)])
    assert code == 0
    summary = json.loads((out / "a.json").read_text())
    assert [e["name"] for e in summary["labels"]] == ["cat", "dog", "sky blue"]
    assert summary["settings"]["pamr"] is False and summary["settings"]["background"] is False
    assert not (out / "a_overlay.png").exists()


@pytest.mark.parametrize("labels, message", [
    ("cat,,dog", "entry 2 of 3 is empty"),
    ("cat, cat", "duplicate label 'cat'"),
    ("background, cat", "clashes with the background channel"),
])
def test_bad_labels_exit_2_with_one_line(tiny_sources, tmp_path: Path, capsys, labels: str, message: str) -> None:
    img = _write_image(tmp_path / "a.png")
    code = main(["segment", str(img), "--labels", labels, "--background", "--out", str(tmp_path / "o"),
                 *_model_args(tiny_sources)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_model_and_missing_input(tmp_path: Path, capsys) -> None:
    img = _write_image(tmp_path / "a.png")
    assert main(["segment", str(img), "--labels", "cat", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.png"), "--labels", "cat"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_models_subcommand_lists_registry(capsys) -> None:
    assert main(["models"]) == 0
    assert "talk2dino-vitb14-reg\t" in capsys.readouterr().out


def test_split_labels_trims_and_keeps_inner_spaces() -> None:
    assert split_labels(" cat ,  dining table,tv") == ["cat", "dining table", "tv"]


def test_help_documents_the_flags_the_readme_uses() -> None:
    parser = build_parser()
    seg_help = parser._subparsers._group_actions[0].choices["segment"].format_help()  # type: ignore[union-attr]
    for flag in ("--labels", "--labels-file", "--background", "--bg-threshold", "--bg-clean", "--pamr", "--model",
                 "--device", "--dtype", "--out", "--save-scores", "--cache-dir", "--offline"):
        assert flag in seg_help
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if readme.is_file():
        for line in readme.read_text().splitlines():
            if line.strip().startswith("talk2dino segment"):
                for token in line.split():
                    if token.startswith("--"):
                        assert token in seg_help, f"README uses unknown flag {token}"


# ---------------------------------------------------------------------------------------------- pictures, serve
def test_segment_saves_heatmap_and_attention_grids(tiny_sources, tmp_path: Path, tiny_model) -> None:
    img = _write_image(tmp_path / "a.png", 40, 60)
    out = tmp_path / "out"
    code = main(["-q", "segment", str(img), "--labels", "cat, sofa", "--background", "--no-pamr", "--save-heatmaps",
                 "--save-attention", "--out", str(out), *_model_args(tiny_sources)])
    assert code == 0
    summary = json.loads((out / "a.json").read_text())
    assert summary["files"]["heatmaps"] == "a_heatmaps.png" and summary["files"]["attention"] == "a_attention.png"
    heat = np.asarray(Image.open(out / "a_heatmaps.png"))
    attention = np.asarray(Image.open(out / "a_attention.png"))
    assert heat.ndim == 3 and heat.shape[2] == 3
    # Two label tiles side by side (background left out); four heads of the tiny model in a 2x2 grid.
    assert heat.shape[1] > 2 * 256 and attention.shape[1] > 2 * 256 and attention.shape[0] > 2 * 150
    assert tiny_model.backbone.model.config.num_attention_heads == 4


def test_serve_flags_and_environment_build_the_server_config(monkeypatch) -> None:
    from talk2dino.cli.serve import serve_config

    parser = build_parser()
    monkeypatch.setenv("TALK2DINO_SERVE_PORT", "9001")
    monkeypatch.setenv("TALK2DINO_SERVE_QUEUE_SIZE", "3")
    config = serve_config(parser.parse_args(["serve", "--port", "9002", "--max-labels", "10", "--allow-image-url"]))
    assert (config.port, config.queue_size, config.max_labels, config.allow_image_url) == (9002, 3, 10, True)
    assert config.host == "127.0.0.1"  # loopback unless asked


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--model", "no-such-model", "--port", "0"], "unknown model 'no-such-model'"),
    (["serve", "--max-labels", "300"], "--max-labels must be in [1, 255]"),
    (["serve", "--queue-size", "0"], "--queue-size must be >= 1"),
])
def test_serve_refuses_to_start_with_one_line(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_bad_environment_exits_2(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TALK2DINO_SERVE_MAX_BATCH", "many")
    assert main(["serve"]) == 2
    assert "TALK2DINO_SERVE_MAX_BATCH='many' is not a valid int" in capsys.readouterr().err


def test_serve_command_runs_and_stops_cleanly(tiny_sources) -> None:
    """`talk2dino serve` as a user runs it: a subprocess on loopback, /healthz answers, SIGINT stops it (exit 0)."""
    pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "talk2dino.cli", "serve", "--port", str(port), "--no-pamr",
                             *_model_args(tiny_sources)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        health = None
        while health is None:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    health = json.loads(response.read())
            except OSError:
                time.sleep(0.2)
        assert health["status"] == "ok" and health["model"] == "composed"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out == ""  # logs go to stderr, never stdout
    assert f"http://127.0.0.1:{port}" in err
