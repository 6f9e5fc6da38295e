"""Segmenting many files: host work overlapped with the device (issue 6, target 4; issue 16, target 4).

`talk2dino segment` over a folder spends time on three kinds of work: decoding and resizing images (host
CPU), the backbone and post-processing (the device), and encoding and writing PNG/JSON files (host CPU).
This module keeps them apart so that they overlap, each stage bounded so memory stays flat over any number of
files:

- :func:`prepared_batches` decodes and prepares images (:func:`talk2dino.prepare.prepare_image`) in
  DataLoader worker processes, at most two batches ahead per worker, with page-locked windows when the model is
  on CUDA, so the copy to the device is asynchronous. With ``workers=0`` the same code runs in-process (the
  default on a CPU, where the backbone already uses every core).
- :class:`BackgroundWriter` runs :class:`ResultFiles` jobs (one image's label PNG, overlay, legend, JSON) on one
  thread, or with ``processes`` in a pool of writer processes (PNG encoding holds the GIL for part of its time,
  and an overlay costs ~25 ms of one core per 500x375 photo, so one thread caps a GPU run near 40 img/s), never
  more than ``max_pending`` images ahead of the caller.
- :class:`MemoryBudget` (`talk2dino.data.image_memory`) refuses, from its header, an image whose segmentation
  would need too much memory; ``--max-image-memory`` is read here (`parse_byte_size`).

Importing this module does not load torch (the writer processes import it to run their jobs, and stay small).
The output folder's checks (what may be written where) are `talk2dino.cli.output_folder`.

A file that cannot be read (an :class:`~talk2dino.errors.InvalidInputError`) never stops the others: it comes
back as a `PreparedFile` with an `error`. Any other failure while preparing a file is not that file's fault (a
bug, a library version) and propagates, so the run stops at the first one (issue 12).
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talk2dino.config import InferenceConfig
from talk2dino.data.image_memory import FALLBACK_IMAGE_MEMORY, MemoryBudget, default_image_memory, format_bytes
from talk2dino.data.images import load_image
from talk2dino.data.loading import default_workers, loader_options
from talk2dino.errors import InvalidInputError, is_input_error

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from talk2dino.prepare import PreparedImage

    _FileDataset = Dataset["PreparedFile"]
else:
    # The DataLoader takes any object with __len__ and __getitem__; not subclassing torch's Dataset at run time
    # keeps torch out of this module's import (see the module docstring).
    _FileDataset = object

logger = logging.getLogger(__name__)

__all__ = ["FALLBACK_IMAGE_MEMORY", "BackgroundWriter", "MemoryBudget", "PreparedFile", "ResultFiles",
           "default_image_memory", "default_workers", "default_writers", "format_bytes", "loader_options",
           "parse_byte_size", "prepare_image", "prepared_batches"]

_MAX_AUTO_WRITERS = 16


def prepare_image(rgb: np.ndarray, config: InferenceConfig) -> PreparedImage:
    """`talk2dino.prepare.prepare_image` (resize, cut windows), imported on first use: see the module docstring."""
    from talk2dino.prepare import prepare_image as prepare

    return prepare(rgb, config)


@dataclass
class PreparedFile:
    """One input file after decoding: its windows, or the one-line reason it could not be read."""

    path: Path
    image: PreparedImage | None
    error: str | None = None

    def pin_memory(self) -> PreparedFile:
        """Page-lock the windows (DataLoader ``pin_memory`` calls this on each item)."""
        return self if self.image is None else PreparedFile(self.path, self.image.pin_memory(), self.error)


class _Files(_FileDataset):
    """Paths -> `PreparedFile` (decode, convert, resize, cut windows), in a worker or in-process."""

    def __init__(self, paths: Sequence[Path], config: InferenceConfig, max_pixels: int | None,
                 budget: MemoryBudget | None = None) -> None:
        self.paths = list(paths)
        self.config = config
        self.max_pixels = max_pixels
        self.budget = budget

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> PreparedFile:
        path = self.paths[index]
        try:
            rgb = load_image(path, max_pixels=self.max_pixels, check_header=self.budget)
            return PreparedFile(path, prepare_image(rgb, self.config))
        except InvalidInputError as err:  # the loaders wrap decoder errors in it; anything else stops the run
            return PreparedFile(path, None, str(err))


# Host cost per 500x375 photo, one core of a 2-core AMD EPYC VM (benchmarks/README.md, "Folder pipeline"):
# decoding + resizing + cutting windows ~5 ms, writing label PNG + legend + JSON ~5 ms, the overlay ~22 ms more.
# So on a GPU, where the device needs only the main process, writing gets about four cores for each decoding one.


def default_writers(device: torch.device, cpus: int | None = None) -> int:
    """Writer processes for `device`: 0 on a CPU (one writer thread: there a pool only takes cores from the
    backbone, measured in benchmarks/README.md), else the cores left by the main process and the decoding
    workers, at least 1 and at most 16."""
    if device.type == "cpu":
        return 0
    cpus = cpus or os.cpu_count() or 2
    return max(1, min(_MAX_AUTO_WRITERS, cpus - 1 - default_workers(device, cpus)))



# --- Memory (issue 14): an image is refused from its header when segmenting it would need too much memory. ---
# The estimate and the default limit are `talk2dino.data.image_memory`'s (the Python API holds images to them
# too); what is the CLI's alone is reading the flag.

_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_byte_size(text: str, flag: str = "--max-image-memory") -> int:
    """``"8GB"`` -> bytes. Units: KB MB GB TB are powers of 1000, KiB MiB GiB TiB and the bare K M G T (as in
    ``free``, docker, systemd) powers of 1024; no unit (or B) is bytes; case-insensitive, decimals allowed.

    Raises:
        InvalidInputError: not a positive size with a known unit (one line naming `flag`).
    """
    from talk2dino.errors import one_line

    match = _BYTE_SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise InvalidInputError(f"{flag} {one_line(repr(text))}: not a size; write e.g. 8GB, 8GiB, 512MB or 8G")
    size = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if size < 1:
        raise InvalidInputError(f"{flag} {one_line(repr(text))}: must be a positive size")
    return size


def prepared_batches(paths: Sequence[Path], config: InferenceConfig, *, batch_size: int, workers: int,
                     pin_memory: bool = False, max_pixels: int | None = None,
                     budget: MemoryBudget | None = None) -> Iterator[list[PreparedFile]]:
    """Yield the files in order, `batch_size` at a time, decoded and prepared (by `workers` processes).

    Args:
        paths: image files.
        config: the segmenter's settings (resize and window grid).
        batch_size: files per batch (>= 1).
        workers: DataLoader worker processes; 0 prepares in this process.
        pin_memory: page-lock the windows (only useful when the model is on CUDA).
        max_pixels: refuse images above this many pixels before decoding them (see `load_image`).
        budget: refuse images whose segmentation would need more memory than its limit, from the header,
            before decoding them (a failed `PreparedFile` naming the file, as for an unreadable one).
    """
    import torch

    loader = torch.utils.data.DataLoader(_Files(paths, config, max_pixels, budget), batch_size=batch_size,
                                         shuffle=False, **loader_options(workers, pin_memory=pin_memory))
    yield from loader


class _Labels:
    """A numpy label map where `write_result_files` expects a tensor (it calls ``labels.numpy()``)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


class _Maps:
    """The attention maps where `write_result_files` expects features (it calls ``attention_maps()``)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def attention_maps(self) -> np.ndarray:
        return self.array


@dataclass
class ResultFiles:
    """One image's output files as plain numpy arrays: a picklable job for a writer process (no tensors, so the
    process needs no torch), calling `talk2dino.render.write_result_files` as `segment` always did.

    Build it with :meth:`from_result`; calling it writes the files (atomically) and returns their names by kind.
    """

    out_dir: Path
    stem: str
    image_path: Path
    rgb: np.ndarray | None  # [H, W, 3] uint8, for the overlay; None: no overlay
    labels: np.ndarray  # [H, W] class indices, uint8 up to 256 classes, else uint16
    class_names: list[str]
    background_index: int | None
    summary: dict[str, Any]
    alpha: float
    scores: np.ndarray | None = None  # [C, H, W] float32 (--save-scores)
    stitched: np.ndarray | None = None  # [C, H', W'] float32 at the processing size (--save-heatmaps)
    attention: np.ndarray | None = None  # [M, H', W'] float32 (--save-attention)

    @classmethod
    def from_result(cls, out_dir: Path, stem: str, image_path: Path, rgb: np.ndarray, result: Any,
                    summary: dict[str, Any], *, overlay: bool, alpha: float, save_scores: bool = False,
                    save_heatmaps: bool = False, features: Any = None) -> ResultFiles:
        """The job for `result` (a `SegmentationResult`, labels on the host); `features` (the image's
        `ImageFeatures`) only for the attention picture. The optional maps are computed here, on the caller's
        device and thread, exactly as `write_result_files` would compute them."""
        labels = result.labels.numpy()
        # The narrowest type `label_image` itself converts to: 8x fewer bytes to pickle than int64.
        narrow = np.uint8 if len(result.class_names) <= 256 else np.uint16
        maps = None
        if save_heatmaps:  # as write_result_files: the stitched maps, else the scores
            maps = _host_array(result.stitched if result.stitched is not None else result.scores)
        return cls(out_dir, stem, image_path, rgb if overlay else None, labels.astype(narrow, copy=False),
                   list(result.class_names), result.background_index, summary, alpha,
                   scores=_host_array(result.scores) if save_scores else None, stitched=maps,
                   attention=_host_array(features.attention_maps()) if features is not None else None)

    def __call__(self) -> dict[str, str]:
        from types import SimpleNamespace

        from talk2dino.render import write_result_files

        result = SimpleNamespace(labels=_Labels(self.labels), class_names=self.class_names, scores=self.scores,
                                 background_index=self.background_index, stitched=self.stitched)
        return write_result_files(
            self.out_dir, self.stem, self.image_path, self.rgb, result, self.summary, save_scores=self.scores
            is not None, overlay=self.rgb is not None, alpha=self.alpha, save_heatmaps=self.stitched is not None,
            features=None if self.attention is None else _Maps(self.attention),
            save_attention=self.attention is not None)


def _host_array(tensor: Any) -> np.ndarray:
    """A CPU numpy copy of a tensor (any device); a numpy array as is."""
    return tensor if isinstance(tensor, np.ndarray) else tensor.detach().cpu().numpy()


class BackgroundWriter:
    """Run write jobs on one thread or in `processes` writer processes, collected in order, at most
    `max_pending` ahead of the caller.

    The bound keeps memory flat: each pending job holds one image's results, and `submit` waits for the oldest
    job before it queues one more (`peak_pending` records the most ever pending). A job failing with an input
    error or an ``OSError`` (that file could not be written) is collected per job (named by its key) and the
    others go on; any other failure (a bug, or a writer process that died) is raised into the caller's loop (from
    `submit`, `finish_ready` or `close`), which stops the run.

    With `processes`, jobs must be picklable (a `ResultFiles`). The processes are spawned (a fork would copy the
    model's thread pools in a locked state) and ignore SIGINT: on Ctrl-C the main process stops, drops the jobs
    not started (`abort`) and waits for the running ones, so every file is either complete or not written and no
    temporary file is left behind.
    """

    def __init__(self, max_pending: int = 8, processes: int = 0) -> None:
        self._pool: Executor
        if processes > 0:
            import multiprocessing
            import signal

            self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talk2dino-writer")
        self._pending: deque[tuple[str, Future[object], Callable[[], None] | None]] = deque()
        self._max_pending = max(1, max_pending)
        self.processes = max(0, processes)
        self.peak_pending = 0
        self.failed: list[str] = []

    def submit(self, key: str, job: Callable[[], object], on_done: Callable[[], None] | None = None) -> None:
        """Queue `job` (named `key` in errors; its return value is ignored), first waiting for the oldest jobs
        while `max_pending` are pending; `on_done` runs on the caller's thread once it finished."""
        while len(self._pending) >= self._max_pending:
            self._finish_oldest()
        self._pending.append((key, self._pool.submit(job), on_done))
        self.peak_pending = max(self.peak_pending, len(self._pending))
    def _finish_oldest(self) -> None:
        key, future, on_done = self._pending.popleft()
        try:
            future.result()
        except Exception as err:
            if not (is_input_error(err) or isinstance(err, OSError)):
                raise  # not this file's fault: stop the run
            logger.error("%s: %s", key, err)
            self.failed.append(key)
        if on_done is not None:
            on_done()

    def finish_ready(self) -> None:
        """Collect the jobs that already finished (in order), without waiting."""
        while self._pending and self._pending[0][1].done():
            self._finish_oldest()

    def close(self) -> None:
        """Wait for every queued job, then stop the thread or processes."""
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the queued jobs that have not started, wait for the running ones, and stop the thread or
        processes; no error is raised or collected (the caller is already stopping on one)."""
        for _, future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
