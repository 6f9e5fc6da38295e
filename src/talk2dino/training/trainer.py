"""The training loop for psi (method.md §3.4–3.6): a generic `Trainer` and `run_train`.

`Trainer` is generic (house-style §2): it knows a module with parameters, an optimiser, a loss
function of one batch of indices, and an iterable of index batches per epoch; it reports through
callbacks. Everything specific to Talk2DINO lives in `ContrastiveObjective` (the loss of a batch),
`Validator` (val loss and text→image recall@K) and `run_train` (features, run folder, checkpoints).

Speed: the features are indexed directly with slices of a seeded ``randperm``; there is no
DataLoader and no per-sample collation. On CPU the features are in RAM anyway; on a GPU they are
moved there once when they fit (`TrainConfig.on_device`), else each batch is gathered on the host
and copied. Float16 features are cast to float32 per batch, on the compute device.

The run folder (``TrainConfig.out``) after every epoch::

    checkpoint.pt            psi, Adam state, epochs done, step, RNG states, config, log history
                             (the commit point; written to a temp file and renamed)
    talk2dino.json           ModelConfig naming the backbone and text encoder of the features,
    projection.safetensors   psi, and projection.json with the training metadata: the folder
    projection.json          loads with ``create_model("local-dir:OUT")``
    train_config.json        the effective TrainConfig
    log.jsonl                one line per epoch: losses, lr, seconds, val recall@K, head histogram

The model files and the log are derived from the checkpoint and rewritten from it on ``resume``,
so a crash or a full disk at any point loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import nn

from talk2dino.config import BackboneConfig, ModelConfig, ProjectionConfig, TargetStrategy, TextConfig, TrainConfig
from talk2dino.errors import Talk2DinoError, WeightsError
from talk2dino.extract.format import FeatureFormatError, FeatureSet, load_features
from talk2dino.fileio import atomic_path, fault_point, remove_temps
from talk2dino.models.projection import PROJECTION_CONFIG_FILE, PROJECTION_FILE, Projection
from talk2dino.registry import MODEL_CONFIG_FILE, get_model_config, list_models, resolve_device, save_model_folder
from talk2dino.training.loss import infonce_loss
from talk2dino.training.targets import STRATEGIES, batch_image_embeddings, unit

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = "talk2dino-train-checkpoint/1"
RUN_FILES = (CHECKPOINT_FILE, TRAIN_CONFIG_FILE, LOG_FILE, MODEL_CONFIG_FILE, PROJECTION_FILE, PROJECTION_CONFIG_FILE)
# TrainConfig fields a resumed run may change: none of them alters the trained weights.
# (`features` may move; the features themselves are compared through their manifest summary.)
RESUMABLE_FIELDS = frozenset(
    {"features", "val_features", "epochs", "device", "on_device", "eval_every", "recall_ks", "val_max_images"}
)
DEVICE_MEMORY_FRACTION = 0.7  # on_device=None: features go on the GPU when they need at most this share of free memory
EVAL_CHUNK_BYTES = 256 * 2**20  # bound on the [captions, images(, heads)] score block of recall@K
TABLE_CHUNK_IMAGES = 4096  # images per chunk when precomputing strategy image embeddings


class TrainingError(Talk2DinoError):
    """A run folder cannot be used, a resume does not match, or a run file cannot be written."""


# --------------------------------------------------------------------------------------------
# The generic loop
# --------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """What `Trainer` knows about one finished epoch.

    Attributes:
        epoch: 0-based index of the epoch.
        steps: optimiser steps in this epoch.
        global_step: optimiser steps since the start of training.
        mean_loss: mean over the epoch's batches of the loss the optimiser saw.
        seconds: wall time of the epoch's batches.
        metrics: filled by callbacks, in order (e.g. validation, the log record).
    """

    epoch: int
    steps: int
    global_step: int
    mean_loss: float
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Hooks `Trainer` calls; override the ones you need (all default to doing nothing)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of `epoch` (0-based)."""

    def on_batch_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After each optimiser step; `loss` is the detached ``[]`` loss on the compute device (no host sync)."""

    def on_epoch_end(self, trainer: Trainer, stats: EpochStats) -> None:
        """After the last batch of an epoch; callbacks run in order and may add to ``stats.metrics``."""


class Trainer:
    """A minimal generic training loop (minGPT style): module, optimiser, loss of a batch, callbacks.

    Args:
        module: the trained module (switched to train mode by `fit`).
        optimizer: an optimiser over the module's parameters.
        loss_fn: maps one batch (here: ``[B]`` int64 sample indices) to a ``[]`` loss with a graph.
        callbacks: called in order at epoch start, batch end and epoch end.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks)
        self.global_step = 0
        self.max_steps: int | None = None  # stop once global_step reaches it (None: no limit)

    def run_epoch(self, epoch: int, batches: Iterable[torch.Tensor]) -> EpochStats:
        """Train on every batch of `batches` once, then call ``on_epoch_end``.

        Args:
            epoch: 0-based epoch index (passed to the callbacks).
            batches: index batches, each ``[B]`` int64.

        Returns:
            The epoch's statistics (after the callbacks filled ``metrics``).
        """
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        start = time.perf_counter()
        loss_sum: torch.Tensor | None = None
        steps = 0
        for batch in batches:
            if self.max_steps is not None and self.global_step >= self.max_steps:
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(batch)
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            steps += 1
            detached = loss.detach()
            # accumulate on the device: no host synchronisation per step
            loss_sum = detached.double() if loss_sum is None else loss_sum + detached.double()
            for callback in self.callbacks:
                callback.on_batch_end(self, detached)
            fault_point("train-step")
        mean_loss = float(loss_sum.item()) / steps if loss_sum is not None else float("nan")
        stats = EpochStats(epoch=epoch, steps=steps, global_step=self.global_step, mean_loss=mean_loss,
                           seconds=time.perf_counter() - start)
        for callback in self.callbacks:
            callback.on_epoch_end(self, stats)
        return stats

    def fit(self, batches: Callable[[int], Iterable[torch.Tensor]], *, epochs: int, start_epoch: int = 0) -> None:
        """Run epochs ``start_epoch .. epochs-1``.

        Args:
            batches: epoch index -> that epoch's index batches (must be a function of the epoch alone
                for an exact resume).
            epochs: total number of epochs.
            start_epoch: first epoch to run (epochs already done when resuming).
        """
        self.module.train()
        for epoch in range(start_epoch, epochs):
            if self.max_steps is not None and self.global_step >= self.max_steps:
                logger.info("stopping at step %d (max_steps)", self.global_step)
                break
            self.run_epoch(epoch, batches(epoch))


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a ``randperm`` from a CPU generator seeded with (seed, epoch).

    Depending on nothing but (seed, epoch) makes a resumed run draw the same orders as an
    uninterrupted one, on any device.

    Returns:
        ``[num_samples]`` int64 permutation, on CPU.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_samples, generator=generator)


def shuffled_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Index batches of one epoch, shuffled, last partial batch kept (method.md §3.5).

    Returns:
        ``ceil(num_samples / batch_size)`` int64 tensors on `device`, each ``[batch_size]`` but the last.
    """
    return list(epoch_permutation(num_samples, seed=seed, epoch=epoch).to(device).split(batch_size))


# --------------------------------------------------------------------------------------------
# Talk2DINO specifics: image embeddings per strategy, the batch loss, validation
# --------------------------------------------------------------------------------------------


def strategy_images(features: FeatureSet, strategy: TargetStrategy) -> torch.Tensor:
    """What `ContrastiveObjective` indexes per image for `strategy`.

    For ``max`` the per-head embeddings as stored (the head choice depends on psi, so it is made per
    batch). For the other strategies the image embedding does not depend on psi, so it is computed
    once, with `batch_image_embeddings`, on the features' device.

    Returns:
        ``max``: ``[I, M, D]`` the stored heads (float16 as stored). Otherwise ``[I, D]`` float32 unit vectors.
    """
    if strategy == "max":
        return features.heads
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown target strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    parts = []
    for start in range(0, features.heads.shape[0], TABLE_CHUNK_IMAGES):
        rows = slice(start, start + TABLE_CHUNK_IMAGES)
        embedding, _ = batch_image_embeddings(strategy, heads=features.heads[rows],
                                              mean_heads=features.mean_heads[rows], cls=features.cls[rows])
        parts.append(embedding)
    return torch.cat(parts)


class ContrastiveObjective:
    """The loss of one batch of caption indices (method.md §3.4 with a §3.6 strategy).

    Row i of a batch is caption i with its own image. Captions and images are gathered on the
    features' device, moved to the compute device and cast to float32 there.

    Args:
        psi: the projection being trained (on `device`).
        text: ``[K, 512]`` raw CLIP caption embeddings, float16 or float32.
        caption_image: ``[K]`` int64 image row of each caption.
        images: `strategy_images` output: ``[I, M, D]`` heads for ``max``, else ``[I, D]`` unit embeddings.
        strategy: the target strategy.
        temperature: τ, method.md §3.4.
        divide_by_batch_squared: divide each batch loss by B², pitfall P12.
        device: the compute device.

    Attributes:
        head_counts: ``[M]`` int64 chosen-head counts since `reset_stats` (``max`` only, else None).
        infonce_sum: ``[]`` float64 sum of the batch losses *before* the B² division since `reset_stats`.
    """

    def __init__(self, psi: nn.Module, *, text: torch.Tensor, caption_image: torch.Tensor, images: torch.Tensor,
                 strategy: TargetStrategy, temperature: float, divide_by_batch_squared: bool,
                 device: torch.device) -> None:
        self.psi = psi
        self.text = text
        self.caption_image = caption_image
        self.images = images
        self.strategy = strategy
        self.temperature = temperature
        self.divide_by_batch_squared = divide_by_batch_squared
        self.device = device
        self.head_counts: torch.Tensor | None = None
        self.infonce_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero `head_counts` and `infonce_sum`."""
        if self.strategy == "max":
            self.head_counts = torch.zeros(self.images.shape[1], dtype=torch.long, device=self.device)
        self.infonce_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Loss of the captions `index` (``[B]`` int64 on the features' device); returns a ``[]`` float32 loss."""
        index = index.to(self.text.device)
        image_rows = self.caption_image[index]
        return self.loss_for(self.text[index], image_rows)

    def loss_for(self, text: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """Loss of a batch given its captions' text embeddings and image rows.

        Args:
            text: ``[B, 512]`` raw CLIP embeddings (any float dtype, any device).
            image_rows: ``[B]`` int64 image row of each caption.

        Returns:
            ``[]`` float32 loss (divided by B² when configured).
        """
        text_unit = unit(self.psi(text.to(self.device, non_blocking=True)))
        gathered = self.images[image_rows.to(self.images.device)].to(self.device, non_blocking=True)
        if self.strategy == "max":
            image_unit, chosen = batch_image_embeddings("max", heads=gathered, text_unit=text_unit)
            assert chosen is not None and self.head_counts is not None
            # one_hot + sum instead of bincount: deterministic on every device
            self.head_counts += nn.functional.one_hot(chosen, self.head_counts.shape[0]).sum(0)
        else:
            image_unit = gathered.float()
        loss = infonce_loss(text_unit, image_unit, temperature=self.temperature, divide_by_batch_squared=False)
        self.infonce_sum += loss.detach().double()
        if self.divide_by_batch_squared:  # the same operation as infonce_loss(..., divide_by_batch_squared=True)
            batch = text_unit.shape[0]
            loss = loss / (batch * batch)
        return loss


def subset_images(features: FeatureSet, max_images: int | None) -> FeatureSet:
    """The first `max_images` images of `features` and the captions of those images (all when None)."""
    if max_images is None or max_images >= features.heads.shape[0]:
        return features
    keep = features.caption_image < max_images
    return FeatureSet(
        image_ids=features.image_ids[:max_images], heads=features.heads[:max_images],
        mean_heads=features.mean_heads[:max_images], cls=features.cls[:max_images],
        caption_ids=features.caption_ids[keep], caption_image=features.caption_image[keep],
        text=features.text[keep], manifest=features.manifest,
    )


class Validator:
    """Val loss and text→image recall@K with the training strategy.

    Score of caption t against image j: for ``max``, max_m ⟨t̂, v̂_{j,m}⟩ (the head the caption
    would pick); otherwise ⟨t̂, v̂_j⟩ with the strategy's single embedding. A caption's rank is the
    number of images scoring strictly higher than its own image; recall@K is the fraction of
    captions with rank < K. The val loss is the training loss over the val captions in a fixed
    seeded order, batch size as in training (it uses the training strategy, unlike the reference's
    head-averaged val target, pitfall P21). Scores are computed in chunks of captions, so the
    ``[captions, images, heads]`` block stays under `EVAL_CHUNK_BYTES`.

    Args:
        psi: the projection (evaluated under ``no_grad``).
        features: the val features (already subset; see `subset_images`), on any device.
        strategy, temperature, divide_by_batch_squared, batch_size, seed: as in training.
        ks: the K of recall@K.
        device: the compute device.
    """

    def __init__(self, psi: nn.Module, features: FeatureSet, *, strategy: TargetStrategy, temperature: float,
                 divide_by_batch_squared: bool, batch_size: int, ks: Sequence[int], seed: int,
                 device: torch.device) -> None:
        self.psi = psi
        self.ks = tuple(ks)
        self.batch_size = batch_size
        self.device = device
        self.strategy = strategy
        self.text = features.text.to(device)
        self.caption_image = features.caption_image.to(device)
        table = strategy_images(features.to(device), strategy)
        self.image_unit = unit(table)  # [I, M, D] for max, [I, D] otherwise; float32 unit
        self.num_images = int(self.image_unit.shape[0])
        self.objective = ContrastiveObjective(psi, text=self.text, caption_image=self.caption_image,
                                              images=self.image_unit, strategy=strategy, temperature=temperature,
                                              divide_by_batch_squared=divide_by_batch_squared, device=device)
        self.order = epoch_permutation(int(self.text.shape[0]), seed=seed, epoch=0).to(device)

    @torch.no_grad()
    def __call__(self) -> dict[str, Any]:
        """Evaluate psi now.

        Returns:
            ``{"loss", "infonce", "recall@K"..., "images", "captions", "seconds"}``.
        """
        start = time.perf_counter()
        self.objective.reset_stats()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = self.order.split(self.batch_size)
        for index in batches:
            loss_sum += self.objective(index).double()
        num_captions = int(self.text.shape[0])
        hits = torch.zeros(len(self.ks), dtype=torch.long, device=self.device)
        per_caption_bytes = self.image_unit[..., 0].numel() * 4
        chunk = max(1, EVAL_CHUNK_BYTES // max(1, per_caption_bytes))
        flat = self.image_unit.reshape(-1, self.image_unit.shape[-1])
        ks = torch.tensor(self.ks, device=self.device)
        for start_row in range(0, num_captions, chunk):
            rows = slice(start_row, start_row + chunk)
            text_unit = unit(self.psi(self.text[rows]))
            scores = text_unit @ flat.t()
            if self.strategy == "max":
                scores = scores.view(scores.shape[0], self.num_images, -1).amax(dim=2)
            own = scores.gather(1, self.caption_image[rows, None])
            rank = (scores > own).sum(dim=1)
            hits += (rank[:, None] < ks[None, :]).sum(dim=0)
        result: dict[str, Any] = {
            "loss": float(loss_sum.item()) / len(batches),
            "infonce": float(self.objective.infonce_sum.item()) / len(batches),
        }
        for k, count in zip(self.ks, hits.tolist(), strict=True):
            result[f"recall@{k}"] = count / num_captions
        result.update(images=self.num_images, captions=num_captions, seconds=time.perf_counter() - start)
        return result


# --------------------------------------------------------------------------------------------
# Run folder: checks, atomic writes, checkpoints
# --------------------------------------------------------------------------------------------


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    """JSON form of the config (tuples as lists), comparable with a reloaded train_config.json."""
    return dict(json.loads(json.dumps(dataclasses.asdict(config))))


def _validate(config: TrainConfig) -> None:
    checks: list[tuple[bool, str]] = [
        (config.target_strategy in STRATEGIES,
         f"target_strategy must be one of {', '.join(STRATEGIES)}, got {config.target_strategy!r}"),
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (config.max_steps is None or config.max_steps >= 1, f"max_steps must be >= 1 or None, got {config.max_steps}"),
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
        (config.lr > 0, f"lr must be positive, got {config.lr}"),
        (config.eps > 0, f"eps must be positive, got {config.eps}"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}"),
        (len(config.betas) == 2 and all(0 <= b < 1 for b in config.betas),
         f"betas must be two values in [0, 1), got {config.betas}"),
        (config.temperature > 0, f"temperature must be positive, got {config.temperature}"),
        (config.eval_every >= 1, f"eval_every must be >= 1, got {config.eval_every}"),
        (len(config.recall_ks) > 0 and all(k >= 1 for k in config.recall_ks),
         f"recall_ks must be positive integers, got {config.recall_ks}"),
        (config.val_max_images is None or config.val_max_images >= 1,
         f"val_max_images must be >= 1 or None, got {config.val_max_images}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Durable atomic write of `path` through `write(handle)` (see `talk2dino.fileio.atomic_path`).

    Raises:
        TrainingError: naming `path`, when anything fails (disk full, permissions); the old file is intact.
    """
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
            write(handle)
    except Exception as err:  # OSError, or torch's RuntimeError wrapping one
        raise TrainingError(
            f"{path}: could not write ({type(err).__name__}: {err}); the previous {path.name} is intact. "
            "Free disk space (or fix permissions), then rerun with --resume"
        ) from err


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda h: h.write((json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()))


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    # The whole log is rewritten each epoch: it is tiny, and a torn last line is impossible.
    _atomic_write(path, lambda h: h.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in history).encode()))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip / unpickling errors: a torn or foreign file
        from talk2dino.weights import describe_load_error  # one line, naming a refused global (issue 8)

        raise TrainingError(
            f"{path}: unreadable checkpoint ({describe_load_error(err)}); it is not a file this trainer wrote "
            "completely. Move it away to restart the run from scratch"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return dict(state)


def _inspect_out(out: Path, *, resume: bool) -> tuple[bool, dict[str, Any] | None]:
    """Check the run folder before anything is loaded or written.

    Returns:
        (holds_run, checkpoint): whether `out` holds a run of ours; its checkpoint, when resuming one.

    Raises:
        TrainingError: `out` is a file, holds files we did not write (a released checkpoint, a model
            folder, features), or holds a run while `resume` is off.
    """
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; give a folder for the run")
    if not out.is_dir():
        return False, None
    for name in remove_temps(out, RUN_FILES):
        logger.info("%s: deleted %s, a temp file left by an interrupted run", out, name)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise TrainingError(
            f"--out {out} holds files not written by `talk2dino train` ({', '.join(foreign[:5])}); "
            "training never writes next to released weights or other data: choose a new or empty folder"
        )
    holds_run = (out / TRAIN_CONFIG_FILE).is_file()
    if not holds_run:
        leftovers = sorted(p.name for p in out.iterdir())
        if leftovers:
            raise TrainingError(
                f"--out {out} holds a model folder ({', '.join(leftovers)}) but no {TRAIN_CONFIG_FILE}: it was not "
                "written by `talk2dino train`; choose a new or empty folder"
            )
        return False, None
    if not resume:
        raise TrainingError(
            f"--out {out} already holds a training run; pass --resume to continue it, or choose a new folder"
        )
    checkpoint_path = out / CHECKPOINT_FILE
    return True, _load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None


def _check_same_run(config: TrainConfig, saved: dict[str, Any], *, origin: Path) -> None:
    current = _config_dict(config)
    names = sorted((set(current) | set(saved)) - RESUMABLE_FIELDS)
    differing = [f"{n}: run {saved.get(n)!r} vs now {current.get(n)!r}" for n in names
                 if saved.get(n) != current.get(n)]
    if differing:
        raise TrainingError(
            f"{origin}: cannot resume, the run was started with another configuration ({'; '.join(differing)}); "
            "use the run's settings or a new --out"
        )


def features_summary(features: FeatureSet, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a features folder: backbone and text sources and sizes, counts, and its path."""
    backbone = features.manifest.get("backbone", {})
    text = features.manifest.get("text", {})
    return {
        "backbone": {"source": backbone.get("source"), "embed_dim": backbone.get("embed_dim"),
                     "num_heads": backbone.get("num_heads"), "logits_rope": backbone.get("logits_rope", "model")},
        "text": {"source": text.get("source")},
        "images": int(features.heads.shape[0]),
        "captions": int(features.text.shape[0]),
        "folder": str(folder),
    }


def _check_features(features: FeatureSet, folder: str) -> None:
    backbone = features.manifest.get("backbone", {})
    shape = (features.num_heads, features.embed_dim)
    if (backbone.get("num_heads"), backbone.get("embed_dim")) != shape:
        raise FeatureFormatError(
            f"{folder}: manifest says num_heads={backbone.get('num_heads')}, embed_dim={backbone.get('embed_dim')} "
            f"but the shards hold heads of shape [*, {shape[0]}, {shape[1]}]; re-extract the features"
        )
    if not backbone.get("source") or not features.manifest.get("text", {}).get("source"):
        raise FeatureFormatError(f"{folder}: manifest names no backbone or text source; re-extract the features")
    if int(features.text.shape[0]) == 0:
        raise FeatureFormatError(f"{folder}: no captions")


def _check_same_backbone(reference: dict[str, Any], other: dict[str, Any], *, what: str) -> None:
    for part in ("backbone", "text"):
        if reference[part] != other[part]:
            raise FeatureFormatError(
                f"{what} come from {part} {other[part]}, but the training features come from {reference[part]}; "
                "extract both with the same backbone and text encoder"
            )


def _registry_source(source: str, part: str) -> str:
    """A registry name in a manifest -> that model's `part` ("backbone" or "text") source; else `source`."""
    if source.startswith(("hf-hub:", "local-dir:")):
        return source
    try:
        config = get_model_config(source)
    except WeightsError:
        return source
    return config.backbone.source if part == "backbone" else config.text.source


def build_model_config(summary: dict[str, Any], name: str) -> ModelConfig:
    """The ModelConfig of a trained psi: the features' backbone and text encoder, psi from the folder itself.

    Inference defaults come from the registered model with the same backbone (for example θ = 0.54
    for ViT-L, method.md §4.6), else `InferenceConfig` defaults.
    """
    backbone = _registry_source(str(summary["backbone"]["source"]), "backbone")
    text = _registry_source(str(summary["text"]["source"]), "text")
    # psi must see at inference the logits it was trained on (DINOv3 with or without RoPE, §2.4).
    rope: Literal["model", "none"] = "none" if summary["backbone"].get("logits_rope") == "none" else "model"
    config = ModelConfig(name=name, backbone=BackboneConfig(source=backbone, logits_rope=rope),
                         text=TextConfig(source=text), projection=ProjectionConfig(source=None))
    for registered in list_models():
        known = get_model_config(registered)
        if known.backbone.source == backbone:
            return dataclasses.replace(config, inference=known.inference)
    return config


def _code_version() -> dict[str, Any]:
    from talk2dino import __version__

    commit = None
    package_src = Path(__file__).resolve().parents[2]  # .../src when running from a checkout
    try:
        proc = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_src, capture_output=True,
                              text=True, timeout=5, check=False)
        lines = proc.stdout.split()
        # only our own checkout counts, not some repository a virtual environment happens to live in
        if proc.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() / "src" == package_src:
            commit = lines[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"talk2dino": __version__, "git_commit": commit, "torch": torch.__version__}


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
    }


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    # method.md §3.5: seed Python, NumPy and torch (CPU and CUDA). Nothing here draws from them but
    # psi's initialisation; the epoch orders use their own generator (`epoch_permutation`).
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over `module`'s parameters with the recipe's lr, betas, eps and weight decay (method.md §3.5).

    The fused implementation is used where this torch build has one for the parameters' device
    (CUDA; CPU since torch 2.4): the same update rule, about 3x cheaper per step on CPU for psi. It may
    differ from the for-loop implementation in the last bits; runs and their resumes always use the same one.
    """
    kwargs: dict[str, Any] = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    try:
        return torch.optim.Adam(module.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device / torch version
        return torch.optim.Adam(module.parameters(), **kwargs)


def _fits_on_device(nbytes: int, device: torch.device, on_device: bool | None) -> bool:
    if device.type == "cpu":
        return True  # the features are in RAM already
    if on_device is not None:
        return on_device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return nbytes <= DEVICE_MEMORY_FRACTION * free
    return True


class _RunRecorder(Callback):
    """Validates, then commits the epoch: checkpoint, model folder, log (in this order)."""

    def __init__(self, *, config: TrainConfig, out: Path, psi: Projection, objective: ContrastiveObjective,
                 validator: Validator | None, history: list[dict[str, Any]], model_config: ModelConfig,
                 metadata: dict[str, Any]) -> None:
        self.config = config
        self.out = out
        self.psi = psi
        self.objective = objective
        self.validator = validator
        self.history = history
        self.model_config = model_config
        self.metadata = metadata

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.objective.reset_stats()

    def on_epoch_end(self, trainer: Trainer, stats: EpochStats) -> None:
        done = stats.epoch + 1
        val = None
        last = done == self.config.epochs or (self.config.max_steps is not None
                                              and stats.global_step >= self.config.max_steps)
        if self.validator is not None and (done % self.config.eval_every == 0 or last):
            val = self.validator()
            self.psi.train()
        counts = self.objective.head_counts
        record: dict[str, Any] = {
            "epoch": done,
            "step": stats.global_step,
            "train_loss": stats.mean_loss,
            "train_infonce": float(self.objective.infonce_sum.item()) / max(1, stats.steps),
            "lr": float(trainer.optimizer.param_groups[0]["lr"]),
            "seconds": stats.seconds,
            "val": val,
            "head_histogram": counts.tolist() if counts is not None else None,
        }
        self.history.append(record)
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "epoch": done,
            "step": stats.global_step,
            "psi": {k: v.detach().to("cpu").clone() for k, v in self.psi.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "rng": _rng_state(),
            "config": _config_dict(self.config),
            "features": self.metadata["features"],
            "log": list(self.history),
        }
        _atomic_write(self.out / CHECKPOINT_FILE, lambda h: torch.save(checkpoint, h))
        fault_point("train-after-checkpoint")
        write_derived_files(self.out, self.model_config, self.psi, self.history,
                            {**self.metadata, "epoch": done, "step": stats.global_step})
        stats.metrics["record"] = record
        recall = "" if val is None else " ".join(f"R@{k}={val[f'recall@{k}']:.4f}" for k in self.config.recall_ks)
        logger.info("epoch %d/%d: train_loss=%.6g (InfoNCE %.4f) %s %.1fs", done, self.config.epochs,
                    stats.mean_loss, record["train_infonce"], recall, stats.seconds)


def write_derived_files(out: Path, model_config: ModelConfig, psi: Projection, history: list[dict[str, Any]],
                        metadata: dict[str, Any]) -> None:
    """Write the model folder (talk2dino.json, projection.*) and log.jsonl from the committed state.

    Raises:
        TrainingError: naming the folder when a write fails (the checkpoint already holds everything).
    """
    try:
        save_model_folder(out, model_config, psi, metadata)
    except Exception as err:  # safetensors and OSError; atomic_path already removed its temp files
        raise TrainingError(
            f"{out}: could not write the model files ({type(err).__name__}: {err}); {CHECKPOINT_FILE} is intact. "
            "Free disk space, then rerun with --resume"
        ) from err
    fault_point("train-before-log")
    _write_log(out / LOG_FILE, history)


def _derived_files_current(out: Path, psi: Projection, history: list[dict[str, Any]], epoch: int) -> bool:
    from safetensors.torch import load_file

    try:
        lines = (out / LOG_FILE).read_text(encoding="utf-8").splitlines()
        if [json.loads(line) for line in lines] != history:
            return False
        info = json.loads((out / PROJECTION_CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("epoch") != epoch or not (out / MODEL_CONFIG_FILE).is_file():
            return False
        saved = load_file(str(out / PROJECTION_FILE))
    except Exception:  # missing, torn or unreadable: rewrite from the checkpoint
        return False
    state = psi.state_dict()
    return set(saved) == set(state) and all(torch.equal(saved[k], state[k].cpu()) for k in state)


class _ProgressBar(Callback):
    def __init__(self, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.bar: Any = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        from tqdm import tqdm

        total = self.steps_per_epoch
        if trainer.max_steps is not None:
            total = max(0, min(total, trainer.max_steps - trainer.global_step))
        self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                        leave=False)

    def on_batch_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self.bar.update(1)

    def on_epoch_end(self, trainer: Trainer, stats: EpochStats) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------
# The entry point of `talk2dino train`
# --------------------------------------------------------------------------------------------


def run_train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
              callbacks: Sequence[Callback] = ()) -> Path:
    """Train psi on extracted features and write a loadable run folder (method.md §3.4–3.6).

    Adam (lr, betas, eps, weight decay of `config`; constant lr), batches of ``config.batch_size``
    captions shuffled every epoch with a generator seeded by (seed, epoch), last partial batch kept,
    float32 math, psi initialised by ``torch.manual_seed(seed)`` then ``Projection(512, D)``
    (method.md §3.5). After every epoch the run folder is committed (see the module docstring).

    Args:
        config: the recipe; ``config.out`` is the run folder.
        resume: continue the run in ``config.out`` from its checkpoint (a finished run is left as is;
            a larger ``epochs`` extends it). Without it, ``config.out`` must be new or empty.
        progress: show a tqdm bar per epoch (stderr).
        callbacks: extra callbacks, run after the run's own (which puts the log record in
            ``stats.metrics["record"]``).

    Returns:
        The run folder, loadable with ``create_model("local-dir:<folder>")``.

    Raises:
        TrainingError: the run folder holds foreign files, holds a run (without `resume`) or a run with
            another configuration or other features, or a run file cannot be written.
        FeatureFormatError: features missing, incomplete, corrupt, or train and val from different backbones.
        ValueError: an impossible configuration value.
    """
    _validate(config)
    out = Path(config.out)
    holds_run, checkpoint = _inspect_out(out, resume=resume)
    if holds_run:
        saved_config = checkpoint["config"] if checkpoint is not None else json.loads(
            (out / TRAIN_CONFIG_FILE).read_text(encoding="utf-8"))
        _check_same_run(config, saved_config, origin=out)
    elif resume:
        logger.info("%s holds no run yet; starting a new one", out)

    # Load and check every input before the first write into `out`.
    train = load_features(config.features)
    _check_features(train, config.features)
    summary = features_summary(train, config.features)
    if checkpoint is not None:
        previous = dict(checkpoint["features"])
        _check_same_backbone(previous, summary, what=f"features {config.features}")
        counts = (previous["images"], previous["captions"])
        if counts != (summary["images"], summary["captions"]):
            raise TrainingError(
                f"{out}: the run was trained on {counts[0]} images / {counts[1]} captions, but {config.features} "
                f"holds {summary['images']} / {summary['captions']}; use the run's features or a new --out"
            )
    val: FeatureSet | None = None
    if config.val_features is not None:
        val = load_features(config.val_features, expect_embed_dim=train.embed_dim, expect_num_heads=train.num_heads)
        _check_features(val, config.val_features)
        _check_same_backbone(summary, features_summary(val, config.val_features),
                             what=f"val features {config.val_features}")
        val = subset_images(val, config.val_max_images)

    device = resolve_device(config.device)
    _seed_everything(config.seed)
    psi = Projection(int(train.text.shape[1]), train.embed_dim).to(device)
    optimizer = build_optimizer(psi, config)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    trainer_step = 0
    if checkpoint is not None:
        psi.load_checked(checkpoint["psi"], origin=str(out / CHECKPOINT_FILE))
        optimizer.load_state_dict(checkpoint["optimizer"])
        _restore_rng(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        trainer_step = int(checkpoint["step"])
        history = list(checkpoint["log"])
        if start_epoch > config.epochs:
            raise TrainingError(f"{out}: the run already has {start_epoch} epochs; cannot resume to {config.epochs}")
        logger.info("resuming %s after epoch %d (step %d)", out, start_epoch, trainer_step)

    model_config = build_model_config(summary, name=f"talk2dino-trained:{out.resolve().name}")
    metadata: dict[str, Any] = {"train_config": _config_dict(config), "features": summary,
                                "code_version": _code_version(), "licence": None}
    if checkpoint is not None and start_epoch == config.epochs:
        if not _derived_files_current(out, psi, history, start_epoch):
            logger.info("%s: finished run; rewriting its model files and log from %s", out, CHECKPOINT_FILE)
            write_derived_files(out, model_config, psi, history, {**metadata, "epoch": start_epoch,
                                                                  "step": trainer_step})
        else:
            logger.info("%s: the run already finished %d epochs; nothing to do", out, start_epoch)
        return out

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / TRAIN_CONFIG_FILE, _config_dict(config))
    if checkpoint is not None:  # bring the derived files back in line with the committed state
        write_derived_files(out, model_config, psi, history, {**metadata, "epoch": start_epoch,
                                                              "step": trainer_step})

    images = strategy_images(train, config.target_strategy)
    nbytes = images.numel() * images.element_size() + train.text.numel() * train.text.element_size()
    store = device if _fits_on_device(nbytes, device, config.on_device) else torch.device("cpu")
    logger.info("training on %s: %d captions, %d images, strategy %s, features on %s (%.2f GB)", device,
                summary["captions"], summary["images"], config.target_strategy, store, nbytes / 1e9)
    objective = ContrastiveObjective(
        psi, text=train.text.to(store), caption_image=train.caption_image.to(store), images=images.to(store),
        strategy=config.target_strategy, temperature=config.temperature,
        divide_by_batch_squared=config.loss_divide_by_batch_squared, device=device,
    )
    del train, images
    validator = None
    if val is not None:
        validator = Validator(psi, val, strategy=config.target_strategy, temperature=config.temperature,
                              divide_by_batch_squared=config.loss_divide_by_batch_squared,
                              batch_size=config.batch_size, ks=config.recall_ks, seed=config.seed, device=device)
    recorder = _RunRecorder(config=config, out=out, psi=psi, objective=objective, validator=validator,
                            history=history, model_config=model_config, metadata=metadata)
    num_captions = int(objective.text.shape[0])
    own: list[Callback] = []
    if progress:  # first, so the bar is closed before the epoch's log line
        own.append(_ProgressBar(-(-num_captions // config.batch_size), config.epochs))
    own.append(recorder)
    trainer = Trainer(psi, optimizer, objective, callbacks=[*own, *callbacks])
    trainer.global_step = trainer_step
    trainer.max_steps = config.max_steps

    def batches(epoch: int) -> list[torch.Tensor]:
        return shuffled_batches(num_captions, config.batch_size, seed=config.seed, epoch=epoch, device=store)

    # Log lines go through tqdm.write while a bar is shown, so neither overwrites the other.
    with _logging_around_bars(progress):
        trainer.fit(batches, epochs=config.epochs, start_epoch=start_epoch)
    return out


def _logging_around_bars(progress: bool) -> contextlib.AbstractContextManager[Any]:
    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
