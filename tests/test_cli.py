"""`talk2dino segment` end to end on a tiny model, called in-process through `main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino.cli import build_parser, main, parse_label_list


def _write_image(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _model_args(tiny_sources: dict[str, str]) -> list[str]:
    return ["--backbone", tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"],
            "--projection", tiny_sources["projection"], "--device", "cpu"]


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


def test_parse_label_list_trims_and_keeps_inner_spaces() -> None:
    assert parse_label_list(" cat ,  dining table,tv") == ["cat", "dining table", "tv"]


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
