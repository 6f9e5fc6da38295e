"""`talk2dino extract`: COCO Captions -> sharded training features (method.md §3.1–3.3).

What one run does, per process (rank):

1. Read ``annotations/captions_{split}2014.json`` as published (`talk2dino.extract.coco`), images sorted by
   id; rank r of a ``torchrun`` group takes images ``[r::world]``.
2. Load the frozen DINOv2 backbone and the CLIP text tower (ψ is not needed and not downloaded).
3. Decode images in DataLoader workers: Pillow, ``convert("RGB")``, **no** EXIF transpose (as the reference
   does; COCO's annotations refer to the stored pixels), then `resize_center_crop` (§3.2). An image that
   cannot be read is recorded in the manifest's ``failed_images`` and skipped.
4. Per image: `head_targets` ``[M, D]``, `mean_head_target` ``[D]`` and the final-norm CLS ``[D]``; per caption of
   the written images: the raw (unnormalised) CLIP embedding ``[512]``. All stored float16.
5. Every ``shard_size`` input images form one shard (an image shard and its caption shard); shard s holds
   the readable images among input positions ``[s·shard_size, (s+1)·shard_size)``, so a shard is smaller
   only by its failed images (and at the end). Each file is written to a hidden temp name, fsynced and
   renamed; then the manifest, listing the shard with its sha256 and counts, is rewritten the same way.

Resuming: a rerun with the same settings keeps every shard the manifest lists (after checking its size and
sha256) and extracts only the others; shard files of this rank that the manifest does not list (left by a
kill between the rename and the manifest update) and temp files are deleted. A features folder written
with other settings (backbone, split, image size, shard size, limit, world size, dtype, annotation file)
is refused with `FeatureFormatError`.

Multi-process: with ``WORLD_SIZE > 1`` (``torchrun``) every rank writes ``images-RRR-*``/``captions-RRR-*``
and ``manifest.rank{r}.json``; after a ``torch.distributed`` barrier (gloo, initialised here when needed)
rank 0 merges them into ``manifest.json``. Without a process group (no ``MASTER_ADDR``) the last rank to
finish merges. The on-disk layout is documented in `talk2dino.extract.format`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from talk2dino.config import BackboneConfig, ExtractConfig, TextConfig
from talk2dino.data.images import DECODE_ERRORS
from talk2dino.errors import InvalidInputError, Talk2DinoError, error_reason, internal_error_guard
from talk2dino.extract.coco import CocoCaptions, CocoImage, image_folder, image_inside, read_coco_captions
from talk2dino.extract.format import FEATURE_FORMAT, MANIFEST_FILE, FeatureFormatError, read_manifest
from talk2dino.extract.targets import head_targets, mean_head_target
from talk2dino.fileio import atomic_write_bytes, fault_point, file_sha256, open_regular, temp_target

__all__ = [
    "ExtractionError",
    "center_crop_box",
    "merge_rank_manifests",
    "normalize_crops",
    "read_rgb",
    "resize_center_crop",
    "resized_size",
    "run_extract",
]

logger = logging.getLogger(__name__)

IMAGE_SHARD = "images-{rank:03d}-{index:05d}.safetensors"
CAPTION_SHARD = "captions-{rank:03d}-{index:05d}.safetensors"
RANK_MANIFEST = "manifest.rank{rank}.json"
STORED_DTYPE = torch.float16  # every stored feature, whatever the compute dtype
_DEFAULT_TEXT_MODEL = "talk2dino-vitb14-reg"  # every registered model uses CLIP ViT-B/16 text, method.md §2.1
_BARRIER_TIMEOUT = timedelta(hours=12)  # ranks may finish hours apart when one of them resumed more work
_SHARD_NAME = re.compile(r"^(images|captions)-(\d{3})-(\d{5})\.safetensors$")
# Settings a resumed run must share with the folder's manifest (dotted paths into the manifest).
_IDENTITY_BEFORE_LOAD = (
    "split", "image_size", "shard_size", "limit", "world_size", "compute_dtype", "dtype", "backbone.source",
    "text.source", "text.context_length", "annotations.sha256", "preprocessing",
)
_IDENTITY = (
    *_IDENTITY_BEFORE_LOAD, "backbone.model_type", "backbone.embed_dim", "backbone.num_heads",
    "backbone.num_registers", "backbone.patch_size", "backbone.revision", "text.revision", "text.embed_dim",
)


class ExtractionError(Talk2DinoError):
    """Writing the features failed (e.g. a full disk); what was written is kept and a rerun resumes."""


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (method.md §3.2)
# ----------------------------------------------------------------------------------------------------------


def read_rgb(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Image.Image:
    """Decode an image file to an RGB PIL image, as the reference's extraction does.

    ``Image.open(path).convert("RGB")``: greyscale is replicated, CMYK converted by Pillow, alpha dropped.
    The EXIF orientation is **not** applied: COCO's annotations (and the reference's features) refer to
    the stored pixels. With `root` (the COCO image folder), a path whose real location (symlinks resolved)
    leaves the real `root` is refused unopened (`talk2dino.extract.coco.image_inside`).

    Raises:
        InvalidInputError: ``"<path>: <reason>"`` for a missing, unreadable, truncated or non-image file, one
            that is not a regular file (a FIFO would block), or one that resolves outside `root`.
    """
    # The real path is opened: a link out of the image folder (a.jpg -> /etc/passwd) is refused first.
    real = path if root is None else image_inside(path, root)
    try:
        # open_regular: a FIFO or device named by a COCO file_name is refused instead of blocking forever.
        with open_regular(real, "image") as handle, Image.open(handle) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise InvalidInputError(f"{path}: no such file") from err
    except DECODE_ERRORS as err:
        raise InvalidInputError(f"{path}: cannot decode image ({error_reason(err)})") from err


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size after resizing the shorter side to `size`, as torchvision's ``Resize(size)`` computes it.

    The longer side is ``int(size * long / short)`` (float division, then truncation towards zero), so a
    640×480 image becomes 597×448 for size 448 (597.33 truncated).

    Returns:
        ``(new_width, new_height)``.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Centre crop box of torchvision's ``CenterCrop(size)`` for an image at least `size` on both sides.

    ``left = int(round((width - size) / 2.0))`` and ``top = int(round((height - size) / 2.0))``, Python's
    round (halves to even): an odd excess of 149 px gives round(74.5) = 74 on the left/top.

    Returns:
        PIL box ``(left, top, left + size, top + size)``.
    """
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (PIL bicubic) and centre-crop to ``size × size`` (method.md §3.2).

    Equal to torchvision's ``Resize(size, BICUBIC)`` followed by ``CenterCrop(size)`` on a PIL image, with
    the rounding of `resized_size` and `center_crop_box`.

    Args:
        image: a PIL image (converted to RGB when it is not).
        size: output side in pixels.

    Returns:
        ``[size, size, 3]`` uint8 array, RGB, values in [0, 255].
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    new_size = resized_size(rgb.width, rgb.height, size)
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
    return np.array(rgb.crop(center_crop_box(rgb.width, rgb.height, size)), dtype=np.uint8)


def normalize_crops(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 crops -> ImageNet-normalised pixels, in the operation order of ``ToTensor`` + ``Normalize``.

    Args:
        crops: ``[B, H, W, 3]`` uint8, RGB, values in [0, 255], on any device.
        mean, std: per-channel statistics of [0, 1] RGB (method.md §2.2).

    Returns:
        ``[B, 3, H, W]`` float32, RGB, ``(x / 255 - mean) / std``, on the device of `crops`.
    """
    pixels = crops.permute(0, 3, 1, 2).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t)


class _CropDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Input position -> (position, ``[S, S, 3]`` uint8 crop or None, error or None); never raises for bad files."""

    def __init__(self, paths: list[str], size: int, root: str | None = None) -> None:
        self.paths = paths
        self.size = size
        self.root = root  # the image folder every path must stay inside (symlinks resolved); None: unchecked

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            crop = resize_center_crop(read_rgb(self.paths[position], self.root), self.size)
        except InvalidInputError as err:
            return position, None, str(err)
        return position, torch.from_numpy(crop), None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[
        list[int], torch.Tensor | None, list[tuple[int, str]]]:
    positions = [p for p, crop, _ in items if crop is not None]
    crops = torch.stack([crop for _, crop, _ in items if crop is not None]) if positions else None
    failed = [(p, error or "unreadable") for p, crop, error in items if crop is None]
    return positions, crops, failed


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Durable atomic write: `path` is either absent, its old content, or the complete new content."""
    atomic_write_bytes(path, data, durable=True)


def _canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its ``__metadata__`` keys sorted, so equal shards are equal bytes.

    safetensors writes the metadata map in the order of a Rust ``HashMap``, which is seeded per process:
    two runs writing the same tensors and metadata gave different bytes (and sha256s in the manifest). Only
    the JSON header is rewritten (compact, space-padded to a multiple of 8 bytes as the writer does); the
    tensor bytes and their offsets are unchanged.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _lookup(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _check_compatible(existing: dict[str, Any], expected: dict[str, Any], keys: Sequence[str], where: Path) -> None:
    for key in keys:
        old, new = _lookup(existing, key), _lookup(expected, key)
        if old != new:
            raise FeatureFormatError(
                f"{where}: features there were extracted with {key}={old!r}, this run has {new!r}; pick another "
                "output folder, or rerun with that extraction's settings to resume it"
            )


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    index: int
    start: int  # first input position (in this rank's image list)
    stop: int


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    images = manifest["image_shards"]
    captions = manifest["caption_shards"]
    return {
        "images_planned": int(manifest.get("images_planned", 0)),
        "images": sum(int(s["images"]) for s in images),
        "failed_images": len(manifest["failed_images"]),
        "captions": sum(int(s["captions"]) for s in captions),
        "captions_of_failed_images": sum(int(s.get("captions_of_failed_images", 0)) for s in captions),
        "empty_captions": len(manifest["skipped_empty_captions"]),
        "truncated_captions": len(manifest["truncated_captions"]),
        "shards": len(images),
    }


def _refresh(manifest: dict[str, Any]) -> dict[str, Any]:
    """Recompute the aggregated lists and counts from the shard entries (the source of truth)."""
    manifest["image_shards"].sort(key=lambda s: (s["rank"], s["index"]))
    manifest["caption_shards"].sort(key=lambda s: (s["rank"], s["index"]))
    manifest["failed_images"] = [f for s in manifest["image_shards"] for f in s["failed_images"]]
    manifest["truncated_captions"] = [t for s in manifest["caption_shards"] for t in s["truncated_captions"]]
    manifest["counts"] = _counts(manifest)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return manifest


_LISTS_LAST = ("counts", "failed_images", "skipped_empty_captions", "truncated_captions", "image_shards",
               "caption_shards")


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _refresh(manifest)
    # Settings first, then the counts, then the long lists, so the file reads top-down.
    ordered = {k: v for k, v in manifest.items() if k not in _LISTS_LAST}
    ordered.update({k: manifest[k] for k in _LISTS_LAST})
    _write_atomic(path, _json_bytes(ordered))


def _read_json_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureFormatError(f"{path}: unreadable manifest ({err}); delete the folder or pick another") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FEATURE_FORMAT:
        raise FeatureFormatError(f"{path}: not a {FEATURE_FORMAT} manifest; pick another output folder")
    return manifest


def merge_rank_manifests(folder: str | os.PathLike[str], world_size: int) -> dict[str, Any] | None:
    """Merge ``manifest.rank{r}.json`` of every rank into ``manifest.json`` (``complete: true``).

    Args:
        folder: the features folder.
        world_size: number of ranks that wrote it.

    Returns:
        The merged manifest, or None when some rank has not finished yet (nothing is written then).

    Raises:
        FeatureFormatError: the rank manifests disagree on the extraction settings.
    """
    folder = Path(folder)
    parts = []
    for rank in range(world_size):
        path = folder / RANK_MANIFEST.format(rank=rank)
        if not path.is_file():
            return None
        part = _read_json_manifest(path)
        if not part.get("complete"):
            return None
        parts.append(part)
    first = parts[0]
    for rank, part in enumerate(parts[1:], 1):
        _check_compatible(first, part, _IDENTITY, folder / RANK_MANIFEST.format(rank=rank))
    merged = {k: v for k, v in first.items() if k != "rank"}
    merged["images_planned"] = sum(int(p["images_planned"]) for p in parts)
    merged["image_shards"] = [s for p in parts for s in p["image_shards"]]
    merged["caption_shards"] = [s for p in parts for s in p["caption_shards"]]
    merged["skipped_empty_captions"] = sorted((c for p in parts for c in p["skipped_empty_captions"]),
                                              key=lambda c: c["caption_id"])
    merged["complete"] = True
    _write_manifest(folder / MANIFEST_FILE, merged)
    logger.info("merged %d rank manifests into %s", world_size, folder / MANIFEST_FILE)
    return merged


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _validate(config: ExtractConfig) -> None:
    checks = [
        (config.image_size > 0, f"image_size must be positive, got {config.image_size}"),
        (config.shard_size > 0, f"shard_size must be positive, got {config.shard_size}"),
        (config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}"),
        (config.text_batch_size > 0, f"text_batch_size must be positive, got {config.text_batch_size}"),
        (config.num_workers >= 0, f"num_workers must be >= 0, got {config.num_workers}"),
        (config.limit is None or config.limit > 0, f"limit must be positive, got {config.limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)


def _dist_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the torchrun environment; (1, 0, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise InvalidInputError(f"bad torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise InvalidInputError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return world, rank, local_rank


def _resolve_models(config: ExtractConfig) -> tuple[str | None, BackboneConfig, TextConfig]:
    """(registry name or None, backbone config, text config) for the configured backbone and text sources."""
    from talk2dino.registry import BACKBONES, TEXT_ENCODERS, get_model_config, list_models, resolve_part

    name: str | None

    text = get_model_config(_DEFAULT_TEXT_MODEL).text
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
    from talk2dino.registry import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _verified_shards(folder: Path, previous: dict[str, Any] | None, rank: int,
                     plan: dict[int, _Shard]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shard entries of a previous run that are still intact (size and sha256) and fit the plan."""
    if previous is None:
        return [], []
    captions = {s["index"]: s for s in previous.get("caption_shards", []) if s.get("rank") == rank}
    kept_images, kept_captions = [], []
    for entry in previous.get("image_shards", []):
        if entry.get("rank") != rank:
            continue
        index = entry.get("index")
        shard = plan.get(index) if isinstance(index, int) else None
        caption = captions.get(index)
        problem = None
        if shard is None or entry.get("positions") != [shard.start, shard.stop]:
            problem = "does not fit the current shard plan"
        elif caption is None:
            problem = "has no caption shard entry"
        else:
            for item in (entry, caption):
                path = folder / item["file"]
                if not path.is_file():
                    problem = f"{path.name} is missing"
                elif path.stat().st_size != item.get("bytes") or file_sha256(path) != item.get("sha256"):
                    problem = f"{path.name} is truncated or corrupt (size or sha256 differs from the manifest)"
                if problem:
                    break
        if problem or caption is None:
            logger.warning("%s: shard %s %s; it will be extracted again", folder, index, problem)
            continue
        kept_images.append(entry)
        kept_captions.append(caption)
    return kept_images, kept_captions


def _remove_leftovers(folder: Path, rank: int, keep: set[str], manifest_name: str) -> None:
    """Delete this rank's shard files the manifest does not list, and this rank's temp files."""
    for path in folder.iterdir():
        name = path.name
        match = _SHARD_NAME.match(name)
        if match and int(match.group(2)) == rank and name not in keep:
            logger.info("%s: deleting %s, a shard file the manifest does not list (left by an interrupted run)",
                        folder, name)
            path.unlink(missing_ok=True)
            continue
        target = temp_target(name)
        if target is not None:
            inner = _SHARD_NAME.match(target)
            if (inner and int(inner.group(2)) == rank) or target == manifest_name:
                logger.info("%s: deleting temp file %s of an interrupted run", folder, name)
                path.unlink(missing_ok=True)


def _write_error(err: OSError, path: Path, manifest_path: Path, kept: int) -> ExtractionError:
    full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    reason = "the disk is full" if full else f"{err.strerror or err}"
    return ExtractionError(
        f"cannot write {path} ({reason}); the {kept} shard(s) already written are kept and listed in "
        f"{manifest_path}; {'free some space' if full else 'fix the problem'} and rerun the same command to resume"
    )


class _Extractor:
    """State of one rank's extraction: models, plan, manifest; writes shards as they complete."""

    def __init__(self, config: ExtractConfig, coco: CocoCaptions, images: list[CocoImage], manifest: dict[str, Any],
                 manifest_path: Path, rank: int, dino: Any, text: Any, device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.config = config
        self.coco = coco
        self.images = images
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.folder = manifest_path.parent
        self.rank = rank
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

    def write_shard(self, shard: _Shard, rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                    failed: list[tuple[int, str]]) -> None:
        """Embed the shard's captions, write both shard files and the manifest (in that order)."""
        from safetensors.torch import save

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
        meta = {"format": FEATURE_FORMAT, "rank": str(self.rank), "index": str(shard.index)}
        image_name = IMAGE_SHARD.format(rank=self.rank, index=shard.index)
        caption_name = CAPTION_SHARD.format(rank=self.rank, index=shard.index)
        image_bytes = _canonical_safetensors(save({k: v.contiguous() for k, v in image_tensors.items()},
                                                  metadata=meta))
        caption_bytes = _canonical_safetensors(save(caption_tensors, metadata=meta))
        kept = len(self.manifest["image_shards"])
        for name, data in ((image_name, image_bytes), (caption_name, caption_bytes)):
            try:
                _write_atomic(self.folder / name, data)
            except OSError as err:
                (self.folder / image_name).unlink(missing_ok=True)  # not listed: free its space now
                raise _write_error(err, self.folder / name, self.manifest_path, kept) from err
            fault_point("extract-mid-shard" if name == image_name else "extract-shard-files")
        self.manifest["image_shards"].append({
            "file": image_name, "sha256": hashlib.sha256(image_bytes).hexdigest(), "bytes": len(image_bytes),
            "rank": self.rank, "index": shard.index, "positions": [shard.start, shard.stop], "images": len(rows),
            "failed_images": [{"image_id": self.images[p].image_id, "file_name": self.images[p].file_name,
                               "error": error} for p, error in sorted(failed)],
        })
        self.manifest["caption_shards"].append({
            "file": caption_name, "sha256": hashlib.sha256(caption_bytes).hexdigest(),
            "bytes": len(caption_bytes), "rank": self.rank, "index": shard.index, "captions": len(captions),
            "captions_of_failed_images": sum(len(self.coco.captions.get(i, [])) for i in failed_ids),
            "truncated_captions": truncated,
        })
        self.save_manifest(written=(image_name, caption_name))
        logger.debug("wrote shard %d: %d images, %d captions", shard.index, len(rows), len(captions))

    def save_manifest(self, written: tuple[str, ...] = ()) -> None:
        try:
            _write_manifest(self.manifest_path, self.manifest)
        except OSError as err:
            for name in written:  # the manifest does not list them; a resume would delete them anyway
                (self.folder / name).unlink(missing_ok=True)
            self.manifest["image_shards"] = [s for s in self.manifest["image_shards"] if s["file"] not in written]
            self.manifest["caption_shards"] = [s for s in self.manifest["caption_shards"]
                                               if s["file"] not in written]
            raise _write_error(err, self.manifest_path, self.manifest_path,
                               len(self.manifest["image_shards"])) from err


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
    from talk2dino.registry import _load_backbone, _load_text, parse_dtype

    _validate(config)
    world, rank, local_rank = _dist_env()
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
        _check_compatible(merged, manifest, _IDENTITY_BEFORE_LOAD, final_path)
    elif world == 1:
        ranks = sorted(folder.glob("manifest.rank*.json"))
        if ranks:
            other = _read_json_manifest(ranks[0])
            raise FeatureFormatError(
                f"{folder}: holds an unfinished multi-process extraction (world size {other.get('world_size')}); "
                "resume it with torchrun and the same number of processes, or pick another output folder"
            )
    # What this rank wrote before: its own manifest, else (torchrun over a merged folder) the merged one.
    previous = _read_json_manifest(manifest_path) if manifest_path.is_file() else merged
    if previous is not None and previous is not merged:
        _check_compatible(previous, manifest, _IDENTITY_BEFORE_LOAD, manifest_path)

    images = coco.images[rank::world]
    mine = {im.image_id for im in images}
    manifest["images_planned"] = len(images)
    manifest["skipped_empty_captions"] = [{"caption_id": c.caption_id, "image_id": c.image_id}
                                          for c in coco.empty_captions if c.image_id in mine]
    size = config.shard_size
    plan = {i: _Shard(i, start, min(start + size, len(images))) for i, start in enumerate(range(0, len(images), size))}
    # Listed shards are checked (size, sha256) before anything else: a corrupt one is extracted again.
    kept_images, kept_captions = _verified_shards(folder, previous, rank, plan)
    done = {s["index"] for s in kept_images}
    todo = [plan[i] for i in sorted(plan) if i not in done]
    if not todo and world == 1 and previous is not None and previous.get("complete"):
        logger.info("%s: extraction already complete (%d shards verified); nothing to do", folder, len(done))
        return folder
    manifest["image_shards"], manifest["caption_shards"] = kept_images, kept_captions
    _remove_leftovers(folder, rank, {s["file"] for s in kept_images + kept_captions}, manifest_path.name)
    if done:
        logger.info("%s: resuming; %d of %d shard(s) already written", folder, len(done), len(plan))

    if todo or previous is None:  # (no previous: also a rank whose image list is empty records its models)
        device = _device(config, world, local_rank)
        dino, dino_meta = _load_backbone(backbone_config.source, dtype=parse_dtype(config.dtype),
                                         cache_dir=config.cache_dir, logits_rope=backbone_config.logits_rope)
        text, text_meta = _load_text(text_config.source, context_length=text_config.context_length,
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
                _check_compatible(existing, manifest, _IDENTITY, path)
        extractor = _Extractor(config, coco, images, manifest, manifest_path, rank, dino, text, device,
                               backbone_config.image_mean, backbone_config.image_std)
        extractor.save_manifest()
        _extract_shards(extractor, todo, device, progress=progress and rank == 0)
    else:
        # Every shard was written by an earlier run: the model facts are those it recorded.
        manifest["backbone"], manifest["text"] = previous["backbone"], previous["text"]
        extractor = _Extractor(config, coco, images, manifest, manifest_path, rank, None, None,
                               torch.device("cpu"), backbone_config.image_mean, backbone_config.image_std)

    manifest["complete"] = True
    extractor.save_manifest()
    counts = manifest["counts"]
    logger.info("%s: rank %d wrote %d images (%d failed), %d captions in %d shard(s)", folder, rank,
                counts["images"], counts["failed_images"], counts["captions"], counts["shards"])
    if world > 1:
        _finish_ranks(folder, world, rank)
    return folder


def _extract_shards(extractor: _Extractor, todo: list[_Shard], device: torch.device, *, progress: bool) -> None:
    from tqdm import tqdm

    config = extractor.config
    if not todo:
        return
    batches = [list(range(a, min(a + config.batch_size, s.stop))) for s in todo
               for a in range(s.start, s.stop, config.batch_size)]
    dataset = _CropDataset([str(im.path) for im in extractor.images], config.image_size,
                           root=str(image_folder(config.coco_root, config.split)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
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


def _finish_ranks(folder: Path, world: int, rank: int) -> None:
    """Wait for every rank (process group when there is one) and merge the rank manifests."""
    import torch.distributed as dist

    group = dist.is_available() and (dist.is_initialized() or {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ))
    if not group:
        if merge_rank_manifests(folder, world) is None:
            logger.info("%s: rank %d finished; the last rank to finish writes %s", folder, rank, MANIFEST_FILE)
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_BARRIER_TIMEOUT)
    try:
        dist.barrier()
        if rank == 0 and merge_rank_manifests(folder, world) is None:
            raise ExtractionError(f"{folder}: a rank manifest is missing or incomplete after all ranks finished")
        dist.barrier()  # the other ranks return only once manifest.json exists
    finally:
        if created:
            dist.destroy_process_group()
