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

import hashlib
import json
import logging
import os
import re
import stat
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

__all__ = ["BackgroundWriter", "MemoryBudget", "PreparedFile", "check_output_folder", "default_image_memory",
           "default_workers", "format_bytes", "max_stem_bytes", "output_names", "parse_byte_size", "plan_stems",
           "prepared_batches", "refuse_overwrites", "remove_stale_temps", "talk2dino_outputs"]

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


# --- Memory (issue 14): an image is refused from its header when segmenting it would need too much memory. ---
#
# Bytes per pixel of the original image, per stage of `segment`, derived from the code and checked against the
# peak RSS of the CLI (tiny test model, CPU, a 4000x3000 greyscale PNG, K = 2 to 50 channels, with and without
# --no-overlay and --save-scores): the estimate is within 10% of the measured growth (the model excluded).
_DECODE_BYTES = 18  # decoding an 8-bit file to RGB: the PIL image, its RGB conversion, the array (L 12, RGBA 18)
_DECODE_BYTES_WIDE = 34  # 16-bit, 32-bit and float modes go through int64/float64 arrays (I;16 26, I 29, F 33)
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_RGB_BYTES = 3  # the decoded image, kept until its overlay is written
_LABEL_BYTES = 8  # the int64 label map, kept until the files are written
_SCORE_BYTES = 4  # float32 [K, H, W] scores at the original size (the final resize, then the argmax), per channel
_WRITE_BYTES = 15  # label PNG (uint8 copy, PIL image) and overlay (its result, PIL's RGBX copy)
_SAVED_SCORE_BYTES = 6  # --save-scores: the float32 scores again, and their float16 copy, per channel
_SAVE_SCORES_BYTES = 8  # --save-scores: the zip writer's buffers
_PAMR_BLOCKS = 2.6  # PAMR's temporaries, in [K, wh, ww] float32 window blocks (measured)
_ARGMAX_ROWS = 64  # rows per chunk of `ops.sliding.softmax_argmax`, whose masks are [K, 64, W]
_LEGEND_BYTES = 64 * 1024  # one legend row (20 px high, up to ~430 px wide, RGB and PIL's copy)
_HEATMAP_BYTES = 512 * 1024  # one heat-map tile (256 px, RGB, the grid and PIL's copy)

_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
FALLBACK_IMAGE_MEMORY = 8 << 30
"""`default_image_memory` where the machine's memory cannot be read: 8 GiB."""


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


def format_bytes(size: float) -> str:
    """``4.4 GiB`` (binary units, one decimal above KiB)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def _machine_memory() -> int | None:
    """The memory this process may use: physical RAM, or the container's cgroup limit when lower."""
    total: int | None = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            total = int(text) if total is None else min(total, int(text))
    return total if total and total > 0 else None


def default_image_memory() -> int:
    """``--max-image-memory``'s default: half the memory of the machine (or of its container), else 8 GiB.

    Half, because what the limit prevents (the kernel killing the whole run, or swapping for hours) depends on
    this machine's memory, and the model itself, the other images in flight and the system need the rest. A
    fixed size would be too generous on small machines, which are the ones at risk, and needlessly strict on
    big ones.
    """
    total = _machine_memory()
    return total // 2 if total else FALLBACK_IMAGE_MEMORY


@dataclass(frozen=True)
class MemoryBudget:
    """The memory limit for segmenting one image, checked from the file's header (`load_image`'s
    ``check_header``) before its pixels are decoded.

    `need` estimates the peak memory one image adds to the process (beyond the model) from its size, the number
    of score channels and the outputs asked for; see the byte counts above. An image above `limit` is refused
    with one line naming its size, the estimate and the flag to raise. Images in flight together (a batch,
    the ones being written) add up; the limit is per image.
    """

    limit: int  # bytes one image may need (--max-image-memory)
    channels: int  # score channels: the labels, plus the background channel
    config: InferenceConfig  # short side, long-side cap, window and PAMR of the run
    overlay: bool = True  # writing the overlay
    save_scores: bool = False  # writing --save-scores
    save_heatmaps: bool = False  # writing --save-heatmaps
    flag: str = "--max-image-memory"  # named in the refusal

    def need(self, width: int, height: int, mode: str = "RGB") -> int:
        """Estimated peak bytes for segmenting a `width` x `height` image of PIL `mode`."""
        from talk2dino.ops.sliding import resized_size

        k, pixels = self.channels, width * height
        per_pixel = max(
            _DECODE_BYTES_WIDE if mode in _WIDE_MODES else _DECODE_BYTES,
            _LABEL_BYTES + _SCORE_BYTES * k,
            _LABEL_BYTES + (_WRITE_BYTES if self.overlay else 0),
            (_LABEL_BYTES + _SAVED_SCORE_BYTES * k + _SAVE_SCORES_BYTES) if self.save_scores else 0,
        )
        rh, rw = resized_size(height, width, short_side=self.config.short_side,
                              max_long_side=self.config.max_long_side)
        window = min(rh, self.config.window) * min(rw, self.config.window)
        # At the processing size: the stitched canvas, one window's blocks (with PAMR's temporaries), and the
        # argmax's masks over a band of rows of the original width.
        processing = _SCORE_BYTES * k * (rh * rw + window * (1 + (_PAMR_BLOCKS if self.config.pamr else 0)))
        processing += 2 * k * _ARGMAX_ROWS * max(width, height)
        pictures = k * (_LEGEND_BYTES + (_HEATMAP_BYTES if self.save_heatmaps else 0))
        return int(pixels * (_RGB_BYTES + per_pixel) + processing + pictures)

    def __call__(self, width: int, height: int, mode: str = "RGB") -> None:
        """Refuse (one line, prefixed with the file name by `load_image`) an image that needs over `limit`."""
        need = self.need(width, height, mode)
        if need > self.limit:
            raise InvalidInputError(
                f"image is {width}x{height} ({width * height:,} pixels) and needs about {format_bytes(need)} to "
                f"segment with {self.channels} score channel(s), above {self.flag} {format_bytes(self.limit)}; "
                f"raise {self.flag} if the machine has the memory, or downscale the image")

    def check_labels(self) -> None:
        """Refuse before the model loads when even a square image at the processing size (`short_side` pixels a
        side; nearly every image is at least that large when processed) would need over `limit`: too many
        labels for the limit.

        Raises:
            InvalidInputError: naming the label count, the estimate and the flag.
        """
        side = self.config.short_side
        need = self.need(side, side)
        if need > self.limit:
            raise InvalidInputError(
                f"{self.channels:,} score channels need about {format_bytes(need)} even for a {side}x{side} image, "
                f"above {self.flag} {format_bytes(self.limit)}; use fewer labels or raise {self.flag}")


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
    loader = torch.utils.data.DataLoader(
        _Files(paths, config, max_pixels, budget), batch_size=batch_size, shuffle=False, num_workers=workers,
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
        handle, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=out_dir)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise InvalidInputError(f"--out {shown}: folder is not writable ({one_line(err.strerror or err)})") from err


_HASH_CHARS = 8  # hex digits of sha256 that `fit_stem` appends to a shortened stem


def max_stem_bytes(out_dir: Path) -> int:
    """The longest output stem, in bytes, whose every output name fits the file-name limit of `out_dir`'s file
    system (`talk2dino.fileio.name_max`, 255 bytes on common ones): the limit less the longest suffix any
    option adds (``_attention.png``), so that a stem does not depend on the options of the run."""
    from talk2dino.fileio import NAME_MAX_DEFAULT, name_bytes, name_max

    suffixes = output_names("", overlay=True, save_scores=True, save_heatmaps=True, save_attention=True)
    return min(name_max(out_dir), NAME_MAX_DEFAULT) - max(name_bytes(suffix) for suffix in suffixes)


def fit_stem(stem: str, limit: int) -> str:
    """`stem` if it is at most `limit` bytes (UTF-8, as file names count), else its longest prefix that leaves
    room for ``~`` and 8 hex digits of its sha256, cut at a character boundary: deterministic, and distinct
    stems stay distinct (but for a 32-bit hash collision, which `plan_stems` then numbers)."""
    from talk2dino.fileio import name_bytes

    if name_bytes(stem) <= limit:
        return stem
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:_HASH_CHARS]
    room = limit - 1 - _HASH_CHARS
    prefix = stem
    while prefix and name_bytes(prefix) > room:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def plan_stems(paths: Sequence[Path], *, stem_bytes: int | None = None) -> dict[Path, str]:
    """Each input's output stem, decided once before the run: ``x``, else ``x_1``, ``x_2``, ... .

    A renamed output is logged as one warning naming both inputs, so ``a/x.jpg b/x.jpg`` do not silently
    become ``x.*`` and ``x_1.*``. `paths` hold no repeats (`list_images` drops them).

    With `stem_bytes` (see `max_stem_bytes`), a stem whose output names would be too long for the file system
    (a 250-byte image name; 83 CJK characters are 249 bytes in UTF-8) is shortened by `fit_stem`, with one
    warning naming the input: its JSON's ``image`` still names the input in full.
    """
    taken: dict[str, Path] = {}
    stems: dict[Path, str] = {}

    def fitted(stem: str) -> str:
        return stem if stem_bytes is None else fit_stem(stem, stem_bytes)

    for path in paths:
        first = fitted(path.stem)
        stem, n = first, 1
        while stem in taken:
            stem = fitted(f"{path.stem}_{n}")
            n += 1
        if stem != first:
            logger.warning("%s is written as %s.* because %s already took %s.*", path, stem, taken[first], first)
        elif stem != path.stem:
            logger.warning("%s is written as %s.*: its name is too long for output file names (%d bytes at most "
                           "before the suffix); its JSON names the image", path, stem, stem_bytes)
        taken[stem] = path
        stems[path] = stem
    return stems


_PROBE_PREFIX = ".talk2dino-write-test-"  # `check_output_folder`'s write probe


def remove_stale_temps(out_dir: Path, *, before: float, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete the temp files an interrupted ``segment`` left in `out_dir`; returns their names.

    A run killed hard (SIGKILL, the OOM killer, power loss) leaves its `talk2dino.fileio.atomic_path` temp
    files behind (the rename never came). Removed are only regular files in `out_dir` itself (no recursion,
    no links), last modified before `before` (the start of this run: a temp file of a run started after this
    one is left alone), named exactly as talk2dino names its temp files: ``.<output name>.<12 hex>.tmp<ext>``
    for one of segment's output names, the stem-free ``.t2d-<12 hex>.tmp<ext>``, or the write probe of
    `check_output_folder`; and never a name in `keep` (the outputs talk2dino's JSONs list: an image named
    ``.a.0123456789ab.tmp.png`` has outputs that look like temp files).
    """
    from talk2dino.fileio import is_temp_name, temp_target

    kinds = tuple(output_names("", overlay=True, save_scores=True, save_heatmaps=True, save_attention=True))
    removed: list[str] = []
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or name in keep:
            continue
        target = temp_target(name)
        if target is not None:
            ours = target.endswith(kinds)
        else:
            ours = is_temp_name(name) or name.startswith(_PROBE_PREFIX)
        if not ours:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before:
                continue
            os.unlink(entry.path)
        except OSError as err:  # gone meanwhile, or not ours to delete: leave it, say so
            logger.debug("%s: cannot remove %s (%s)", out_dir, name, err)
            continue
        removed.append(name)
    return removed


def output_names(stem: str, *, overlay: bool, save_scores: bool, save_heatmaps: bool,
                 save_attention: bool) -> list[str]:
    """The file names `talk2dino.outputs.write_result_files` writes for `stem` with these options, its JSON last."""
    from talk2dino.outputs import result_file_names

    names = result_file_names(stem, overlay=overlay, save_scores=save_scores, save_heatmaps=save_heatmaps,
                              save_attention=save_attention)
    return [*names.values(), f"{stem}.json"]


def _read_summary(path: Path) -> dict[str, object] | None:
    """`path` as a talk2dino summary JSON (a dict with ``image`` and a ``files`` dict of names), else None.

    A FIFO, socket, device or folder named ``*.json`` in --out is no summary: it is refused without being read
    (reading a FIFO would block the run forever, before it started)."""
    from talk2dino.fileio import open_regular

    limit = 64 * 1024 * 1024
    try:
        with open_regular(path, "summary") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            return None
        summary = json.loads(data)
    except (OSError, ValueError, RecursionError):  # InvalidInputError (not a regular file) is a ValueError
        return None
    if isinstance(summary, dict) and "image" in summary and isinstance(summary.get("files"), dict):
        return summary
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
    # A folder in the way is never replaced (the rename would fail for that image only, after its computation).
    folders = [name for name in targets if (out_dir / name).is_dir() and not (out_dir / name).is_symlink()]
    if folders:
        raise InvalidInputError(f"--out {shown}: {listing(folders)} would be written where a folder is; talk2dino "
                                "never replaces a folder: move it, or choose another --out")
    existing = [name for name in targets if os.path.lexists(out_dir / name) and name not in ours]
    if existing and not overwrite:
        raise InvalidInputError(f"--out {shown}: would write over {len(existing)} file(s) talk2dino did not write: "
                                f"{listing(existing)}; choose another --out, or pass --overwrite to replace them")
