"""On-disk format of extracted training features (``talk2dino-features/1``).

A features folder holds::

    manifest.json                    format, backbone/text sources and sizes, shard list, failed images
    images-RRR-SSSSS.safetensors     per image: image_ids int64 [n], heads float16 [n, M, D],
                                     mean_heads float16 [n, D], cls float16 [n, D]
    captions-RRR-SSSSS.safetensors   per caption: caption_ids int64 [k], image_ids int64 [k],
                                     text float16 [k, 512]

(RRR = rank, SSSSS = shard index.) ``heads[i, m]`` is the per-head target v_{i,m} of method.md §3.3,
``mean_heads`` the head-averaged embedding of §3.6 (one softmax over the head-mean logits), ``cls``
the final-norm CLS token, ``text`` the raw CLIP embedding of §2.1. Shards are written to a temp name
and renamed, so a shard file that exists is complete; the manifest lists each with its sha256.
A 2-core machine can stream shards one by one (`iter_shards`); a GPU machine loads them whole
(`load_features`).

Shard s of rank r holds the readable images among that rank's input positions
``[s·shard_size, (s+1)·shard_size)`` (images sorted by COCO id, rank r taking ``[r::world_size]``), and
its caption shard the non-empty captions of exactly those images. With torchrun, every rank also writes
``manifest.rank{r}.json`` and rank 0 merges them into ``manifest.json``.

manifest.json (keys)::

    format "talk2dino-features/1", talk2dino_version, complete (bool), updated
    split, image_size, shard_size, limit, world_size, dtype ("float16", as stored), compute_dtype
    backbone     {name, source, model_type, embed_dim, num_heads, num_registers, patch_size, revision}
    text         {source, revision, context_length, embed_dim, normalized: false}
    preprocessing {decode, resize, crop, mean, std}
    annotations  {file, sha256, images, captions, orphan_captions}   (the JSON as read)
    images_planned
    counts       {images_planned, images, failed_images, captions, captions_of_failed_images,
                  empty_captions, truncated_captions, shards}
    failed_images          [{image_id, file_name, error}]      unreadable images, skipped
    skipped_empty_captions [{caption_id, image_id}]
    truncated_captions     [{caption_id, image_id, tokens}]    longer than the CLIP context, truncated
    image_shards   [{file, sha256, bytes, rank, index, positions: [start, stop], images, failed_images}]
    caption_shards [{file, sha256, bytes, rank, index, captions, captions_of_failed_images,
                     truncated_captions}]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from talk2dino.errors import Talk2DinoError

FEATURE_FORMAT = "talk2dino-features/1"
MANIFEST_FILE = "manifest.json"
IMAGE_KEYS = ("image_ids", "heads", "mean_heads", "cls")
CAPTION_KEYS = ("caption_ids", "image_ids", "text")


class FeatureFormatError(Talk2DinoError):
    """A features folder is missing, incomplete, corrupt or from another backbone."""


@dataclass
class FeatureSet:
    """Features of one split, in memory.

    Attributes:
        image_ids: ``[I]`` int64 COCO image ids.
        heads: ``[I, M, D]`` per-head attention-weighted patch embeddings v_{i,m} (method.md §3.3).
        mean_heads: ``[I, D]`` head-averaged embedding (method.md §3.6 ``mean_heads``).
        cls: ``[I, D]`` final-norm CLS tokens.
        caption_ids: ``[K]`` int64 COCO caption ids.
        caption_image: ``[K]`` int64 row of each caption's image in the image arrays.
        text: ``[K, 512]`` raw CLIP text embeddings (unnormalised).
        manifest: the folder's manifest (backbone and text sources, sizes).
    """

    image_ids: torch.Tensor
    heads: torch.Tensor
    mean_heads: torch.Tensor
    cls: torch.Tensor
    caption_ids: torch.Tensor
    caption_image: torch.Tensor
    text: torch.Tensor
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        """M."""
        return int(self.heads.shape[1])

    @property
    def embed_dim(self) -> int:
        """D."""
        return int(self.heads.shape[2])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FeatureSet:
        """Move (and optionally cast the float tensors)."""
        def f(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        return FeatureSet(self.image_ids.to(device), f(self.heads), f(self.mean_heads), f(self.cls),
                          self.caption_ids.to(device), self.caption_image.to(device), f(self.text), self.manifest)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a features manifest.

    Raises:
        FeatureFormatError: naming the folder when the manifest is missing, unreadable or of another format.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FeatureFormatError(f"{folder}: no {MANIFEST_FILE}; is this a folder written by `talk2dino extract`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureFormatError(f"{path}: unreadable manifest ({err})") from err
    if manifest.get("format") != FEATURE_FORMAT:
        raise FeatureFormatError(f"{path}: format {manifest.get('format')!r}, expected {FEATURE_FORMAT!r}")
    return dict(manifest)


def read_shard(path: str | os.PathLike[str], keys: tuple[str, ...], *,
               sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load one shard, checking that it is complete and has `keys` with consistent lengths.

    Args:
        path: a shard file.
        keys: tensors it must hold (`IMAGE_KEYS` or `CAPTION_KEYS`).
        sha256: when given, the file's bytes must have this hash (as the manifest records).

    Raises:
        FeatureFormatError: naming the file when it is missing, truncated, corrupt or lacks keys.
    """
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FeatureFormatError(f"{path}: cannot read shard ({err.strerror or err}); resume extraction") from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FeatureFormatError(
            f"{path}: corrupt or truncated shard (sha256 differs from the manifest); rerun `talk2dino extract` "
            "on the folder to extract it again"
        )
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises several types for truncated or corrupt files
        raise FeatureFormatError(
            f"{path}: corrupt or truncated shard ({err}); rerun `talk2dino extract` on the folder to extract it again"
        ) from err
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise FeatureFormatError(f"{path}: shard lacks {missing}")
    lengths = {k: int(tensors[k].shape[0]) for k in keys}
    if len(set(lengths.values())) != 1:
        raise FeatureFormatError(f"{path}: inconsistent shard lengths {lengths}")
    return tensors


def _complete_manifest(folder: Path, expect_embed_dim: int | None, expect_num_heads: int | None) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if not manifest.get("complete", False):
        raise FeatureFormatError(f"{folder}: extraction did not finish; rerun `talk2dino extract` to resume it")
    backbone = manifest.get("backbone", {})
    for name, expected in (("embed_dim", expect_embed_dim), ("num_heads", expect_num_heads)):
        if expected is not None and backbone.get(name) != expected:
            raise FeatureFormatError(
                f"{folder}: features have {name}={backbone.get(name)} (backbone {backbone.get('source')}), "
                f"expected {expected}"
            )
    return manifest


ShardPair = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def iter_shards(folder: str | os.PathLike[str], *, verify: bool = True, expect_embed_dim: int | None = None,
                expect_num_heads: int | None = None) -> Iterator[ShardPair]:
    """Stream a features folder one shard pair at a time (low memory: one shard in RAM).

    Args:
        folder: a folder written by `talk2dino extract`.
        verify: check each file against the sha256 the manifest records.
        expect_embed_dim, expect_num_heads: raise if the features come from another backbone.

    Yields:
        ``(image tensors, caption tensors)`` of each shard, keys `IMAGE_KEYS` and `CAPTION_KEYS`, in
        manifest order; the captions of a shard belong to the images of the same shard.

    Raises:
        FeatureFormatError: as `load_features`.
    """
    folder = Path(folder)
    manifest = _complete_manifest(folder, expect_embed_dim, expect_num_heads)
    captions = {(s.get("rank"), s.get("index")): s for s in manifest.get("caption_shards", [])}
    for entry in manifest.get("image_shards", []):
        caption = captions.get((entry.get("rank"), entry.get("index")))
        if caption is None:
            raise FeatureFormatError(f"{folder}: image shard {entry['file']} has no caption shard in the manifest")
        yield (read_shard(folder / entry["file"], IMAGE_KEYS, sha256=entry.get("sha256") if verify else None),
               read_shard(folder / caption["file"], CAPTION_KEYS, sha256=caption.get("sha256") if verify else None))


def load_features(folder: str | os.PathLike[str], *, expect_embed_dim: int | None = None,
                  expect_num_heads: int | None = None, verify: bool = True) -> FeatureSet:
    """Load every shard of a features folder into one `FeatureSet` (float16 as stored, on CPU).

    Args:
        folder: a folder written by `talk2dino extract`.
        expect_embed_dim, expect_num_heads: raise if the features come from another backbone.
        verify: check each shard file against the sha256 the manifest records.

    Raises:
        FeatureFormatError: incomplete extraction, corrupt shard, a caption whose image is missing,
            or a backbone mismatch.
    """
    folder = Path(folder)
    manifest = _complete_manifest(folder, expect_embed_dim, expect_num_heads)

    def sha(entry: dict[str, Any]) -> str | None:
        return entry.get("sha256") if verify else None

    images = [read_shard(folder / s["file"], IMAGE_KEYS, sha256=sha(s)) for s in manifest.get("image_shards", [])]
    captions = [read_shard(folder / s["file"], CAPTION_KEYS, sha256=sha(s))
                for s in manifest.get("caption_shards", [])]
    if not images or not captions:
        raise FeatureFormatError(f"{folder}: manifest lists no image or caption shards")

    def cat(parts: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        return torch.cat([p[key] for p in parts])

    image_ids = cat(images, "image_ids")
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    if len(row_of) != len(image_ids):
        raise FeatureFormatError(f"{folder}: duplicate image ids across shards")
    caption_image_ids = cat(captions, "image_ids").tolist()
    missing = sorted({i for i in caption_image_ids if i not in row_of})
    if missing:
        raise FeatureFormatError(
            f"{folder}: captions refer to {len(missing)} images without features, e.g. {missing[:5]}"
        )
    return FeatureSet(
        image_ids=image_ids,
        heads=cat(images, "heads"),
        mean_heads=cat(images, "mean_heads"),
        cls=cat(images, "cls"),
        caption_ids=cat(captions, "caption_ids"),
        caption_image=torch.tensor([row_of[i] for i in caption_image_ids], dtype=torch.long),
        text=cat(captions, "text"),
        manifest=manifest,
    )
