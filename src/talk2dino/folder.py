"""Segmenting many files: host work overlapped with the backbone (issue 6, target 4).

`talk2dino segment` over a folder spends time on three kinds of work: decoding and resizing images (host
CPU), the backbone and post-processing (the device), and encoding and writing PNG/JSON files (host CPU).
This module keeps them apart so that they can overlap:

- :func:`prepared_batches` decodes and prepares images (:func:`talk2dino.predictor.prepare_image`) in
  DataLoader worker processes, a few batches ahead, with page-locked windows when the model is on CUDA,
  so the copy to the device is asynchronous. With ``workers=0`` the same code runs in-process (the
  default on a CPU, where the backbone already uses every core).
- :class:`BackgroundWriter` writes each image's files on one thread while the next batch runs.

A file that cannot be read (an :class:`~talk2dino.errors.InvalidInputError`) never stops the others: it comes
back as a `PreparedFile` with an `error`. Any other failure while preparing a file is not that file's fault (a
bug, a library version) and propagates, so the run stops at the first one (issue 12).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from talk2dino.config import InferenceConfig
from talk2dino.data.images import load_image
from talk2dino.errors import InvalidInputError, is_input_error
from talk2dino.predictor import PreparedImage, prepare_image

logger = logging.getLogger(__name__)

__all__ = ["BackgroundWriter", "PreparedFile", "check_output_folder", "default_workers", "output_names",
           "plan_stems", "prepared_batches", "refuse_overwrites", "talk2dino_outputs"]

_MAX_AUTO_WORKERS = 8


@dataclass
class PreparedFile:
    """One input file after decoding: its windows, or the one-line reason it could not be read."""

    path: Path
    image: PreparedImage | None
    error: str | None = None

    def pin_memory(self) -> PreparedFile:
        """Page-lock the windows (DataLoader ``pin_memory`` calls this on each item)."""
        return self if self.image is None else PreparedFile(self.path, self.image.pin_memory(), self.error)


class _Files(torch.utils.data.Dataset[PreparedFile]):
    """Paths -> `PreparedFile` (decode, convert, resize, cut windows), in a worker or in-process."""

    def __init__(self, paths: Sequence[Path], config: InferenceConfig, max_pixels: int | None) -> None:
        self.paths = list(paths)
        self.config = config
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> PreparedFile:
        path = self.paths[index]
        try:
            return PreparedFile(path, prepare_image(load_image(path, max_pixels=self.max_pixels), self.config))
        except InvalidInputError as err:  # the loaders wrap decoder errors in it; anything else stops the run
            return PreparedFile(path, None, str(err))


def _keep_items(batch: list[PreparedFile]) -> list[PreparedFile]:
    """DataLoader collate function: the batch as a list (windows differ in number per image)."""
    return batch


def _worker_init(_: int) -> None:
    # One thread per worker process: the parallelism is across workers, and OpenCV's own pool in every
    # worker would oversubscribe the cores the main process needs.
    import cv2

    cv2.setNumThreads(1)


def default_workers(device: torch.device) -> int:
    """Decoding processes for `device`: none on a CPU (the backbone uses every core), else up to 8."""
    if device.type == "cpu":
        return 0
    return max(1, min(_MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))


def prepared_batches(paths: Sequence[Path], config: InferenceConfig, *, batch_size: int, workers: int,
                     pin_memory: bool = False, max_pixels: int | None = None) -> Iterator[list[PreparedFile]]:
    """Yield the files in order, `batch_size` at a time, decoded and prepared (by `workers` processes).

    Args:
        paths: image files.
        config: the segmenter's settings (resize and window grid).
        batch_size: files per batch (>= 1).
        workers: DataLoader worker processes; 0 prepares in this process.
        pin_memory: page-lock the windows (only useful when the model is on CUDA).
        max_pixels: refuse images above this many pixels before decoding them (see `load_image`).
    """
    loader = torch.utils.data.DataLoader(
        _Files(paths, config, max_pixels), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_keep_items, pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False,
        # spawn, not fork: a child forked after the model ran inherits OpenCV's and OpenMP's thread pools
        # in a locked state and hangs in its first resize (seen here). Spawning costs ~3 s per run.
        multiprocessing_context="spawn" if workers else None,
    )
    yield from loader


class BackgroundWriter:
    """Run write jobs on one thread, in order, at most `max_pending` ahead of the caller.

    The bound keeps memory flat: each pending job holds one image's results. A job failing with an input error
    or an ``OSError`` (that file could not be written) is collected per job (named by its key) and the others
    go on; any other failure is a bug and is raised into the caller's loop (from `submit`, `finish_ready` or
    `close`), which stops the run.
    """

    def __init__(self, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talk2dino-writer")
        self._pending: deque[tuple[str, Future[object], Callable[[], None] | None]] = deque()
        self._max_pending = max(1, max_pending)
        self.failed: list[str] = []

    def submit(self, key: str, job: Callable[[], object], on_done: Callable[[], None] | None = None) -> None:
        """Queue `job` (named `key` in errors; its return value is ignored); `on_done` runs on the caller's thread
        once it finished."""
        self._pending.append((key, self._pool.submit(job), on_done))
        while len(self._pending) > self._max_pending:
            self._finish_oldest()

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
        """Wait for every queued job, then stop the thread."""
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the queued jobs that have not started, wait for the running one, and stop the thread; no error
        is raised or collected (the caller is already stopping on one)."""
        for _, future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- The output folder (issue 14): checked before the model loads, and never written over by surprise. ---


def check_output_folder(out_dir: Path) -> None:
    """Make sure `out_dir` exists (created with its parents if missing), is a folder and is writable.

    Writability is tried, not guessed: a temporary file is created in it and removed.

    Raises:
        InvalidInputError: one line naming the folder and the reason.
    """
    from talk2dino.errors import one_line

    shown = one_line(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {shown}: is a file, not a folder; give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # a parent is a file, or the folder became a file
        raise InvalidInputError(f"--out {shown}: cannot create the folder: {one_line(err.filename or err)} is a "
                                "file") from err
    except OSError as err:
        raise InvalidInputError(f"--out {shown}: cannot create the folder ({one_line(err.strerror or err)})") from err
    try:
        handle, probe = tempfile.mkstemp(prefix=".talk2dino-write-test-", dir=out_dir)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise InvalidInputError(f"--out {shown}: folder is not writable ({one_line(err.strerror or err)})") from err


def plan_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Each input's output stem, decided once before the run: ``x``, else ``x_1``, ``x_2``, ... .

    A renamed output is logged as one warning naming both inputs, so ``a/x.jpg b/x.jpg`` do not silently
    become ``x.*`` and ``x_1.*``. `paths` hold no repeats (`list_images` drops them).
    """
    taken: dict[str, Path] = {}
    stems: dict[Path, str] = {}
    for path in paths:
        stem, n = path.stem, 1
        while stem in taken:
            stem = f"{path.stem}_{n}"
            n += 1
        if stem != path.stem:
            logger.warning("%s is written as %s.* because %s already took %s.*", path, stem, taken[path.stem],
                           path.stem)
        taken[stem] = path
        stems[path] = stem
    return stems


def output_names(stem: str, *, overlay: bool, save_scores: bool, save_heatmaps: bool,
                 save_attention: bool) -> list[str]:
    """The file names `talk2dino.outputs.write_result_files` writes for `stem` with these options, its JSON last."""
    from talk2dino.outputs import result_file_names

    names = result_file_names(stem, overlay=overlay, save_scores=save_scores, save_heatmaps=save_heatmaps,
                              save_attention=save_attention)
    return [*names.values(), f"{stem}.json"]


def _read_summary(path: Path) -> dict[str, object] | None:
    """`path` as a talk2dino summary JSON (a dict with ``image`` and a ``files`` dict of names), else None."""
    try:
        if path.stat().st_size > 64 * 1024 * 1024:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "image" in data and isinstance(data.get("files"), dict):
        return data
    return None


def talk2dino_outputs(out_dir: Path) -> set[str]:
    """Names of the files in `out_dir` that talk2dino wrote there: every ``<stem>.json`` that is a talk2dino
    summary, and the files its ``files`` lists."""
    names: set[str] = set()
    try:
        candidates = [p for p in out_dir.iterdir() if p.suffix == ".json"]
    except OSError:
        return names
    for path in candidates:
        summary = _read_summary(path)
        if summary is None:
            continue
        names.add(path.name)
        files = summary["files"]
        assert isinstance(files, dict)
        names.update(v for v in files.values() if isinstance(v, str) and "/" not in v and "\\" not in v)
    return names


def refuse_overwrites(out_dir: Path, targets: Sequence[str], inputs: Sequence[Path], *, overwrite: bool,
                      ours: set[str]) -> None:
    """Refuse (one line) to write over a file of `out_dir` that this run did not create.

    An input image is never written over, even with `overwrite`. Another existing target is refused unless it
    is one of `ours` (talk2dino's earlier outputs, see `talk2dino_outputs`) or `overwrite` is given.

    Raises:
        InvalidInputError: naming the folder and (up to 5 of) the files.
    """
    from talk2dino.errors import one_line

    def listing(names: list[str]) -> str:
        return ", ".join(one_line(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    shown = one_line(out_dir)
    folder = out_dir.resolve()
    input_names = {p.name for p in inputs if p.resolve().parent == folder}
    clash = [name for name in targets if name in input_names]
    if clash:
        raise InvalidInputError(f"--out {shown}: would write over input image(s) {listing(clash)}; choose another "
                                "--out")
    existing = [name for name in targets if os.path.lexists(out_dir / name) and name not in ours]
    if existing and not overwrite:
        raise InvalidInputError(f"--out {shown}: would write over {len(existing)} file(s) talk2dino did not write: "
                                f"{listing(existing)}; choose another --out, or pass --overwrite to replace them")
