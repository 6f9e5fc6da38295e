"""Decoding stages on DataLoader worker processes, shared by `talk2dino segment` (`talk2dino.cli.batch`) and
`talk2dino eval` (`talk2dino.evaluation.runner`): how many workers a device wants, and the loader's options.

Importing this module does not load torch (the writer processes of `talk2dino.cli.batch` import it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_AUTO_WORKERS", "default_workers", "keep_items", "loader_options", "worker_init"]

MAX_AUTO_WORKERS = 8
"""The most decoding processes chosen automatically (`default_workers`)."""


def keep_items(batch: list[Any]) -> list[Any]:
    """DataLoader collate function: the batch as a list (windows differ in number per image)."""
    return batch


def worker_init(_: int) -> None:
    # One thread per worker process: the parallelism is across workers, and OpenCV's own pool in every
    # worker would oversubscribe the cores the main process needs.
    import cv2

    cv2.setNumThreads(1)


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """Decoding processes for `device`: none on a CPU (the backbone uses every core); on a GPU a quarter of the
    cores beside the main process, at least 1 and at most 8 (decoding a 500x375 photo costs ~1/5 of writing its
    files, benchmarks/README.md "Folder pipeline")."""
    if device.type == "cpu":
        return 0
    spare = (cpus or os.cpu_count() or 2) - 1
    return max(1, min(MAX_AUTO_WORKERS, spare // 4))


def loader_options(workers: int, *, pin_memory: bool = False) -> dict[str, Any]:
    """DataLoader keyword arguments of a decoding stage (segment's `prepared_batches`, evaluation's samples):
    `workers` processes with one OpenCV thread each, two batches ahead per worker, spawned; a list per batch."""
    return dict(
        num_workers=workers, collate_fn=keep_items, pin_memory=pin_memory,
        worker_init_fn=worker_init if workers else None, prefetch_factor=2 if workers else None,
        persistent_workers=False,
        # spawn, not fork: a child forked after the model ran inherits OpenCV's and OpenMP's thread pools
        # in a locked state and hangs in its first resize (seen here). Spawning costs ~3 s per run.
        multiprocessing_context="spawn" if workers else None,
    )
