"""On-disk format of extracted training features (``talk2dino-features/1``), shared by extract and training.

Written by `talk2dino.extract` (`talk2dino extract`), read by `talk2dino.training` (`talk2dino train`).

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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from talk2dino.errors import Talk2DinoError, one_line
from talk2dino.fileio import JSON_READ_ERRORS, stays_inside

FEATURE_FORMAT = "talk2dino-features/1"
MANIFEST_FILE = "manifest.json"
IMAGE_KEYS = ("image_ids", "heads", "mean_heads", "cls")
CAPTION_KEYS = ("caption_ids", "image_ids", "text")
# Number of dimensions of each shard tensor (see the module docstring).
_KEY_RANKS = {"image_ids": 1, "heads": 3, "mean_heads": 2, "cls": 2, "caption_ids": 1, "text": 2}
IMAGE_SHARD = "images-{rank:03d}-{index:05d}.safetensors"
CAPTION_SHARD = "captions-{rank:03d}-{index:05d}.safetensors"
RANK_MANIFEST = "manifest.rank{rank}.json"
SHARD_NAME = re.compile(r"^(images|captions)-(\d{3})-(\d{5})\.safetensors$")  # groups: kind, rank, index
STORED_DTYPE = torch.float16  # every stored feature, whatever the compute dtype


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
        raise FeatureFormatError(
            f"{one_line(folder)}: no {MANIFEST_FILE}; is this a folder written by `talk2dino extract`?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except JSON_READ_ERRORS as err:
        raise FeatureFormatError(f"{one_line(path)}: unreadable manifest ({one_line(err)})") from err
    if not isinstance(manifest, dict):
        raise FeatureFormatError(f"{one_line(path)}: manifest is a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("format") != FEATURE_FORMAT:
        raise FeatureFormatError(
            f"{one_line(path)}: format {one_line(repr(manifest.get('format')))}, expected {FEATURE_FORMAT!r}"
        )
    return dict(manifest)


def shard_entries(folder: str | os.PathLike[str], manifest: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The manifest's ``image_shards`` or ``caption_shards`` list, each entry checked.

    Every entry must be an object whose ``file`` is a plain file name inside ``folder``: absolute paths,
    ``..`` components and symlinks that lead out of the folder are refused, so a hostile manifest cannot make
    the loader read (or hash) arbitrary files. ``rank`` and ``index`` must be integers when present and
    ``sha256`` a string.

    Raises:
        FeatureFormatError: naming the manifest entry and the offending value.
    """
    root = Path(folder)
    where = f"{one_line(root / MANIFEST_FILE)}: {key}"
    entries = manifest.get(key, [])
    if not isinstance(entries, list):
        raise FeatureFormatError(f"{where} is a JSON {type(entries).__name__}, expected a list")
    checked: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        here = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise FeatureFormatError(f"{here} is a JSON {type(entry).__name__}, expected an object")
        name = entry.get("file")
        if not isinstance(name, str) or not name:
            raise FeatureFormatError(f"{here}.file is {one_line(repr(name))}, expected a shard file name")
        for field_name in ("rank", "index"):
            value = entry.get(field_name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise FeatureFormatError(f"{here}.{field_name} is {one_line(repr(value))}, expected an integer")
        digest = entry.get("sha256")
        if digest is not None and not isinstance(digest, str):
            raise FeatureFormatError(f"{here}.sha256 is {one_line(repr(digest))}, expected a hex string")
        _inside(root, name, here)
        checked.append(entry)
    return checked


def _inside(root: Path, name: str, where: str) -> Path:
    """``root / name``, refusing names that escape ``root`` (absolute, ``..``, NUL, or a symlink leading out)."""
    if not stays_inside(name):
        raise FeatureFormatError(
            f"{where}.file {one_line(repr(name))} is not a file name inside the features folder; refusing to read it"
        )
    path = root / name
    try:
        resolved_root = root.resolve()
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop on older Pythons
        raise FeatureFormatError(f"{where}.file {one_line(repr(name))}: cannot resolve ({one_line(err)})") from err
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise FeatureFormatError(
            f"{where}.file {one_line(repr(name))} leads out of the features folder (symlink to {one_line(resolved)}); "
            "refusing to read it"
        )
    return path


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

    shown = one_line(path)
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise FeatureFormatError(
            f"{shown}: cannot read shard ({one_line(getattr(err, 'strerror', None) or err)}); resume extraction"
        ) from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FeatureFormatError(
            f"{shown}: corrupt or truncated shard (sha256 differs from the manifest); rerun `talk2dino extract` "
            "on the folder to extract it again"
        )
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises several types for truncated or corrupt files
        raise FeatureFormatError(
            f"{shown}: corrupt or truncated shard ({one_line(err)}); rerun `talk2dino extract` on the folder to "
            "extract it again"
        ) from err
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise FeatureFormatError(f"{shown}: shard lacks {missing}")
    for key in keys:
        tensor = tensors[key]
        want = _KEY_RANKS[key]
        if tensor.ndim != want:
            raise FeatureFormatError(f"{shown}: {key} has shape {list(tensor.shape)}, expected {want} dimensions")
        ids = key.endswith("_ids")
        if ids and tensor.dtype != torch.int64:
            raise FeatureFormatError(f"{shown}: {key} has dtype {tensor.dtype}, expected torch.int64")
        if not ids and not tensor.is_floating_point():
            raise FeatureFormatError(f"{shown}: {key} has dtype {tensor.dtype}, expected a float dtype")
    lengths = {k: int(tensors[k].shape[0]) for k in keys}
    if len(set(lengths.values())) != 1:
        raise FeatureFormatError(f"{shown}: inconsistent shard lengths {lengths}")
    return tensors


def _complete_manifest(folder: Path, expect_embed_dim: int | None, expect_num_heads: int | None) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest.get("complete", False) is not True:
        raise FeatureFormatError(
            f"{one_line(folder)}: extraction did not finish; rerun `talk2dino extract` to resume it"
        )
    backbone = manifest.get("backbone", {})
    if not isinstance(backbone, dict):
        raise FeatureFormatError(f"{one_line(folder)}: manifest field 'backbone' is not an object")
    for name, expected in (("embed_dim", expect_embed_dim), ("num_heads", expect_num_heads)):
        if expected is not None and backbone.get(name) != expected:
            raise FeatureFormatError(
                f"{one_line(folder)}: features have {name}={one_line(repr(backbone.get(name)))} (backbone "
                f"{one_line(repr(backbone.get('source')))}), expected {expected}"
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
    for entry, caption in _shard_pairs(folder, manifest):
        images = read_shard(folder / entry["file"], IMAGE_KEYS, sha256=entry.get("sha256") if verify else None)
        texts = read_shard(folder / caption["file"], CAPTION_KEYS, sha256=caption.get("sha256") if verify else None)
        known = set(images["image_ids"].tolist())
        stray = sorted({i for i in texts["image_ids"].tolist() if i not in known})
        if stray:
            raise FeatureFormatError(
                f"{one_line(folder / caption['file'])}: captions refer to {len(stray)} images that are not in "
                f"{one_line(entry['file'])}, e.g. {stray[:5]}"
            )
        yield images, texts


def _shard_pairs(folder: Path, manifest: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each image shard entry with the caption shard entry of the same (rank, index); checked, none read."""
    images = shard_entries(folder, manifest, "image_shards")
    captions = shard_entries(folder, manifest, "caption_shards")
    if not images or not captions:
        raise FeatureFormatError(f"{one_line(folder)}: manifest lists no image or caption shards")
    by_key = {(s.get("rank"), s.get("index")): s for s in captions}
    pairs = []
    for entry in images:
        caption = by_key.get((entry.get("rank"), entry.get("index")))
        if caption is None:
            raise FeatureFormatError(
                f"{one_line(folder)}: image shard {one_line(repr(entry['file']))} has no caption shard in the manifest"
            )
        pairs.append((entry, caption))
    return pairs


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

    images = [read_shard(folder / s["file"], IMAGE_KEYS, sha256=sha(s))
              for s in shard_entries(folder, manifest, "image_shards")]
    captions = [read_shard(folder / s["file"], CAPTION_KEYS, sha256=sha(s))
                for s in shard_entries(folder, manifest, "caption_shards")]
    if not images or not captions:
        raise FeatureFormatError(f"{one_line(folder)}: manifest lists no image or caption shards")

    def cat(parts: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        shapes = {tuple(p[key].shape[1:]) for p in parts}
        dtypes = {p[key].dtype for p in parts}
        if len(shapes) != 1 or len(dtypes) != 1:
            # torch.cat would raise a RuntimeError, or silently promote the dtype.
            raise FeatureFormatError(
                f"{one_line(folder)}: shards disagree on {key}: shapes {sorted(shapes)}, "
                f"dtypes {sorted(map(str, dtypes))}"
            )
        return torch.cat([p[key] for p in parts])

    image_ids = cat(images, "image_ids")
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    if len(row_of) != len(image_ids):
        raise FeatureFormatError(f"{one_line(folder)}: duplicate image ids across shards")
    caption_image_ids = cat(captions, "image_ids").tolist()
    missing = sorted({i for i in caption_image_ids if i not in row_of})
    if missing:
        raise FeatureFormatError(
            f"{one_line(folder)}: captions refer to {len(missing)} images without features, e.g. {missing[:5]}"
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
