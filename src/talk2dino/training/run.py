"""`talk2dino train`: psi from extracted features to a loadable run folder (method.md §3.4–3.6).

`run_train` wires the parts together: it checks the run folder (`talk2dino.training.run_folder`) and the
features (`talk2dino.data.features`), builds psi and Adam, and runs the generic loop
(`talk2dino.training.loop.Trainer`) on the contrastive objective (`talk2dino.training.objective`); after
every epoch `RunRecorder` validates and commits the run folder.

Speed: the features are indexed directly with slices of a seeded ``randperm``; there is no DataLoader and
no per-sample collation. On a GPU they are moved there once when they fit (`TrainConfig.on_device`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from talk2dino.config import BackboneConfig, ModelConfig, ProjectionConfig, TextConfig, TrainConfig
from talk2dino.data.features import FeatureFormatError, FeatureSet, load_features
from talk2dino.errors import InvalidInputError, WeightsError
from talk2dino.factory import resolve_device
from talk2dino.fileio import fault_point
from talk2dino.models.projection import Projection
from talk2dino.registry import get_model_config, list_models
from talk2dino.training.loop import Callback, EpochStats, ProgressBar, Trainer, logging_around_bars, shuffled_batches
from talk2dino.training.objective import ContrastiveObjective, Validator, strategy_images, subset_images
from talk2dino.training.run_folder import (
    CHECKPOINT_FILE,
    TRAIN_CONFIG_FILE,
    TrainingError,
    check_same_run,
    code_version,
    config_dict,
    derived_files_current,
    inspect_out,
    restore_rng,
    save_checkpoint,
    write_derived_files,
    write_train_config,
)
from talk2dino.training.strategies import STRATEGIES

logger = logging.getLogger(__name__)

DEVICE_MEMORY_FRACTION = 0.7  # on_device=None: features go on the GPU when they need at most this share of free memory


def _validate(config: TrainConfig) -> None:
    """`TrainConfig.validate` (the ranges), then what a range cannot say: a known strategy, two betas, some K.

    Raises:
        InvalidInputError: one line naming the setting (it is also a ``ValueError``).
    """
    config.validate()
    checks: list[tuple[bool, str]] = [
        (config.target_strategy in STRATEGIES,
         f"target_strategy must be one of {', '.join(STRATEGIES)}, got {config.target_strategy!r}"),
        (len(config.betas) == 2, f"betas must be two values in [0, 1), got {config.betas}"),
        (len(config.recall_ks) > 0, f"recall_ks must be positive integers, got {config.recall_ks}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)


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


@dataclass(kw_only=True, eq=False)
class RunRecorder(Callback):
    """Validates, then commits the epoch: checkpoint, model folder, log (in this order).

    Attributes:
        config: the run's configuration; out: the run folder.
        psi: the projection; objective: its loss (head counts and InfoNCE sums are read per epoch).
        validator: val loss and recall@K, or None without val features.
        history: one log record per epoch done (appended to).
        model_config: the run folder's `ModelConfig`; metadata: written into ``projection.json``.
    """

    config: TrainConfig
    out: Path
    psi: Projection
    objective: ContrastiveObjective
    validator: Validator | None
    history: list[dict[str, Any]]
    model_config: ModelConfig
    metadata: dict[str, Any]

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
        save_checkpoint(self.out, epoch=done, step=stats.global_step, psi=self.psi, optimizer=trainer.optimizer,
                        config=self.config, features=self.metadata["features"], history=self.history)
        fault_point("train-after-checkpoint")
        write_derived_files(self.out, self.model_config, self.psi, self.history,
                            {**self.metadata, "epoch": done, "step": stats.global_step})
        stats.metrics["record"] = record
        recall = "" if val is None else " ".join(f"R@{k}={val[f'recall@{k}']:.4f}" for k in self.config.recall_ks)
        logger.info("epoch %d/%d: train_loss=%.6g (InfoNCE %.4f) %s %.1fs", done, self.config.epochs,
                    stats.mean_loss, record["train_infonce"], recall, stats.seconds)


def run_train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
              callbacks: Sequence[Callback] = ()) -> Path:
    """Train psi on extracted features and write a loadable run folder (method.md §3.4–3.6).

    Adam (lr, betas, eps, weight decay of `config`; constant lr), batches of ``config.batch_size``
    captions shuffled every epoch with a generator seeded by (seed, epoch), last partial batch kept,
    float32 math, psi initialised by ``torch.manual_seed(seed)`` then ``Projection(512, D)``
    (method.md §3.5). After every epoch the run folder is committed (see `talk2dino.training.run_folder`).

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
        InvalidInputError: an impossible configuration value (also a ``ValueError``).
    """
    _validate(config)
    out = Path(config.out)
    holds_run, checkpoint = inspect_out(out, resume=resume)
    if holds_run:
        saved_config = checkpoint["config"] if checkpoint is not None else json.loads(
            (out / TRAIN_CONFIG_FILE).read_text(encoding="utf-8"))
        check_same_run(config, saved_config, origin=out)
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
        restore_rng(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        trainer_step = int(checkpoint["step"])
        history = list(checkpoint["log"])
        if start_epoch > config.epochs:
            raise TrainingError(f"{out}: the run already has {start_epoch} epochs; cannot resume to {config.epochs}")
        logger.info("resuming %s after epoch %d (step %d)", out, start_epoch, trainer_step)

    model_config = build_model_config(summary, name=f"talk2dino-trained:{out.resolve().name}")
    metadata: dict[str, Any] = {"train_config": config_dict(config), "features": summary,
                                "code_version": code_version(), "licence": None}
    if checkpoint is not None and start_epoch == config.epochs:
        if not derived_files_current(out, psi, history, start_epoch):
            logger.info("%s: finished run; rewriting its model files and log from %s", out, CHECKPOINT_FILE)
            write_derived_files(out, model_config, psi, history, {**metadata, "epoch": start_epoch,
                                                                  "step": trainer_step})
        else:
            logger.info("%s: the run already finished %d epochs; nothing to do", out, start_epoch)
        return out

    out.mkdir(parents=True, exist_ok=True)
    write_train_config(out, config)
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
    recorder = RunRecorder(config=config, out=out, psi=psi, objective=objective, validator=validator,
                           history=history, model_config=model_config, metadata=metadata)
    num_captions = int(objective.text.shape[0])
    own: list[Callback] = []
    if progress:  # first, so the bar is closed before the epoch's log line
        own.append(ProgressBar(-(-num_captions // config.batch_size), config.epochs))
    own.append(recorder)
    trainer = Trainer(psi, optimizer, objective, callbacks=[*own, *callbacks])
    trainer.global_step = trainer_step
    trainer.max_steps = config.max_steps

    def batches(epoch: int) -> list[torch.Tensor]:
        return shuffled_batches(num_captions, config.batch_size, seed=config.seed, epoch=epoch, device=store)

    # Log lines go through tqdm.write while a bar is shown, so neither overwrites the other.
    with logging_around_bars(progress):
        trainer.fit(batches, epochs=config.epochs, start_epoch=start_epoch)
    return out

