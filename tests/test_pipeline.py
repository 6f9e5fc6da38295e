"""The user journey of issue 3 through the CLI: extract -> train -> segment with the trained psi."""

from __future__ import annotations

import json
from pathlib import Path

from test_extract import make_coco

from talk2dino.cli import main


def test_extract_train_segment_round_trip(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    coco = make_coco(tmp_path / "coco")
    feats, run, out = tmp_path / "feats", tmp_path / "run", tmp_path / "out"
    common = ["--backbone", tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"]]
    assert main(["-q", "extract", "--coco-root", str(coco), "--split", "train", "--out", str(feats),
                 "--image-size", "28", "--shard-size", "4", "--num-workers", "0", "--device", "cpu", *common]) == 0
    assert main(["-q", "train", "--features", str(feats), "--out", str(run), "--epochs", "2", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    image = next((coco / "train2014").glob("*.jpg"))
    assert main(["-q", "segment", str(image), "--labels", "cat, dog", "--model", f"local-dir:{run}",
                 "--device", "cpu", "--no-pamr", "--out", str(out)]) == 0
    summary = json.loads((out / f"{image.stem}.json").read_text())
    assert summary["model"]["weights"]["projection"]["path"].endswith("projection.safetensors")
    assert summary["model"]["weights"]["backbone"]["source"] == tiny_sources["backbone"]
    # Training again into the same folder without --resume is refused, and nothing is overwritten.
    before = (run / "projection.safetensors").read_bytes()
    assert main(["-q", "train", "--features", str(feats), "--out", str(run), "--epochs", "2",
                 "--batch-size", "4", "--device", "cpu"]) == 2
    assert (run / "projection.safetensors").read_bytes() == before


def test_head_selection_ablation_writes_one_table(tiny_sources: dict[str, str], tmp_path: Path, capsys) -> None:
    coco = make_coco(tmp_path / "coco")
    feats = tmp_path / "feats"
    assert main(["-q", "extract", "--coco-root", str(coco), "--out", str(feats), "--image-size", "28",
                 "--num-workers", "0", "--device", "cpu", "--backbone", tiny_sources["backbone"],
                 "--text-encoder", tiny_sources["text_encoder"]]) == 0
    out = tmp_path / "runs"
    assert main(["-q", "train", "--features", str(feats), "--val-features", str(feats), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--head-selection", "max,cls"]) == 0
    table = (out / "ablation.md").read_text()
    assert "| max |" in table and "| cls |" in table and "recall@1" in table
    assert (out / "max" / "projection.safetensors").is_file() and (out / "ablation.png").is_file()
    assert main(["-q", "train", "--features", str(feats), "--out", str(tmp_path / "x"),
                 "--head-selection", "median"]) == 2
    assert "unknown ['median']" in capsys.readouterr().err


def test_eval_command_and_model_comparison(tiny_sources: dict[str, str], tmp_path: Path, capsys) -> None:
    from test_eval_runner import make_voc

    data = make_voc(tmp_path / "data")
    common = ["--dataset", "voc20", "--root", str(data / "VOCdevkit" / "VOC2012"), "--device", "cpu",
              "--backbone", tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"],
              "--projection", tiny_sources["projection"], "--short-side", "56", "--window", "28", "--stride", "14"]
    assert main(["-q", "eval", *common, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert "| V20 |" in capsys.readouterr().out
    record = json.loads((tmp_path / "one" / "results.json").read_text())["records"][0]
    assert record["tag"] == "V20" and record["settings"]["inference"]["background"] is False
    assert main(["-q", "eval", *common, "--out", str(tmp_path / "two"), "--no-progress",
                 "--models", "talk2dino-vitb14-reg,talk2dino-vitb14-reg.2024"]) == 0
    table = (tmp_path / "two" / "ablation.md").read_text()
    assert "### talk2dino-vitb14-reg\n" in table and "### talk2dino-vitb14-reg.2024" in table
    assert main(["-q", "eval", "--out", str(tmp_path / "bad")]) == 2
    assert "exactly one of --dataset" in capsys.readouterr().err


def test_convert_cityscapes_command(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    city = tmp_path / "gtFine" / "val" / "bonn"
    city.mkdir(parents=True)
    Image.fromarray(np.array([[7, 26], [0, 24]], np.uint8)).save(city / "bonn_000000_000019_gtFine_labelIds.png")
    assert main(["-q", "convert", "cityscapes", str(tmp_path / "gtFine")]) == 0
    out = np.array(Image.open(city / "bonn_000000_000019_gtFine_labelTrainIds.png"))
    assert out.tolist() == [[0, 13], [255, 11]]  # road, car, unlabeled, person


def test_eval_backbone_ablation_across_families(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    """segment -> eval round trip for a DINOv2 and a DINO v1 backbone, each with its own psi."""
    from conftest import save_tiny_dino_vit, save_tiny_projection
    from test_eval_runner import make_voc

    data = make_voc(tmp_path / "data")
    dino_v1 = save_tiny_dino_vit(tmp_path / "dino_v1")
    psi_v1 = save_tiny_projection(tmp_path / "psi_v1.pth", out_dim=_hidden_size(dino_v1))
    backbones = f"{tiny_sources['backbone']},local-dir:{dino_v1}"
    projections = f"{tiny_sources['projection']},{psi_v1}"
    assert main(["-q", "eval", "--dataset", "voc20", "--root", str(data / "VOCdevkit" / "VOC2012"), "--device", "cpu",
                 "--text-encoder", tiny_sources["text_encoder"], "--backbones", backbones, "--projections",
                 projections, "--short-side", "56", "--window", "56", "--stride", "28", "--out",
                 str(tmp_path / "abl"), "--no-progress"]) == 0  # 56: a multiple of both patch sizes (14, 8)
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("| V20 |") == 2 and f"### local-dir:{dino_v1}" in table
    assert main(["-q", "eval", "--dataset", "voc20", "--root", str(data), "--backbones", backbones]) == 2


def _hidden_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["hidden_size"])
