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
