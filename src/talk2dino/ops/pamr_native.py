"""PAMR on the CPU as a small C kernel compiled at first use (method.md §4.7).

The kernel (``pamr_native.c``, where its layouts and the wavefront sweep are described) computes the affinities
vectorised over pixels, then all propagation steps in one cache-resident sweep, reading every pixel's neighbours
at constant offsets in replicate-padded rows: no index tensor, no gather. It is plain C99 with no torch headers,
compiled by the machine's C compiler (``$CC``, else ``cc``, ``gcc``, ``clang``) in well under a second, cached
under ``<cache>/kernels/`` (``$TALK2DINO_CACHE``, else ``~/.cache/talk2dino``) by a hash of its source, the
compiler, the flags and the CPU, and called through ctypes, which releases the GIL: threads of a small pool
share the rows of the affinities, then the classes of the propagation.

``$TALK2DINO_PAMR_NATIVE`` chooses: unset or ``auto`` uses the kernel when it builds and falls back to the
torch path (``ops/pamr.py``) when there is no compiler or the build fails (logged once); ``0``/``off`` never
builds it; ``1``/``on`` requires it (an error names the reason).

Each value is the sum over the offsets, in their fixed order, of α · m, from zero, with separate multiply and add
(``-ffp-contract=off``), so results do not depend on the vector width, the number of threads or the machine. They
differ from the torch path's by float rounding (≤ 2e-6 measured: the kernel's ``exp`` and the torch softmax
round differently); tests compare both with ``pamr_reference``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from torch import Tensor

__all__ = ["ENV", "MAX_OFFSETS", "NativePamr", "Offsets", "native_pamr", "native_pamr_status", "run_parallel", "split"]

logger = logging.getLogger(__name__)

ENV = "TALK2DINO_PAMR_NATIVE"
MAX_OFFSETS = 1024  # neighbour offsets the kernel takes (its row-pointer tables); 8 per dilation
_ABI = 4  # t2d_pamr_abi() of the library this module drives
_BASE_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
_LIBS = ("-lm",)
# -march=native lets the compiler use the machine's widest SIMD; the CPU is part of the cache key, so a
# library built for one CPU is never loaded on another (a shared home directory across a cluster).
_NATIVE_FLAGS = ("-march=native",)
_BUILD_TIMEOUT_S = 120.0

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "kernel": NativePamr | None once looked up, "reason": why it is None
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


class NativePamr:
    """The loaded kernel library (``pamr_native.c``); layouts and arithmetic are described there."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.xblock = int(library.t2d_pamr_xblock())
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._affinities = library.t2d_pamr_affinities
        self._affinities.restype = integer
        self._affinities.argtypes = [pointer] * 4 + [integer] + [pointer] * 2 + [integer] * 6
        self._run = library.t2d_pamr
        self._run.restype = integer
        self._run.argtypes = [pointer] * 5 + [integer] * 8

    def padded_width(self, width: int) -> int:
        """The row length α must have: `width` rounded up to a multiple of the kernel's block."""
        return -(-width // self.xblock) * self.xblock

    def affinities(self, image: Tensor, alpha: Tensor, neighbours: Offsets, stencil: Offsets,
                   rows: tuple[int, int]) -> None:
        """Rows ``rows[0]:rows[1]`` of α (`[H, Wa / block, K, block]`, see the C source) from `image`
        `[3, H, W]` float32, contiguous."""
        _, height, width = image.shape
        status = self._affinities(image.data_ptr(), alpha.data_ptr(), ctypes.addressof(neighbours.dy),
                                  ctypes.addressof(neighbours.dx), neighbours.count, ctypes.addressof(stencil.dy),
                                  ctypes.addressof(stencil.dx), stencil.count, height, width, self.padded_width(width),
                                  rows[0], rows[1])
        if status == -2:
            raise MemoryError(f"native PAMR: no memory for the guide rows {rows}")
        if status != 0:
            raise RuntimeError(f"native PAMR affinities refused their arguments (rows {rows}, size {height}x{width})")

    def run(self, alpha: Tensor, masks: Tensor, out: Tensor, offsets: Offsets, iterations: int,
            channels: tuple[int, int]) -> None:
        """All steps for channels ``channels[0]:channels[1]`` of `masks` `[C, H, W]` into `out` (same shape)."""
        num_classes, height, width = masks.shape
        status = self._run(alpha.data_ptr(), masks.data_ptr(), out.data_ptr(), ctypes.addressof(offsets.dy),
                           ctypes.addressof(offsets.dx), offsets.count, num_classes, height, width,
                           self.padded_width(width), iterations, channels[0], channels[1])
        if status == -2:
            raise MemoryError(f"native PAMR: no memory for the scratch of channels {channels}")
        if status != 0:
            raise RuntimeError(f"native PAMR refused its arguments (channels {channels} of {num_classes}, "
                               f"{height}x{width}, {offsets.count} offsets)")


class Offsets:
    """The K (dy, dx) neighbour offsets as two C int arrays, in the affinities' order."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self.count = len(offsets)
        self.dy = (ctypes.c_int * self.count)(*[dy for dy, _ in offsets])
        self.dx = (ctypes.c_int * self.count)(*[dx for _, dx in offsets])


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's pool threads (and maybe a lock held by one of them): start anew."""
    global _LOCK, _POOL
    _LOCK, _POOL = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "require"):
        return "on"
    raise ValueError(f"${ENV} must be auto, 0/off or 1/on; got {value!r}")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (Linux), else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    wanted = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted)) or f"{platform.machine()} {platform.processor()}"


def _build(source: bytes, compiler: str, cache: Path) -> Path:
    """Compile `source` into a shared library under `cache` (reused when already there) and return its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=False).stdout
    flags = " ".join([*_BASE_FLAGS, *_NATIVE_FLAGS, *_LIBS]).encode()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), version, flags, _cpu_signature().encode(),
                                     str(_ABI).encode()])).hexdigest()[:16]
    target = cache / f"pamr-{key}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as folder:
        source_path = Path(folder) / "pamr_native.c"
        source_path.write_bytes(source)
        output = Path(folder) / "pamr.so"
        started = time.perf_counter()
        errors = ""
        # The machine's SIMD first; a compiler that does not know -march=native (some ARM and Apple builds)
        # gets the portable build.
        for extra in (_NATIVE_FLAGS, ()):
            result = subprocess.run([compiler, *_BASE_FLAGS, *extra, "-o", str(output), str(source_path), *_LIBS],
                                    capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
            if result.returncode == 0:
                break
            errors = result.stderr.strip()[-2000:]
        else:
            raise RuntimeError(f"{compiler} could not build the native PAMR kernel: {errors}")
        # Renamed into place only when complete, so a concurrent process never loads a half-written file.
        os.replace(output, target)
        logger.info("PAMR: built the native CPU kernel with %s in %.1f s (%s)", compiler,
                    time.perf_counter() - started, target)
    return target


def _load() -> NativePamr:
    from talk2dino.weights import cache_root  # a light module; imported here so that ops stays import-light

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    source = resources.files("talk2dino.ops").joinpath("pamr_native.c").read_bytes()
    try:
        path = _build(source, compiler, cache_root() / "kernels")
    except OSError as error:  # an unwritable cache: build in a folder of this process instead
        logger.debug("PAMR: kernel cache unusable (%s); building in a temporary folder", error)
        path = _build(source, compiler, Path(tempfile.mkdtemp(prefix="talk2dino-kernels-")))
    library = ctypes.CDLL(str(path))
    if library.t2d_pamr_abi() != _ABI:
        raise RuntimeError(f"{path} answers another interface version than {_ABI}")
    return NativePamr(library, path)


def native_pamr(*, require: bool = False) -> NativePamr | None:
    """The native kernel, built and loaded on first call (then cached for the process).

    Args:
        require: build it even when ``$TALK2DINO_PAMR_NATIVE`` is off, and raise instead of returning None.

    Returns:
        The kernel; None when ``$TALK2DINO_PAMR_NATIVE`` is off or, in auto mode, when it cannot be built (the
        reason is logged once at INFO and kept for :func:`native_pamr_status`).

    Raises:
        RuntimeError: the kernel cannot be built or loaded and ``require`` or ``$TALK2DINO_PAMR_NATIVE=1``.
        ValueError: ``$TALK2DINO_PAMR_NATIVE`` holds another value.
    """
    mode = "on" if require else _mode()
    if mode == "off":
        return None
    with _LOCK:
        if "kernel" not in _STATE:
            try:
                _STATE["kernel"] = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
                _STATE["kernel"], _STATE["reason"] = None, str(error)
                logger.info("PAMR: the native CPU kernel is unavailable (%s); using the torch path", error)
        kernel = _STATE["kernel"]
    if kernel is None and mode == "on":
        raise RuntimeError(f"the native PAMR kernel is unavailable: {_STATE.get('reason')}")
    assert kernel is None or isinstance(kernel, NativePamr)
    return kernel


def native_pamr_status() -> str:
    """One line for logs and benchmarks: which CPU PAMR path runs, and why."""
    try:
        kernel = native_pamr()
    except (RuntimeError, ValueError) as error:
        return f"torch ({error})"
    if kernel is None:
        return "torch (native kernel off)" if _mode() == "off" else f"torch ({_STATE.get('reason')})"
    return f"native ({kernel.path.name})"


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                          thread_name_prefix="t2d-pamr")
        return _POOL


def run_parallel(calls: Sequence[Callable[[], None]], workers: int) -> None:
    """Run the calls on the kernel's thread pool (ctypes releases the GIL), at most `workers` at a time, and wait.

    Each of the `workers` threads takes the next call when it finishes one, so more calls than workers balance
    the load when a core is shared (torch's OpenMP workers keep spinning for a few ms after each torch op).
    A single call, or a single worker, runs inline. The first error is raised once all calls have stopped.
    """
    workers = max(1, min(workers, len(calls)))
    if workers == 1:
        for call in calls:
            call()
        return
    pending = collections.deque(calls)

    def drain() -> None:
        while True:
            try:
                call = pending.popleft()  # atomic: each call is taken by exactly one thread
            except IndexError:
                return
            call()

    futures = [_pool().submit(drain) for _ in range(workers)]
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """`count` items as up to `parts` contiguous, non-empty, nearly equal ranges."""
    parts = max(1, min(parts, count))
    bounds = [count * part // parts for part in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
