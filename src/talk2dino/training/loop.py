"""A generic training loop (house-style §2): module, optimiser, loss of a batch, callbacks.

`Trainer` knows a module with parameters, an optimiser, a loss function of one batch of indices and an
iterable of index batches per epoch, and nothing about psi; it reports through `Callback` hooks
(minGPT style). The seeded epoch orders (`epoch_permutation`, `shuffled_batches`) depend on nothing but
(seed, epoch), so a resumed run draws the same batches as an uninterrupted one. `ProgressBar` and
`logging_around_bars` are the optional tqdm display.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from talk2dino.fileio import fault_point

logger = logging.getLogger(__name__)


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


class ProgressBar(Callback):
    """A tqdm bar per epoch (stderr), counting optimiser steps; closed before the epoch's log line when first."""

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


def logging_around_bars(progress: bool) -> contextlib.AbstractContextManager[Any]:
    """Route log lines through ``tqdm.write`` while bars are shown (`progress`), so neither overwrites the other."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
