"""The benchmark runner end to end on tiny VOC-layout data with a tiny model: records, resume, sweeps, shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from talk2dino import Segmenter
from talk2dino.config import EvalConfig
from talk2dino.data.benchmarks import get_benchmark
from talk2dino.data.samples import list_samples, load_sample
from talk2dino.errors import InvalidInputError
from talk2dino.evaluation.metric import ConfusionMatrix
from talk2dino.evaluation.runner import evaluate_benchmark, inference_config, option_grid, run_eval

STEMS = ("2007_000001", "2007_000002", "2007_000003")


def make_voc(root: Path, *, bad_label: bool = False, stems: tuple[str, ...] = STEMS) -> Path:
    """A VOC2012 folder in the published layout with small images (one per stem) and palette label maps."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for i, stem in enumerate(stems):
        h, w = 30 + 4 * i, 44
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        label = np.zeros((h, w), np.uint8)
        label[: h // 2] = 15  # person
        label[h // 2:, : w // 2] = 8  # cat
        label[-2:] = 255  # boundary pixels, ignored
        if bad_label and i == 1:
            label[0, 0] = 40  # outside VOC's 21 classes
        img = Image.fromarray(label, mode="P")
        img.putpalette(palette)
        img.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems) + "\n")
    return root


def _config(data: Path, out: Path, tiny_sources: dict[str, str], **kw) -> EvalConfig:
    values = dict(dataset="voc21", data_root=str(data), out=str(out), device="cpu",
                  backbone=tiny_sources["backbone"], text_encoder=tiny_sources["text_encoder"],
                  projection=tiny_sources["projection"], model="talk2dino-vitb14-reg",
                  short_side=(56,), window=(28,), stride=(14,))
    values.update(kw)
    return EvalConfig(**values)


def test_record_equals_a_direct_computation(tiny_sources, tiny_model, tmp_path: Path) -> None:
    data = make_voc(tmp_path / "data")
    out = run_eval(_config(data, tmp_path / "out", tiny_sources), progress=False)
    record = out["records"][0]
    assert record["benchmark"] == "voc21" and record["images"] == 3
    assert record["settings"]["inference"]["background"] is True
    assert record["settings"]["inference"]["bg_clean"] is True  # published VOC-21 protocol, §5.1
    assert record["settings"]["inference"]["pamr"] is False
    assert list(record["per_class_IoU"])[0] == "background" and len(record["per_class_IoU"]) == 21
    # Independent recomputation with the public API and the metric.
    spec = get_benchmark("voc21")
    config = _config(data, tmp_path, tiny_sources)
    seg = Segmenter(tiny_model, inference_config(tiny_model.config.inference, spec, config, option_grid(config)[0]))
    seg.set_classes(list(spec.vocabulary))
    matrix = ConfusionMatrix(21)
    for sample in list_samples(spec, data / "VOCdevkit/VOC2012"):
        image, label = load_sample(sample, spec)
        seg.set_image(image)
        matrix.update(seg.predict().labels, torch.from_numpy(label))
    assert record["mIoU_exact"] == pytest.approx(matrix.results()["mIoU"], abs=1e-3)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["records"][0]["mIoU"] == record["mIoU"]
    assert "| V21 |" in (tmp_path / "out" / "results.md").read_text()


def test_resume_reuses_cached_images(tiny_sources, tmp_path: Path, monkeypatch) -> None:
    data = make_voc(tmp_path / "data")
    config = _config(data, tmp_path / "out", tiny_sources)
    first = run_eval(config, progress=False)["records"][0]
    calls = {"n": 0}
    original = Segmenter.predict_features

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(Segmenter, "predict_features", counting)
    again = run_eval(config, progress=False)["records"][0]
    assert calls["n"] == 0 and again["mIoU_exact"] == first["mIoU_exact"]
    # A torn last cache line (a kill mid-write) is ignored and that image recomputed.
    cache = next((tmp_path / "out").glob("voc21-*/progress.rank0.jsonl"))
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    resumed = run_eval(config, progress=False)["records"][0]
    assert calls["n"] == 1 and resumed["mIoU_exact"] == first["mIoU_exact"]


def test_threshold_sweep_embeds_once_and_writes_table_and_plot(tiny_sources, tmp_path: Path, monkeypatch) -> None:
    data = make_voc(tmp_path / "data")
    embeds = {"n": 0}
    original = Segmenter.embed_images

    def counting(self, images):
        embeds["n"] += 1
        return original(self, images)

    monkeypatch.setattr(Segmenter, "embed_images", counting)
    config = _config(data, tmp_path / "out", tiny_sources, bg_threshold=(0.3, 0.55, 0.8), limit=2)
    records = run_eval(config, progress=False)["records"]
    assert [r["options"]["bg_threshold"] for r in records] == [0.3, 0.55, 0.8]
    assert embeds["n"] == 2  # one embedding per image serves every threshold
    # A threshold above every sigmoid score makes everything background.
    assert records[2]["per_class_IoU"]["person"] in (0.0, None)
    assert (tmp_path / "out" / "sweep-voc21.png").is_file()


def test_bad_label_fails_or_is_skipped_and_listed(tiny_sources, tmp_path: Path) -> None:
    data = make_voc(tmp_path / "data", bad_label=True)
    with pytest.raises(InvalidInputError, match="2007_000002.png"):
        run_eval(_config(data, tmp_path / "a", tiny_sources), progress=False)
    record = run_eval(_config(data, tmp_path / "b", tiny_sources, skip_bad=True), progress=False)["records"][0]
    assert record["images"] == 2 and record["skipped"][0]["name"] == "2007_000002"


def _rank_main(rank: int, world: int, port: int, data: str, out: str, sources: dict[str, str],
               result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from talk2dino.factory import create_model

    model = create_model(None, device="cpu", **sources)
    config = _config(Path(data), Path(out), sources)
    results = evaluate_benchmark(Segmenter(model), get_benchmark("voc21"), config, progress=False)
    if rank == 0:
        torch.save(results[0].matrix.state, Path(result_dir) / "state.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort a process that exits while they wind
    # down ("terminate called without an active exception"), which says nothing about our code.
    os._exit(0)


def test_two_gloo_ranks_give_the_single_process_matrix(tiny_sources, tiny_model, tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    data = make_voc(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(data), str(tmp_path / "sharded"), tiny_sources, str(tmp_path)),
             nprocs=2, join=True)
    sharded = torch.load(tmp_path / "state.pt", weights_only=True)
    single = evaluate_benchmark(Segmenter(tiny_model), get_benchmark("voc21"),
                                _config(data, tmp_path / "single", tiny_sources), progress=False)[0]
    assert torch.equal(sharded, single.matrix.state)


def _cache_lines(out: Path) -> dict[str, list[dict]]:
    """Every progress cache of a results folder: combination folder name -> its lines, sorted by image."""
    return {cache.parent.name: sorted((json.loads(line) for line in cache.read_text().splitlines()),
                                      key=lambda entry: entry["name"])
            for cache in sorted(out.glob("*/progress.rank0.jsonl"))}


def test_batched_eval_with_loader_workers_equals_one_image_at_a_time(tiny_sources, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Issue 16: batches of images, decoded by a worker, counted on the matrix's device: the same counts per
    image and the same matrices as the one-image loop, for a sweep over two geometries and two thresholds."""
    data = make_voc(tmp_path / "data", stems=(*STEMS, "2007_000004", "2007_000005"))
    embedded: list[int] = []
    original = Segmenter.embed_images

    def counting(self, images, **kwargs):
        embedded.append(len(images))
        return original(self, images, **kwargs)

    monkeypatch.setattr(Segmenter, "embed_images", counting)
    sweep = dict(short_side=(42, 56), bg_threshold=(0.4, 0.6))
    one = run_eval(_config(data, tmp_path / "one", tiny_sources, **sweep), progress=False)["records"]
    assert embedded == [1] * 10  # 5 images x 2 geometries, each geometry embedded once for both thresholds
    embedded.clear()
    batched = run_eval(_config(data, tmp_path / "batched", tiny_sources, **sweep), progress=False, batch_size=2,
                       workers=1)["records"]
    assert embedded == [2, 2, 2, 2, 1, 1]
    assert [r["options"] for r in batched] == [r["options"] for r in one] and len(one) == 4
    assert [r["mIoU_exact"] for r in batched] == [r["mIoU_exact"] for r in one]
    assert _cache_lines(tmp_path / "batched") == _cache_lines(tmp_path / "one")


def test_confusion_matrices_stay_on_the_model_device_until_the_end(tiny_sources, tiny_model, tmp_path: Path,
                                                                  monkeypatch) -> None:
    data = make_voc(tmp_path / "data")
    devices: list[torch.device] = []
    add = ConfusionMatrix.add

    def recording(self, counts):
        devices.append(self.device)
        return add(self, counts)

    monkeypatch.setattr(ConfusionMatrix, "add", recording)
    results = evaluate_benchmark(Segmenter(tiny_model), get_benchmark("voc21"),
                                 _config(data, tmp_path / "out", tiny_sources), progress=False, batch_size=2)
    assert devices == [tiny_model.device] * 2  # a batch of two, then one
    assert results[0].matrix.device.type == "cpu" and int(results[0].matrix.state.sum()) > 0
