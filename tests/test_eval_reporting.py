"""Issue 13, point 14: eval's messages, help, results.md and sweep plot; convert's summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino.config import EvalConfig
from talk2dino.errors import InvalidInputError
from talk2dino.evaluation.runner import benchmarks_for, run_eval

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_runner import _config, make_voc  # noqa: E402


def test_unknown_dataset_lists_every_valid_name_folder_included() -> None:
    with pytest.raises(InvalidInputError) as info:
        benchmarks_for(EvalConfig(dataset="voc"))
    message = str(info.value)
    for name in ("voc20", "voc21", "context59", "context60", "coco_stuff", "coco_object", "cityscapes", "ade20k",
                 "folder"):
        assert name in message
    assert "ade20k, folder" in message  # folder as a valid name, not only "use folder_benchmark"


def test_light_copies_match_the_benchmarks() -> None:
    from talk2dino.data.benchmarks import BENCHMARKS, FOLDER_LAYOUT_HELP
    from talk2dino.evaluation import DATASET_NAMES
    from talk2dino.evaluation import FOLDER_LAYOUT_HELP as LIGHT_HELP
    from talk2dino.evaluation.runner import dataset_names

    assert list(DATASET_NAMES) == [*BENCHMARKS, "folder"] == dataset_names()
    assert LIGHT_HELP == FOLDER_LAYOUT_HELP


def test_wrong_folder_layout_names_images_labels_and_classes_file(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("sky\ntree\n")
    (tmp_path / "data" / "pictures").mkdir(parents=True)  # not images/
    config = EvalConfig(dataset="folder", root=str(tmp_path / "data"), classes_file=str(classes))
    (spec,) = benchmarks_for(config)
    from talk2dino.data.samples import list_samples

    with pytest.raises(InvalidInputError) as info:
        list_samples(spec, tmp_path / "data")
    message = str(info.value)
    assert "images/" in message and "labels/" in message and "classes file" in message
    with pytest.raises(InvalidInputError, match=r"images/.*labels/.*classes file"):
        benchmarks_for(EvalConfig(dataset="folder", root=str(tmp_path / "data")))


def test_eval_help_describes_the_folder_layout_and_pamr_default(capsys: pytest.CaptureFixture[str]) -> None:
    from talk2dino.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ROOT/images/" in text and "ROOT/labels/" in text and "--classes-file" in text
    assert "folder" in text.rsplit("--dataset DATASET", 1)[1].split("--root", 1)[0]
    assert "default off in eval" in text and "segment" in text


def test_results_md_has_per_class_table_and_flags_a_partial_split(tiny_sources, tmp_path: Path) -> None:
    data = make_voc(tmp_path / "data")
    out = run_eval(_config(data, tmp_path / "out", tiny_sources, limit=2), progress=False)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown == out["markdown"]
    assert "| 2 of 1449 |" in markdown
    assert "**Partial split:** VOC-21" in markdown or "**Partial split:**" in markdown
    assert "2 of 1449 images (--limit 2, the split on disk lists 3)" in markdown
    assert "per-class IoU" in markdown
    assert "| person |" in markdown and "| background |" in markdown
    assert out["records"][0]["partial"] is True and out["records"][0]["split_images"] == 1449


def test_log_names_the_overriding_weights(tiny_sources, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_voc(tmp_path / "data", stems=("2007_000001",))
    with caplog.at_level(logging.INFO, logger="talk2dino.evaluation.runner"):
        run_eval(_config(data, tmp_path / "out", tiny_sources, limit=1), progress=False)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating")]
    assert tiny_sources["backbone"] in line and tiny_sources["projection"] in line
    assert not line.startswith("evaluating talk2dino-vitb14-reg on")


def test_sweep_plot_has_axis_labels_and_ticks(tmp_path: Path) -> None:
    from talk2dino.render import line_chart

    points = [(0.5, 41.2), (0.55, 43.9), (0.6, 42.1)]
    plain = np.asarray(Image.open(line_chart(points, tmp_path / "a.png", title="t")).convert("L"))
    labelled = np.asarray(Image.open(line_chart(points, tmp_path / "b.png", title="t", x_label="background threshold",
                                                y_label="mIoU (%)")).convert("L"))
    h, w = labelled.shape
    assert (labelled[h - 28:, 200:440] < 128).any() and not (plain[h - 28:, 200:440] < 128).any()  # x label
    assert (labelled[150:250, :20] < 128).any() and not (plain[150:250, :20] < 128).any()  # y label
    assert (labelled[50:350, 20:45] < 128).sum() > 20  # y tick values


def test_sweep_writes_a_labelled_plot(tiny_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import talk2dino.render as render

    seen: dict[str, object] = {}
    original = render.line_chart

    def spy(points, path, **kwargs):
        seen.update(kwargs)
        return original(points, path, **kwargs)

    monkeypatch.setattr(render, "line_chart", spy)
    data = make_voc(tmp_path / "data", stems=("2007_000001",))
    run_eval(_config(data, tmp_path / "out", tiny_sources, bg_threshold=(0.5, 0.6), limit=1), progress=False)
    assert seen["x_label"] == "background threshold" and seen["y_label"] == "mIoU (%)"
    assert (tmp_path / "out" / "sweep-voc21.png").is_file()


def test_convert_prints_a_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from talk2dino.cli import main

    raw = tmp_path / "stuffthingmaps" / "val2017"
    raw.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(raw / "000000000139.png")
    assert main(["convert", "coco-object", str(raw), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "talk2dino.cli: coco-object: wrote 1 label map\n" in err
    assert "ConversionCounts(" not in err
    assert main(["convert", "coco-object", str(raw), "--out", str(tmp_path / "out")]) == 0
    assert "wrote 0 label maps; kept 1 that already existed (pass --overwrite to rewrite it)" in capsys.readouterr().err
