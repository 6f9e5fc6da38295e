"""`talk2dino extract`: COCO Captions -> sharded training features (method.md §3.1–3.3).

What one run does, per process (rank):

1. Read ``annotations/captions_{split}2014.json`` as published (`talk2dino.extract.coco`), images sorted by
   id; rank r of a ``torchrun`` group takes images ``[r::world]``.
2. Load the frozen DINOv2 backbone and the CLIP text tower (ψ is not needed and not downloaded).
3. Decode images in DataLoader workers (`talk2dino.extract.preprocess`): Pillow, ``convert("RGB")``, **no**
   EXIF transpose, then `resize_center_crop` (§3.2). An image that cannot be read is recorded in the
   manifest's ``failed_images`` and skipped.
4. Per image: `head_targets` ``[M, D]``, `mean_head_target` ``[D]`` and the final-norm CLS ``[D]``; per caption of
   the written images: the raw (unnormalised) CLIP embedding ``[512]``. All stored float16.
5. Every ``shard_size`` input images form one shard (an image shard and its caption shard); shard s holds
   the readable images among input positions ``[s·shard_size, (s+1)·shard_size)``, so a shard is smaller
   only by its failed images (and at the end). `talk2dino.extract.shards.ShardWriter` writes each file to a
   hidden temp name, fsyncs and renames it; then the manifest, listing the shard with its sha256 and
   counts, is rewritten the same way.

Resuming: a rerun with the same settings keeps every shard the manifest lists (after checking its size and
sha256) and extracts only the others; shard files of this rank that the manifest does not list (left by a
kill between the rename and the manifest update) and temp files are deleted. A features folder written
with other settings (backbone, split, image size, shard size, limit, world size, dtype, annotation file)
is refused with `FeatureFormatError`.

Multi-process: with ``WORLD_SIZE > 1`` (``torchrun``) every rank writes ``images-RRR-*``/``captions-RRR-*``
and ``manifest.rank{r}.json``; after a ``torch.distributed`` barrier (gloo, initialised here when needed)
rank 0 merges them into ``manifest.json``. Without a process group (no ``MASTER_ADDR``) the last rank to
finish merges. The on-disk layout is documented in `talk2dino.data.features`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from talk2dino.config import DEFAULT_MODEL, BackboneConfig, ExtractConfig, TextConfig
from talk2dino.data.features import (
    FEATURE_FORMAT,
    MANIFEST_FILE,
    RANK_MANIFEST,
    STORED_DTYPE,
    FeatureFormatError,
    read_manifest,
)
from talk2dino.distributed import torchrun_env
from talk2dino.errors import InvalidInputError, internal_error_guard
from talk2dino.extract.coco import CocoCaptions, CocoImage, image_folder, read_coco_captions
from talk2dino.extract.head_targets import head_targets, mean_head_target
from talk2dino.extract.preprocess import CropDataset, collate_crops, normalize_crops
from talk2dino.extract.shards import (
    IDENTITY,
    IDENTITY_BEFORE_LOAD,
    ExtractionError,
    Shard,
    ShardWriter,
    check_compatible,
    finish_ranks,
    read_manifest_file,
    remove_leftovers,
    verified_shards,
)
from talk2dino.fileio import fault_point

__all__ = ["run_extract"]

logger = logging.getLogger(__name__)


def run_extract(config: ExtractConfig, *, progress: bool = True) -> Path:
    """Extract training features of a COCO Captions split into a features folder (resumable).

    Args:
        config: the extraction settings; see `ExtractConfig`.
        progress: show a progress bar (images/s) on stderr, on rank 0 only.

    Returns:
        The features folder (``config.out``). Under ``torchrun`` without a process group, ``manifest.json``
        exists once the last rank has finished.

    Raises:
        InvalidInputError: bad settings, a missing annotation file/image folder or a malformed JSON.
        FeatureFormatError: the output folder holds features extracted with other settings.
        ExtractionError: writing failed (e.g. disk full); the shards written so far are kept, rerun to resume.
        WeightsError: a model source cannot be resolved or loaded.
    """
    from talk2dino import __version__
    from talk2dino.factory import load_backbone, load_text_encoder, parse_dtype

    config.validate()
    env = torchrun_env()
    world, rank = env.world_size, env.rank
    folder = Path(config.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExtractionError(f"cannot create the output folder {folder} ({err.strerror or err})") from err
    model_name, backbone_config, text_config = _resolve_models(config)
    coco = read_coco_captions(config.coco_root, config.split, limit=config.limit)
    if not coco.images:
        raise InvalidInputError(f"{coco.annotation_file}: lists no images")

    manifest: dict[str, Any] = {
        "format": FEATURE_FORMAT,
        "talk2dino_version": __version__,
        "complete": False,
        "split": config.split,
        "image_size": config.image_size,
        "shard_size": config.shard_size,
        "limit": config.limit,
        "world_size": world,
        "dtype": str(STORED_DTYPE).removeprefix("torch."),
        "compute_dtype": str(parse_dtype(config.dtype)).removeprefix("torch."),
        "backbone": {"name": model_name, "source": backbone_config.source,
                     "logits_rope": backbone_config.logits_rope},
        "text": {"source": text_config.source, "context_length": text_config.context_length, "normalized": False},
        "preprocessing": {
            "decode": "PIL convert('RGB'), no EXIF transpose",
            "resize": "shorter side to image_size, PIL bicubic; longer side int(image_size * long / short)",
            "crop": "centre image_size x image_size; left/top int(round((side - image_size) / 2.0))",
            "mean": list(backbone_config.image_mean),
            "std": list(backbone_config.image_std),
        },
        "annotations": {
            "file": f"annotations/{coco.annotation_file.name}", "sha256": coco.sha256,
            "images": coco.total_images, "captions": coco.total_captions, "orphan_captions": coco.orphan_captions,
        },
    }
    if world > 1:
        manifest["rank"] = rank

    final_path = folder / MANIFEST_FILE
    manifest_path = final_path if world == 1 else folder / RANK_MANIFEST.format(rank=rank)
    merged = read_manifest(folder) if final_path.is_file() else None
    if merged is not None:
        check_compatible(merged, manifest, IDENTITY_BEFORE_LOAD, final_path)
    elif world == 1:
        ranks = sorted(folder.glob("manifest.rank*.json"))
        if ranks:
            other = read_manifest_file(ranks[0])
            raise FeatureFormatError(
                f"{folder}: holds an unfinished multi-process extraction (world size {other.get('world_size')}); "
                "resume it with torchrun and the same number of processes, or pick another output folder"
            )
    # What this rank wrote before: its own manifest, else (torchrun over a merged folder) the merged one.
    previous = read_manifest_file(manifest_path) if manifest_path.is_file() else merged
    if previous is not None and previous is not merged:
        check_compatible(previous, manifest, IDENTITY_BEFORE_LOAD, manifest_path)

    images = coco.images[rank::world]
    mine = {im.image_id for im in images}
    manifest["images_planned"] = len(images)
    manifest["skipped_empty_captions"] = [{"caption_id": c.caption_id, "image_id": c.image_id}
                                          for c in coco.empty_captions if c.image_id in mine]
    size = config.shard_size
    plan = {i: Shard(i, start, min(start + size, len(images))) for i, start in enumerate(range(0, len(images), size))}
    # Listed shards are checked (size, sha256) before anything else: a corrupt one is extracted again.
    kept_images, kept_captions = verified_shards(folder, previous, rank, plan)
    done = {s["index"] for s in kept_images}
    todo = [plan[i] for i in sorted(plan) if i not in done]
    if not todo and world == 1 and previous is not None and previous.get("complete"):
        logger.info("%s: extraction already complete (%d shards verified); nothing to do", folder, len(done))
        return folder
    manifest["image_shards"], manifest["caption_shards"] = kept_images, kept_captions
    remove_leftovers(folder, rank, {s["file"] for s in kept_images + kept_captions}, manifest_path.name)
    if done:
        logger.info("%s: resuming; %d of %d shard(s) already written", folder, len(done), len(plan))

    if todo or previous is None:  # (no previous: also a rank whose image list is empty records its models)
        device = _device(config, world, env.local_rank)
        dino, dino_meta = load_backbone(backbone_config.source, dtype=parse_dtype(config.dtype),
                                        cache_dir=config.cache_dir, logits_rope=backbone_config.logits_rope)
        text, text_meta = load_text_encoder(text_config.source, context_length=text_config.context_length,
                                            cache_dir=config.cache_dir)
        dino = dino.to(device).eval()
        text = text.to(device).eval()
        manifest["backbone"].update({
            "model_type": dino_meta["model_type"], "embed_dim": dino.embed_dim, "num_heads": dino.num_heads,
            "num_registers": dino.num_registers, "patch_size": dino.patch_size, "revision": dino_meta["revision"],
        })
        manifest["text"].update({"embed_dim": text.embed_dim, "revision": text_meta["revision"]})
        if config.image_size % dino.patch_size:
            raise InvalidInputError(
                f"image_size {config.image_size} is not a multiple of the backbone's patch size {dino.patch_size}"
            )
        for existing, path in ((previous, manifest_path), (merged, final_path)):
            if existing is not None:
                check_compatible(existing, manifest, IDENTITY, path)
        writer = ShardWriter(manifest, manifest_path, rank)
        extractor = _Extractor(config, coco, images, writer, dino, text, device, backbone_config.image_mean,
                               backbone_config.image_std)
        writer.save_manifest()
        _extract_shards(extractor, todo, device, progress=progress and rank == 0)
    else:
        # Every shard was written by an earlier run: the model facts are those it recorded.
        manifest["backbone"], manifest["text"] = previous["backbone"], previous["text"]
        writer = ShardWriter(manifest, manifest_path, rank)

    manifest["complete"] = True
    writer.save_manifest()
    counts = manifest["counts"]
    logger.info("%s: rank %d wrote %d images (%d failed), %d captions in %d shard(s)", folder, rank,
                counts["images"], counts["failed_images"], counts["captions"], counts["shards"])
    if world > 1:
        finish_ranks(folder, env)
    return folder


def _resolve_models(config: ExtractConfig) -> tuple[str | None, BackboneConfig, TextConfig]:
    """(registry name or None, backbone config, text config) for the configured backbone and text sources."""
    from talk2dino.registry import BACKBONES, TEXT_ENCODERS, get_model_config, list_models, resolve_part

    name: str | None

    text = get_model_config(DEFAULT_MODEL).text  # every registered model uses CLIP ViT-B/16 text, method.md §2.1
    if config.backbone in list_models():
        # A talk2dino model name: its backbone, including how its logits are taken (DINOv3, pitfall P20).
        model = get_model_config(config.backbone, cache_dir=config.cache_dir)
        name, backbone, text = model.name, model.backbone, model.text
    else:
        name = config.backbone if config.backbone in BACKBONES else None
        backbone = BackboneConfig(source=resolve_part(config.backbone, BACKBONES))
    if config.logits_rope is not None:
        backbone = dataclasses.replace(backbone, logits_rope=config.logits_rope)
    if config.text_encoder:
        text = dataclasses.replace(text, source=resolve_part(config.text_encoder, TEXT_ENCODERS))
    return name, backbone, text


def _device(config: ExtractConfig, world: int, local_rank: int) -> torch.device:
    from talk2dino.factory import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class _Extractor:
    """State of one rank's extraction: models, plan, manifest; embeds and writes shards as they complete."""

    def __init__(self, config: ExtractConfig, coco: CocoCaptions, images: list[CocoImage], writer: ShardWriter,
                 dino: Any, text: Any, device: torch.device, mean: Sequence[float], std: Sequence[float]) -> None:
        self.config = config
        self.coco = coco
        self.images = images
        self.writer = writer
        self.manifest = writer.manifest
        self.dino = dino
        self.text = text
        self.device = device
        self.mean = mean
        self.std = std

    def features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, S, S, 3]`` uint8 crops -> heads ``[B, M, D]``, mean_heads ``[B, D]``, cls ``[B, D]``, float16 CPU."""
        pixels = normalize_crops(crops.to(self.device, non_blocking=True), self.mean, self.std)
        out = self.dino(pixels)
        heads = head_targets(out.patch_tokens, out.attn_logits)
        mean_heads = mean_head_target(out.patch_tokens, out.attn_logits)
        cls = out.cls_token.float()
        return heads.to(STORED_DTYPE).cpu(), mean_heads.to(STORED_DTYPE).cpu(), cls.to(STORED_DTYPE).cpu()

    def write_shard(self, shard: Shard, rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                    failed: list[tuple[int, str]]) -> None:
        """Embed the shard's captions, then write both shard files and the manifest (`ShardWriter`)."""
        rows.sort(key=lambda r: r[0])
        written = [self.images[p] for p, *_ in rows]
        dim_m, dim_d = int(self.manifest["backbone"]["num_heads"]), int(self.manifest["backbone"]["embed_dim"])
        image_tensors = {
            "image_ids": torch.tensor([im.image_id for im in written], dtype=torch.int64),
            "heads": torch.stack([r[1] for r in rows]) if rows else torch.zeros(0, dim_m, dim_d, dtype=STORED_DTYPE),
            "mean_heads": torch.stack([r[2] for r in rows]) if rows else torch.zeros(0, dim_d, dtype=STORED_DTYPE),
            "cls": torch.stack([r[3] for r in rows]) if rows else torch.zeros(0, dim_d, dtype=STORED_DTYPE),
        }
        finite = torch.ones(len(rows), dtype=torch.bool)
        for key in ("heads", "mean_heads", "cls"):
            finite &= torch.isfinite(image_tensors[key]).flatten(1).all(dim=1)
        bad = [written[i].image_id for i in (~finite).nonzero().flatten().tolist()]
        if bad:
            raise ExtractionError(
                f"non-finite features for image id(s) {bad[:5]} (float16 overflow or a {self.config.dtype} "
                "backbone producing NaN); rerun with dtype float32"
            )
        captions = [c for im in written for c in self.coco.captions.get(im.image_id, [])]
        texts = [c.text for c in captions]
        context = int(self.manifest["text"]["context_length"])
        lengths = [len(ids) for ids in self.text.tokenizer(texts)["input_ids"]] if texts else []
        truncated = [{"caption_id": c.caption_id, "image_id": c.image_id, "tokens": n}
                     for c, n in zip(captions, lengths, strict=True) if n > context]
        embeddings = self.text.encode(texts, batch_size=self.config.text_batch_size).float()
        caption_tensors = {
            "caption_ids": torch.tensor([c.caption_id for c in captions], dtype=torch.int64),
            "image_ids": torch.tensor([c.image_id for c in captions], dtype=torch.int64),
            "text": embeddings.to(STORED_DTYPE).cpu().contiguous(),  # [K, 512]; encode gives [0, 512] for K = 0
        }
        failed_ids = {self.images[p].image_id for p, _ in failed}
        self.writer.write_shard(
            shard, image_tensors, caption_tensors,
            failed_images=[{"image_id": self.images[p].image_id, "file_name": self.images[p].file_name,
                            "error": error} for p, error in sorted(failed)],
            captions_of_failed_images=sum(len(self.coco.captions.get(i, [])) for i in failed_ids),
            truncated_captions=truncated,
        )


def _extract_shards(extractor: _Extractor, todo: list[Shard], device: torch.device, *, progress: bool) -> None:
    from tqdm import tqdm

    config = extractor.config
    if not todo:
        return
    batches = [list(range(a, min(a + config.batch_size, s.stop))) for s in todo
               for a in range(s.start, s.stop, config.batch_size)]
    dataset = CropDataset([str(im.path) for im in extractor.images], config.image_size,
                           root=str(image_folder(config.coco_root, config.split)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                                         collate_fn=collate_crops, pin_memory=device.type == "cuda")
    shard_of = {s.index: s for s in todo}
    pending: dict[int, tuple[list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], list[tuple[int, str]]]] = {}
    total = sum(s.stop - s.start for s in todo)
    failures = 0
    # Only an unreadable image is skipped (the dataset's InvalidInputError); a failure of the models (or of a
    # decoding worker) is no image's fault and stops the run as one InternalError line (issue 12).
    with internal_error_guard(memory_hint="try a smaller --batch-size (or --text-batch-size)"), \
            tqdm(total=total, unit="img", desc=f"extract {config.split}", disable=not progress, file=sys.stderr,
                 dynamic_ncols=True) as bar, torch.inference_mode():
        for positions, crops, failed in loader:
            first = min(positions + [p for p, _ in failed])
            shard = shard_of[first // config.shard_size]
            rows, bad = pending.setdefault(shard.index, ([], []))
            if crops is not None:
                heads, mean_heads, cls = extractor.features(crops)
                rows.extend(zip(positions, heads, mean_heads, cls, strict=True))
                fault_point("extract-batch")
            for position, error in failed:
                logger.warning("skipping image id %d: %s", extractor.images[position].image_id, error)
            bad.extend(failed)
            failures += len(failed)
            bar.update(len(positions) + len(failed))
            if failures:
                bar.set_postfix(failed=failures)
            if len(rows) + len(bad) == shard.stop - shard.start:
                extractor.write_shard(shard, rows, bad)
                del pending[shard.index]
