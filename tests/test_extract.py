"""`talk2dino extract`: COCO reader, targets, preprocessing, shards, resume and bad input (method.md §3.1–3.3).

Runs the real extractor with the tiny models of conftest on a tiny COCO folder drawn with Pillow.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_dinov2
from PIL import Image, ImageDraw

from talk2dino.config import IMAGENET_MEAN, IMAGENET_STD, ExtractConfig
from talk2dino.data.features import FeatureFormatError, FeatureSet, iter_shards, load_features, read_manifest
from talk2dino.errors import InvalidInputError
from talk2dino.extract import shards as shards_module
from talk2dino.extract.coco import read_coco_captions
from talk2dino.extract.head_targets import head_targets, mean_head_target
from talk2dino.extract.preprocess import center_crop_box, normalize_crops, resize_center_crop
from talk2dino.extract.run import run_extract
from talk2dino.extract.shards import ExtractionError
from talk2dino.ops.sliding import resized_size

# (image id, (width, height), PIL mode); listed out of id order on purpose.
GOOD = [(42, (40, 60), "RGB"), (7, (90, 50), "RGB"), (13, (64, 64), "RGB"), (100, (50, 80), "RGB"),
        (3, (77, 41), "RGB"), (58, (45, 90), "RGB"), (21, (60, 45), "L")]
BROKEN_ID = 30  # a .jpg that is not an image
MISSING_ID = 64  # listed in the JSON, absent on disk
EMPTY_CAPTION_ID = 5002
LONG_CAPTION_ID = 5003
ORPHAN_CAPTION_ID = 9999
SIZE = 28  # 2x2 patches of the tiny patch-14 DINOv2
SHARD = 3
ALL_IDS = sorted([i for i, _, _ in GOOD] + [BROKEN_ID, MISSING_ID])  # 3 shards of 3 input images


def _file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _draw(size: tuple[int, int], seed: int, mode: str) -> Image.Image:
    rng = random.Random(seed)
    width, height = size

    def colour() -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, rng.randrange(x0, width + 1), rng.randrange(y0, height + 1))
        shape = rng.choice(["ellipse", "rectangle", "line"])
        if shape == "line":
            draw.line(box, fill=colour(), width=3)
        else:
            getattr(draw, shape)(box, fill=colour(), outline=colour())
    return image.convert(mode)


def make_coco(root: Path) -> Path:
    """A COCO-format folder: train2014/ images and annotations/captions_train2014.json as published."""
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    caption_id = 1
    for image_id, size, mode in GOOD:
        _draw(size, image_id, mode).save(root / "train2014" / _file_name(image_id), quality=95)
    (root / "train2014" / _file_name(BROKEN_ID)).write_bytes(b"this is not a JPEG file\n" * 10)
    for image_id in [i for i, _, _ in GOOD] + [BROKEN_ID, MISSING_ID]:
        images.append({"license": 1, "file_name": _file_name(image_id), "coco_url": "http://example/x.jpg",
                       "height": 10, "width": 10, "date_captured": "2013-11-14 11:18:45", "id": image_id})
        for k in range(2 + image_id % 2):
            annotations.append({"image_id": image_id, "id": caption_id,
                                "caption": f"A picture number {image_id} showing shape {k}. "})
            caption_id += 1
    annotations += [
        {"image_id": 7, "id": EMPTY_CAPTION_ID, "caption": "  \n"},
        {"image_id": 13, "id": LONG_CAPTION_ID, "caption": " ".join(["a very long caption about a red ball"] * 20)},
        {"image_id": 123456, "id": ORPHAN_CAPTION_ID, "caption": "an image nobody listed"},
    ]
    data = {"info": {"description": "tiny COCO"}, "images": images, "licenses": [{"id": 1, "name": "x"}],
            "annotations": annotations}
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(data), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


def make_config(coco_root: Path, out: Path, sources: dict[str, str], **overrides: object) -> ExtractConfig:
    settings: dict[str, object] = dict(
        coco_root=str(coco_root), split="train", out=str(out), backbone=sources["backbone"],
        text_encoder=sources["text_encoder"], image_size=SIZE, shard_size=SHARD, batch_size=2, text_batch_size=4,
        num_workers=0, device="cpu",
    )
    settings.update(overrides)
    return ExtractConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference_run(coco_root: Path, tiny_sources: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted extraction, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("features") / "ref"
    return run_extract(make_config(coco_root, out, tiny_sources), progress=False)


def assert_same_features(a: FeatureSet, b: FeatureSet) -> None:
    for key in ("image_ids", "heads", "mean_heads", "cls", "caption_ids", "caption_image", "text"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


# ----------------------------------------------------------------------------------------------------------
# Targets (method.md §3.3, §3.6)
# ----------------------------------------------------------------------------------------------------------


def test_targets_on_hand_computed_example() -> None:
    f = [[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]]  # P = 3 patches, D = 2
    a = [[0.0, 1.0, 2.0], [1.5, -0.5, 0.25]]  # M = 2 heads
    P, M, D = 3, 2, 2

    def weighted(logits: list[float]) -> list[float]:
        exps = [math.exp(x) for x in logits]
        total = sum(exps)
        return [sum(exps[p] / total * f[p][d] for p in range(P)) / P for d in range(D)]

    expected_heads = [weighted(a[m]) for m in range(M)]
    expected_mean = weighted([sum(a[m][p] for m in range(M)) / M for p in range(P)])
    tokens, logits = torch.tensor([f]), torch.tensor([a])
    torch.testing.assert_close(head_targets(tokens, logits), torch.tensor([expected_heads]), atol=1e-6, rtol=0)
    torch.testing.assert_close(mean_head_target(tokens, logits), torch.tensor([expected_mean]), atol=1e-6, rtol=0)
    # mean_heads is one softmax over the head-mean logits, not the mean of the head targets.
    assert not torch.allclose(mean_head_target(tokens, logits), head_targets(tokens, logits).mean(dim=1))


def test_targets_are_batched_float32_and_check_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 8, generator=g).to(torch.bfloat16)
    logits = torch.randn(3, 4, 5, generator=g)
    heads, mean = head_targets(tokens, logits), mean_head_target(tokens, logits)
    assert heads.shape == (3, 4, 8) and mean.shape == (3, 8)
    assert heads.dtype == mean.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(heads[i:i + 1], head_targets(tokens[i:i + 1], logits[i:i + 1]))
        torch.testing.assert_close(mean[i:i + 1], mean_head_target(tokens[i:i + 1], logits[i:i + 1]))
    with pytest.raises(ValueError, match="disagree"):
        head_targets(tokens, logits[:, :, :4])


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (method.md §3.2)
# ----------------------------------------------------------------------------------------------------------


def test_resize_and_crop_rounding() -> None:
    # (height, width) -> (height, width); 597.33 truncated, as torchvision's Resize
    assert resized_size(480, 640, short_side=448, rounding="truncate") == (448, 597)
    assert resized_size(640, 480, short_side=448, rounding="truncate") == (597, 448)
    assert resized_size(448, 448, short_side=448, rounding="truncate") == (448, 448)
    with pytest.raises(ValueError, match="max_long_side"):
        resized_size(480, 640, short_side=448, max_long_side=2048, rounding="truncate")
    assert center_crop_box(597, 448, 448) == (74, 0, 522, 448)  # round(74.5) = 74 (halves to even)
    assert center_crop_box(448, 451, 448) == (0, 2, 448, 450)  # round(1.5) = 2


def test_resize_center_crop_equals_pil_bicubic_then_documented_crop() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 2, 3), dtype=np.uint8)  # H=4, W=2
    image = Image.fromarray(pixels)
    crop = resize_center_crop(image, 3)
    # Shorter side 2 -> 3, longer 4 -> int(3 * 4 / 2) = 6; top = round((6 - 3) / 2) = round(1.5) = 2.
    expected = np.array(image.resize((3, 6), Image.Resampling.BICUBIC).crop((0, 2, 3, 5)))
    assert crop.shape == (3, 3, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, expected)
    grey = Image.fromarray(pixels[:, :, 0])  # greyscale is replicated to RGB
    np.testing.assert_array_equal(resize_center_crop(grey, 3), resize_center_crop(grey.convert("RGB"), 3))


def test_normalisation_keeps_rgb_order() -> None:
    red = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    pixels = normalize_crops(torch.from_numpy(red), IMAGENET_MEAN, IMAGENET_STD)
    assert pixels.shape == (1, 3, 4, 4)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor(
        [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
         -IMAGENET_MEAN[2] / IMAGENET_STD[2]]))


# ----------------------------------------------------------------------------------------------------------
# COCO reader
# ----------------------------------------------------------------------------------------------------------


def test_coco_reader_sorts_limits_and_reports(coco_root: Path) -> None:
    coco = read_coco_captions(coco_root, "train")
    assert [im.image_id for im in coco.images] == ALL_IDS
    assert coco.total_images == 9 and coco.orphan_captions == 1
    assert [c.caption_id for c in coco.empty_captions] == [EMPTY_CAPTION_ID]
    assert all(c.text.strip() for caps in coco.captions.values() for c in caps)
    assert coco.images[0].path == coco_root / "train2014" / _file_name(3)
    limited = read_coco_captions(coco_root, "train", limit=2)
    assert [im.image_id for im in limited.images] == [3, 7]
    assert set(limited.captions) == {3, 7} and [c.caption_id for c in limited.empty_captions] == [EMPTY_CAPTION_ID]


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.pop("annotations"), "lacks the field 'annotations'"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] lacks the field 'file_name'"),
    (lambda d: d["annotations"][0].pop("caption"), r"annotations\[0\] lacks the field 'caption'"),
    (lambda d: d["annotations"][2].update(caption=None), r"annotations\[2\]\.caption is None"),
    (lambda d: d["images"][0].update(id="7"), r"images\[0\]\.id is '7'"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
])
def test_coco_reader_names_file_and_field(coco_root: Path, tmp_path: Path, edit, match: str) -> None:
    data = json.loads((coco_root / "annotations" / "captions_train2014.json").read_text())
    edit(data)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations" / "captions_train2014.json").write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match=match) as info:
        read_coco_captions(tmp_path, "train")
    assert "captions_train2014.json" in str(info.value)


def test_coco_reader_missing_files(coco_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="captions_val2014.json: no such file"):
        read_coco_captions(coco_root, "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2014.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="train2014: no such image folder"):
        read_coco_captions(tmp_path, "train")
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations" / "captions_train2014.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a readable JSON"):
        read_coco_captions(tmp_path, "train")


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def test_extract_writes_documented_shards_and_manifest(reference_run: Path, coco_root: Path,
                                                       tiny_sources: dict[str, str]) -> None:
    manifest = read_manifest(reference_run)
    assert manifest["complete"] is True and manifest["split"] == "train" and manifest["image_size"] == SIZE
    assert manifest["dtype"] == "float16" and manifest["compute_dtype"] == "float32"
    assert manifest["backbone"] | {"revision": None} == manifest["backbone"]  # local-dir: no hub revision
    assert {k: manifest["backbone"][k] for k in ("source", "model_type", "embed_dim", "num_heads", "num_registers",
                                                 "patch_size")} == {
        "source": tiny_sources["backbone"], "model_type": "dinov2_with_registers", "embed_dim": 32, "num_heads": 4,
        "num_registers": 4, "patch_size": 14}
    assert manifest["text"]["source"] == tiny_sources["text_encoder"] and manifest["text"]["embed_dim"] == 512
    good_captions = sum(2 + i % 2 for i, _, _ in GOOD) + 1  # + the long caption of image 13
    assert manifest["counts"] == {
        "images_planned": 9, "images": 7, "failed_images": 2, "captions": good_captions,
        "captions_of_failed_images": 2 + BROKEN_ID % 2 + 2 + MISSING_ID % 2, "empty_captions": 1,
        "truncated_captions": 1, "shards": 3,
    }
    failed = {f["image_id"]: f for f in manifest["failed_images"]}
    assert set(failed) == {BROKEN_ID, MISSING_ID}
    assert failed[BROKEN_ID]["file_name"] == _file_name(BROKEN_ID)
    assert "cannot identify image file" in failed[BROKEN_ID]["error"]
    assert "no such file" in failed[MISSING_ID]["error"]
    assert manifest["skipped_empty_captions"] == [{"caption_id": EMPTY_CAPTION_ID, "image_id": 7}]
    assert [t["caption_id"] for t in manifest["truncated_captions"]] == [LONG_CAPTION_ID]
    assert manifest["truncated_captions"][0]["tokens"] > 77
    assert [s["file"] for s in manifest["image_shards"]] == [f"images-000-0000{i}.safetensors" for i in range(3)]
    assert [s["positions"] for s in manifest["image_shards"]] == [[0, 3], [3, 6], [6, 9]]
    assert [s["images"] for s in manifest["image_shards"]] == [3, 2, 2]
    assert sorted(p.name for p in reference_run.iterdir()) == sorted(
        ["manifest.json"] + [f"{kind}-000-0000{i}.safetensors" for kind in ("images", "captions") for i in range(3)])

    features = load_features(reference_run, expect_embed_dim=32, expect_num_heads=4)
    assert features.image_ids.tolist() == [i for i in ALL_IDS if i not in (BROKEN_ID, MISSING_ID)]
    assert features.heads.shape == (7, 4, 32) and features.heads.dtype == torch.float16
    assert features.mean_heads.shape == features.cls.shape == (7, 32)
    assert features.mean_heads.dtype == features.cls.dtype == features.text.dtype == torch.float16
    assert features.text.shape == (good_captions, 512)
    coco = read_coco_captions(coco_root, "train")
    expected_captions = [c for i in features.image_ids.tolist() for c in coco.captions[i]]
    assert features.caption_ids.tolist() == [c.caption_id for c in expected_captions]
    assert features.image_ids[features.caption_image].tolist() == [c.image_id for c in expected_captions]
    streamed = list(iter_shards(reference_run))
    assert len(streamed) == 3 and torch.equal(torch.cat([s[0]["heads"] for s in streamed]), features.heads)


def test_stored_features_equal_a_direct_recomputation(reference_run: Path, coco_root: Path,
                                                      tiny_sources: dict[str, str]) -> None:
    from talk2dino.factory import load_backbone, load_text_encoder

    features = load_features(reference_run)
    dino, _ = load_backbone(tiny_sources["backbone"], dtype=torch.float32, cache_dir=None)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for row, image_id in enumerate(features.image_ids.tolist()):
        with Image.open(coco_root / "train2014" / _file_name(image_id)) as image:
            crop = resize_center_crop(image.convert("RGB"), SIZE)
        pixels = ((torch.from_numpy(crop).permute(2, 0, 1).float() / 255 - mean) / std)[None]
        out = dino.forward_reference(pixels)
        f, a = out.patch_tokens[0].float(), out.attn_logits[0]
        P = f.shape[0]
        heads = torch.einsum("mp,pd->md", torch.softmax(a, dim=-1), f) / P
        mean_heads = torch.softmax(a.mean(dim=0), dim=-1) @ f / P
        torch.testing.assert_close(features.heads[row].float(), heads, atol=1e-3, rtol=0)
        torch.testing.assert_close(features.mean_heads[row].float(), mean_heads, atol=1e-3, rtol=0)
        torch.testing.assert_close(features.cls[row].float(), out.cls_token[0].float(), atol=1e-2, rtol=1e-3)
    text, _ = load_text_encoder(tiny_sources["text_encoder"], context_length=77, cache_dir=None)
    coco = read_coco_captions(coco_root, "train")
    by_id = {c.caption_id: c.text for caps in coco.captions.values() for c in caps}
    expected = text.encode([by_id[i] for i in features.caption_ids.tolist()], batch_size=64)
    torch.testing.assert_close(features.text.float(), expected, atol=2e-3, rtol=2e-3)


def test_resume_after_a_kill_equals_an_uninterrupted_run(reference_run: Path, coco_root: Path,
                                                         tiny_sources: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "features"
    config = make_config(coco_root, out, tiny_sources)
    real_write = shards_module._write_atomic

    def killed_after_shard_1_images(path: Path, data: bytes) -> None:
        if path.name == "captions-000-00001.safetensors":
            raise KeyboardInterrupt  # the process dies between the two files of shard 1
        real_write(path, data)

    monkeypatch.setattr(shards_module, "_write_atomic", killed_after_shard_1_images)
    with pytest.raises(KeyboardInterrupt):
        run_extract(config, progress=False)
    monkeypatch.undo()
    manifest = read_manifest(out)
    assert manifest["complete"] is False and [s["index"] for s in manifest["image_shards"]] == [0]
    assert (out / "images-000-00001.safetensors").is_file()  # written, but not listed: a leftover
    with pytest.raises(FeatureFormatError, match="did not finish"):
        load_features(out)
    (out / "images-000-00007.safetensors").write_bytes(b"stale")  # a leftover the plan never rewrites
    (out / ".captions-000-00002.safetensors.0123456789ab.tmp").write_bytes(b"half")
    shard0 = (out / "images-000-00000.safetensors").stat().st_mtime_ns

    caplog.set_level("INFO", logger="talk2dino.extract")
    run_extract(config, progress=False)
    assert "resuming; 1 of 3 shard(s) already written" in caplog.text
    assert "deleting images-000-00001.safetensors" in caplog.text
    assert not (out / "images-000-00007.safetensors").exists()
    assert not list(out.glob(".*.tmp*"))
    assert (out / "images-000-00000.safetensors").stat().st_mtime_ns == shard0  # kept, not redone
    assert_same_features(load_features(out), load_features(reference_run))
    assert read_manifest(out)["counts"] == read_manifest(reference_run)["counts"]

    caplog.clear()
    run_extract(config, progress=False)  # a complete folder: verified, nothing redone
    assert "already complete" in caplog.text


def test_disk_full_keeps_written_shards_and_resumes(reference_run: Path, coco_root: Path,
                                                    tiny_sources: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "features"
    config = make_config(coco_root, out, tiny_sources)
    real_fsync = os.fsync

    def full_at_shard_2(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "images-000-00002" in name and ".tmp" in name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file being written")
    monkeypatch.setattr(os, "fsync", full_at_shard_2)
    with pytest.raises(ExtractionError, match="disk is full") as info:
        run_extract(config, progress=False)
    monkeypatch.undo()
    message = str(info.value)
    assert "images-000-00002.safetensors" in message and "2 shard(s) already written are kept" in message
    assert "rerun" in message
    assert not list(out.glob(".*.tmp*")) and not (out / "images-000-00002.safetensors").exists()
    assert [s["index"] for s in read_manifest(out)["image_shards"]] == [0, 1]
    run_extract(config, progress=False)
    assert_same_features(load_features(out), load_features(reference_run))


def test_decoding_workers_give_the_same_features(reference_run: Path, coco_root: Path,
                                                 tiny_sources: dict[str, str], tmp_path: Path) -> None:
    out = run_extract(make_config(coco_root, tmp_path / "features", tiny_sources, num_workers=2), progress=False)
    assert_same_features(load_features(out), load_features(reference_run))


def test_corrupt_shard_is_named_and_a_rerun_repairs_it(reference_run: Path, coco_root: Path,
                                                       tiny_sources: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    shard = out / "images-000-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for verify in (True, False):
        with pytest.raises(FeatureFormatError, match="images-000-00001.safetensors: corrupt or truncated"):
            load_features(out, verify=verify)
    run_extract(make_config(coco_root, out, tiny_sources), progress=False)
    assert_same_features(load_features(out), load_features(reference_run))


def test_features_of_another_backbone_are_refused(reference_run: Path, coco_root: Path,
                                                  tiny_sources: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(FeatureFormatError, match="embed_dim=32.*expected 768"):
        load_features(reference_run, expect_embed_dim=768)

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = save_tiny_dinov2(tmp_path / "dino48", hidden=48)
    with pytest.raises(FeatureFormatError, match="backbone.source=.*pick another output folder"):
        run_extract(make_config(coco_root, out, tiny_sources, backbone=f"local-dir:{other}"), progress=False)
    with pytest.raises(FeatureFormatError, match="image_size=28, this run has 42"):
        run_extract(make_config(coco_root, out, tiny_sources, image_size=42), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # An unfinished folder whose manifest records another width: detected once the backbone is loaded.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["backbone"]["embed_dim"] = 64
    manifest["complete"] = False
    manifest["image_shards"].pop()
    manifest["caption_shards"].pop()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureFormatError, match="backbone.embed_dim=64, this run has 32"):
        run_extract(make_config(coco_root, out, tiny_sources), progress=False)


def test_bad_settings_are_refused(coco_root: Path, tiny_sources: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"shard_size \(--shard-size\) must be in \[1, "):
        run_extract(make_config(coco_root, tmp_path / "a", tiny_sources, shard_size=0), progress=False)
    with pytest.raises(InvalidInputError, match="not a multiple of the backbone's patch size 14"):
        run_extract(make_config(coco_root, tmp_path / "b", tiny_sources, image_size=30), progress=False)


def test_ranks_write_their_own_shards_and_the_last_merges(reference_run: Path, coco_root: Path,
                                                          tiny_sources: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "features"
    config = make_config(coco_root, out, tiny_sources)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no process group: the manifests alone coordinate
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        run_extract(config, progress=False)
        assert (out / f"manifest.rank{rank}.json").is_file()
        assert (out / "manifest.json").is_file() == (rank == 1)
    merged = read_manifest(out)
    assert merged["complete"] and merged["world_size"] == 2 and "rank" not in merged
    assert {(s["rank"], s["index"]) for s in merged["image_shards"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    reference = read_manifest(reference_run)
    assert merged["counts"] == reference["counts"] | {"shards": 4}
    got, want = load_features(out), load_features(reference_run)
    order = torch.argsort(got.image_ids)
    assert torch.equal(got.image_ids[order], want.image_ids)
    torch.testing.assert_close(got.heads[order].float(), want.heads.float(), atol=1e-3, rtol=0)
    assert sorted(got.caption_ids.tolist()) == sorted(want.caption_ids.tolist())

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FeatureFormatError, match="world_size=2, this run has 1"):
        run_extract(config, progress=False)
