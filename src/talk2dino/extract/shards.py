"""The shards and manifest of one extraction: writing, resume checks, and the merge of torchrun ranks.

The format itself (file names, tensors, manifest keys) is `talk2dino.data.features`. This module writes it:

- `ShardWriter` writes one shard pair (each file to a hidden temp name, fsynced and renamed), then rewrites
  the rank's manifest listing it with its sha256 and counts; a failed write removes what the manifest
  does not list and raises `ExtractionError`.
- `verified_shards` and `remove_leftovers` make a rerun resume: listed shards are kept after checking
  their size and sha256, unlisted shard files and temp files of this rank are deleted.
- `check_compatible` refuses a folder extracted with other settings (`IDENTITY_BEFORE_LOAD`, `IDENTITY`).
- `merge_rank_manifests` and `finish_ranks` merge the ``manifest.rank{r}.json`` of a ``torchrun`` group
  into ``manifest.json`` (rank 0 after a gloo barrier, else the last rank to finish).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from talk2dino.data.features import (
    CAPTION_SHARD,
    FEATURE_FORMAT,
    IMAGE_SHARD,
    MANIFEST_FILE,
    RANK_MANIFEST,
    SHARD_NAME,
    FeatureFormatError,
)
from talk2dino.distributed import TorchrunEnv, init_process_group
from talk2dino.errors import Talk2DinoError
from talk2dino.fileio import atomic_write_bytes, fault_point, file_sha256, json_bytes, temp_target

__all__ = [
    "IDENTITY",
    "IDENTITY_BEFORE_LOAD",
    "ExtractionError",
    "Shard",
    "ShardWriter",
    "canonical_safetensors",
    "check_compatible",
    "finish_ranks",
    "merge_rank_manifests",
    "read_manifest_file",
    "remove_leftovers",
    "verified_shards",
]

logger = logging.getLogger(__name__)

BARRIER_TIMEOUT = timedelta(hours=12)  # ranks may finish hours apart when one of them resumed more work
# Settings a resumed run must share with the folder's manifest (dotted paths into the manifest).
IDENTITY_BEFORE_LOAD = (
    "split", "image_size", "shard_size", "limit", "world_size", "compute_dtype", "dtype", "backbone.source",
    "text.source", "text.context_length", "annotations.sha256", "preprocessing",
)
IDENTITY = (
    *IDENTITY_BEFORE_LOAD, "backbone.model_type", "backbone.embed_dim", "backbone.num_heads",
    "backbone.num_registers", "backbone.patch_size", "backbone.revision", "text.revision", "text.embed_dim",
)


class ExtractionError(Talk2DinoError):
    """Writing the features failed (e.g. a full disk); what was written is kept and a rerun resumes."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Durable atomic write: `path` is either absent, its old content, or the complete new content."""
    atomic_write_bytes(path, data, durable=True)


def canonical_safetensors(data: bytes) -> bytes:
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


def _lookup(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_compatible(existing: dict[str, Any], expected: dict[str, Any], keys: Sequence[str], where: Path) -> None:
    """Refuse features extracted with other settings.

    Args:
        existing: the manifest found in the folder; expected: this run's manifest so far.
        keys: dotted manifest paths that must be equal (`IDENTITY_BEFORE_LOAD` or `IDENTITY`).
        where: the manifest file, for the message.

    Raises:
        FeatureFormatError: naming the first differing setting with both values.
    """
    for key in keys:
        old, new = _lookup(existing, key), _lookup(expected, key)
        if old != new:
            raise FeatureFormatError(
                f"{where}: features there were extracted with {key}={old!r}, this run has {new!r}; pick another "
                "output folder, or rerun with that extraction's settings to resume it"
            )


@dataclass(frozen=True)
class Shard:
    """One planned shard of a rank: its index and the input positions ``[start, stop)`` it covers."""

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
    _write_atomic(path, json_bytes(ordered))


def read_manifest_file(path: Path) -> dict[str, Any]:
    """Read a manifest file of this format, complete or not (a rank's own or the merged one).

    Raises:
        FeatureFormatError: unreadable, or not a features manifest.
    """
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
        part = read_manifest_file(path)
        if not part.get("complete"):
            return None
        parts.append(part)
    first = parts[0]
    for rank, part in enumerate(parts[1:], 1):
        check_compatible(first, part, IDENTITY, folder / RANK_MANIFEST.format(rank=rank))
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


def verified_shards(folder: Path, previous: dict[str, Any] | None, rank: int,
                    plan: dict[int, Shard]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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


def remove_leftovers(folder: Path, rank: int, keep: set[str], manifest_name: str) -> None:
    """Delete this rank's shard files the manifest does not list, and this rank's temp files."""
    for path in folder.iterdir():
        name = path.name
        match = SHARD_NAME.match(name)
        if match and int(match.group(2)) == rank and name not in keep:
            logger.info("%s: deleting %s, a shard file the manifest does not list (left by an interrupted run)",
                        folder, name)
            path.unlink(missing_ok=True)
            continue
        target = temp_target(name)
        if target is not None:
            inner = SHARD_NAME.match(target)
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


class ShardWriter:
    """Writes one rank's shard pairs and keeps its manifest listing them (the manifest is the commit point).

    Args:
        manifest: the rank's manifest (updated in place: shard entries, then the recomputed counts).
        manifest_path: where it is written (``manifest.json``, or ``manifest.rank{r}.json`` under torchrun).
        rank: the writing rank (part of every shard file name).
    """

    def __init__(self, manifest: dict[str, Any], manifest_path: Path, rank: int) -> None:
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.folder = manifest_path.parent
        self.rank = rank

    def write_shard(self, shard: Shard, image_tensors: dict[str, torch.Tensor],
                    caption_tensors: dict[str, torch.Tensor], *, failed_images: list[dict[str, Any]],
                    captions_of_failed_images: int, truncated_captions: list[dict[str, Any]]) -> None:
        """Write both shard files of `shard`, then the manifest listing them (in that order).

        Args:
            shard: the planned shard.
            image_tensors: `talk2dino.data.features.IMAGE_KEYS` tensors of the shard's readable images.
            caption_tensors: `talk2dino.data.features.CAPTION_KEYS` tensors of their captions.
            failed_images: ``{image_id, file_name, error}`` of the shard's unreadable images.
            captions_of_failed_images: how many captions those images had.
            truncated_captions: ``{caption_id, image_id, tokens}`` of captions longer than the CLIP context.

        Raises:
            ExtractionError: a file could not be written; the shards listed so far are kept.
        """
        from safetensors.torch import save

        meta = {"format": FEATURE_FORMAT, "rank": str(self.rank), "index": str(shard.index)}
        image_name = IMAGE_SHARD.format(rank=self.rank, index=shard.index)
        caption_name = CAPTION_SHARD.format(rank=self.rank, index=shard.index)
        image_bytes = canonical_safetensors(save({k: v.contiguous() for k, v in image_tensors.items()},
                                                 metadata=meta))
        caption_bytes = canonical_safetensors(save(caption_tensors, metadata=meta))
        kept = len(self.manifest["image_shards"])
        for name, data in ((image_name, image_bytes), (caption_name, caption_bytes)):
            try:
                _write_atomic(self.folder / name, data)
            except OSError as err:
                (self.folder / image_name).unlink(missing_ok=True)  # not listed: free its space now
                raise _write_error(err, self.folder / name, self.manifest_path, kept) from err
            fault_point("extract-mid-shard" if name == image_name else "extract-shard-files")
        images = int(image_tensors["image_ids"].shape[0])
        captions = int(caption_tensors["caption_ids"].shape[0])
        self.manifest["image_shards"].append({
            "file": image_name, "sha256": hashlib.sha256(image_bytes).hexdigest(), "bytes": len(image_bytes),
            "rank": self.rank, "index": shard.index, "positions": [shard.start, shard.stop], "images": images,
            "failed_images": failed_images,
        })
        self.manifest["caption_shards"].append({
            "file": caption_name, "sha256": hashlib.sha256(caption_bytes).hexdigest(),
            "bytes": len(caption_bytes), "rank": self.rank, "index": shard.index, "captions": captions,
            "captions_of_failed_images": captions_of_failed_images,
            "truncated_captions": truncated_captions,
        })
        self.save_manifest(written=(image_name, caption_name))
        logger.debug("wrote shard %d: %d images, %d captions", shard.index, images, captions)

    def save_manifest(self, written: tuple[str, ...] = ()) -> None:
        """Rewrite the manifest (counts recomputed); on failure, unlist and delete the files `written`.

        Raises:
            ExtractionError: the manifest could not be written.
        """
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


def finish_ranks(folder: Path, env: TorchrunEnv) -> None:
    """Wait for every rank (process group when there is one) and merge the rank manifests.

    With a process group (initialised here from ``MASTER_ADDR``/``MASTER_PORT`` when needed), rank 0 merges
    after a barrier and every rank returns once ``manifest.json`` exists. Without one, the last rank to
    finish merges.

    Raises:
        ExtractionError: after all ranks finished, a rank manifest is missing or incomplete.
    """
    import torch.distributed as dist

    created = init_process_group(env, timeout=BARRIER_TIMEOUT, require_address=True)
    if not (dist.is_available() and dist.is_initialized()):
        if merge_rank_manifests(folder, env.world_size) is None:
            logger.info("%s: rank %d finished; the last rank to finish writes %s", folder, env.rank, MANIFEST_FILE)
        return
    try:
        dist.barrier()
        if env.rank == 0 and merge_rank_manifests(folder, env.world_size) is None:
            raise ExtractionError(f"{folder}: a rank manifest is missing or incomplete after all ranks finished")
        dist.barrier()  # the other ranks return only once manifest.json exists
    finally:
        if created:
            dist.destroy_process_group()
