"""PAMR: pixel-adaptive mask refinement with dilated local affinities (method.md §4.7).

Two implementations of the same formula:

- :func:`pamr`, the fast path: affinities are computed once per window, pixel-major, and each
  propagation step is one fused weighted gather (``F.embedding_bag`` over a cached neighbour index), so
  every step streams the weights once instead of making 48 passes over the masks.
- :func:`pamr_reference`, a deliberately plain path that materialises every neighbour shift; it is the
  independent check for tests and benchmarks.

On CUDA tensors :func:`pamr` hands the work to fused Triton kernels (``ops/pamr_triton.py``, imported on
first use) when triton can be imported; on CPU tensors to the native C kernel (``ops/pamr_native.py``, built at
first use) when a C compiler can build it. The torch formulation here is the fallback of both, and what runs
when a gradient is needed.

Neighbour offsets are enumerated in one fixed order in both: dilations in the given order, and within a
dilation row-major over (dy, dx) ∈ {−d, 0, d}², skipping (0, 0) for the propagation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from talk2dino.ops.pamr_native import MAX_OFFSETS, NativePamr, Offsets, native_pamr, run_parallel, split

# Constants of the affinity formula κ = −|I(x) − I(x+δ)| / (STD_EPS + STD_SCALE · σ(x)); method.md §4.7.
STD_EPS = 1e-8
STD_SCALE = 0.1

# Neighbour indices per (height, width, dilations, device); one entry is 4·K bytes per pixel (38 MB for a
# 448×448 window with the 48 default neighbours).
_INDEX_CACHE: OrderedDict[tuple[int, int, tuple[int, ...], str], Tensor] = OrderedDict()
_INDEX_CACHE_SIZE = 2
# Per-thread scratch for the affinities: one float32 buffer of K·H·W values (38 MB for a 448×448 window),
# grown as needed and reused. A fresh buffer that large is mapped anew by the allocator on every call, and
# touching its pages costs about a third of the affinity arithmetic.
_SCRATCH = threading.local()
_AFFINITY_ROWS = 112  # rows per band of the κ planes (a few MB, reused by the allocator)
# The affinities are ~1,200 small element-wise ops per window (54 + 162 for the spread, 5 per offset and band
# for κ), each 0.15–0.6 M values: with the OpenMP backend every one is a parallel region ending in a
# barrier. On a busy machine a descheduled worker thread stalls each barrier for a scheduler time slice,
# which made PAMR ~35× slower with 2 threads than with 1 while another process ran (issue 13). Windows up
# to this many pixels run those element-wise ops on the calling thread alone (immune to contention); the
# 4 softmaxes (whose chunking across threads decides the last bits of exp) and the 10 propagation steps,
# few and large, keep torch's thread count. benchmarks/bench_pamr_contention.py measures both.
_SERIAL_AFFINITY_PIXELS = 1024 * 1024

__all__ = ["STD_EPS", "STD_SCALE", "fused_pamr_available", "pamr", "pamr_reference"]

logger = logging.getLogger(__name__)


def _stencil_offsets(dilations: Sequence[int], *, include_centre: bool) -> list[tuple[int, int]]:
    """List the (dy, dx) offsets of the dilated 3×3 stencils in PAMR's fixed order.

    See method.md §4.7 ("Neighbourhood", "Local spread").

    Args:
        dilations: positive dilations d, in the order they are used.
        include_centre: whether each dilation's stencil keeps (0, 0) (the local spread uses the full
            9-value stencil; the affinities and the propagation use the 8 neighbours).

    Returns:
        ``9·len(dilations)`` or ``8·len(dilations)`` offsets: dilations in the given order, and within a
        dilation row-major over (dy, dx) ∈ {−d, 0, d}².
    """
    offsets: list[tuple[int, int]] = []
    for dilation in dilations:
        for dy in (-dilation, 0, dilation):
            for dx in (-dilation, 0, dilation):
                if include_centre or dy != 0 or dx != 0:
                    offsets.append((dy, dx))
    return offsets


def _check_inputs(image: Tensor, masks: Tensor, iterations: int, dilations: Sequence[int]) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W] RGB; got shape {tuple(image.shape)}")
    if masks.dim() != 4:
        raise ValueError(f"masks must be [B, C, H, W]; got shape {tuple(masks.shape)}")
    if masks.shape[0] != image.shape[0] or masks.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and masks {tuple(masks.shape)} must share B, H and W; "
            "upsample the masks to the window size first"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    if len(dilations) == 0 or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers; got {tuple(dilations)}")


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> Tensor:
    """View of ``x(y + dy, x + dx)`` for every pixel, from a replicate-padded tensor of width ``pad``.

    Replicate padding of width ``pad`` ≥ max(|dy|, |dx|) clamps indices to the border exactly as
    replicate padding of width d does, so one padded tensor serves every dilation.
    """
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _scratch(count: int, device: torch.device) -> Tensor:
    """A float32 scratch buffer of `count` values, private to this thread and reused across calls."""
    buffer: Tensor | None = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.device != device or buffer.numel() < count:
        # A normal tensor even when first made under inference_mode, so that later calls outside it may
        # still write into it.
        with torch.inference_mode(False):
            buffer = torch.empty(count, dtype=torch.float32, device=device)
        _SCRATCH.buffer = buffer
    return buffer[:count]


@contextlib.contextmanager
def _serial_cpu(device: torch.device, pixels: int) -> Iterator[None]:
    """Run the block with one intra-op thread when on CPU and ``pixels`` ≤ ``_SERIAL_AFFINITY_PIXELS``.

    ``torch.set_num_threads`` sets the OpenMP (and MKL) thread count of the *calling* thread with the
    OpenMP backend (``omp_set_num_threads`` writes this thread's ICV; ATen's parallel regions read it with
    ``omp_get_max_threads``), so a server's other threads keep their own count; the previous value is
    restored on exit, exceptions included. It also stores ATen's default for threads started meanwhile
    (interop/autograd threads, none on this path), which the restore resets.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1 or pixels > _SERIAL_AFFINITY_PIXELS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _softmax_(logits: Tensor, dim: int) -> Tensor:
    """``torch.softmax(logits, dim)`` written over `logits` (contiguous). The CPU kernels normalise one
    softmax slice at a time, reading each input value before writing its output, so in place is safe
    there (a test checks equality with ``torch.softmax``); other devices go through a temporary."""
    softmax_out = getattr(torch.ops.aten._softmax, "out", None)
    if softmax_out is None or logits.device.type != "cpu":
        return logits.copy_(torch.softmax(logits, dim=dim))
    return softmax_out(logits, dim, False, out=logits)


def _pixel_affinities(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """α(x, δ) of method.md §4.7 for one image, pixel-major: `[H·W, K]` float32, softmax over the K offsets.

    Args:
        image: `[1, 3, H, W]` float32 guide.

    Returns:
        Row p holds pixel p's K = 8·len(dilations) weights in the fixed offset order: the layout the
        propagation's weighted gather reads (one contiguous row per pixel). The tensor lives in this
        thread's scratch buffer and is overwritten by the next call.
    """
    height, width = image.shape[-2:]
    pad = max(dilations)
    with _serial_cpu(image.device, height * width):
        padded = F.pad(image, [pad] * 4, mode="replicate")
        denominator = _spread_denominator(image, padded, pad, dilations)
    neighbours = _stencil_offsets(dilations, include_centre=False)
    weights = _scratch(len(neighbours) * height * width, image.device).view(height * width, len(neighbours))
    for top in range(0, height, _AFFINITY_ROWS):
        bottom = min(top + _AFFINITY_ROWS, height)
        with _serial_cpu(image.device, height * width):
            logits = _band_logits(image, padded, denominator, pad, neighbours, top, bottom)
        # The softmax keeps the caller's thread count: its vectorised exp covers each thread's chunk, so
        # the chunking (and the last bits of a few values) depends on the number of threads.
        weights[top * width : bottom * width].copy_(_softmax_(logits, dim=0).t())
    return weights


def _spread_denominator(image: Tensor, padded: Tensor, pad: int, dilations: Sequence[int]) -> Tensor:
    """``STD_EPS + STD_SCALE · σ_k(x)``, `[1, 3, H, W]`, from the replicate-padded guide."""
    height, width = image.shape[-2:]
    # Sample standard deviation (n − 1) over the full stencils, centre included, in two passes
    # (mean, then squared deviations) to keep float32 accuracy on 0–255 values.
    stencil = _stencil_offsets(dilations, include_centre=True)
    total = torch.zeros_like(image)
    for dy, dx in stencil:
        total.add_(_shifted(padded, pad, dy, dx, height, width))
    mean = total.div_(len(stencil))
    squares = torch.zeros_like(image)
    deviation = torch.empty_like(image)
    for dy, dx in stencil:
        squares.add_(torch.sub(_shifted(padded, pad, dy, dx, height, width), mean, out=deviation).square_())
    return squares.div_(len(stencil) - 1).sqrt_().mul_(STD_SCALE).add_(STD_EPS)  # [1, 3, H, W]


def _band_logits(image: Tensor, padded: Tensor, denominator: Tensor, pad: int,
                 neighbours: Sequence[tuple[int, int]], top: int, bottom: int) -> Tensor:
    """κ(x, δ) of rows ``top:bottom``: `[K, rows·W]`, one contiguous plane per offset."""
    width = image.shape[-1]
    # κ(x, δ) = mean over k of −|I_k(x) − I_k(x + δ)| / denominator_k(x) and α = its softmax over δ, per
    # band of rows: one contiguous plane per offset (the channel sum in the order R, G, B, divided by −3:
    # the arithmetic of `mean`), the softmax over the offset axis (the kernel and arithmetic of a softmax
    # over dim 1 of `[1, K, H, W]`), then transposed into pixel-major rows.
    centre, scale = image[..., top:bottom, :], denominator[..., top:bottom, :]
    kappa = torch.empty((len(neighbours), bottom - top, width), dtype=image.dtype, device=image.device)
    difference = torch.empty_like(centre)
    for index, (dy, dx) in enumerate(neighbours):
        shifted = padded[..., pad + dy + top : pad + dy + bottom, pad + dx : pad + dx + width]
        torch.sub(centre, shifted, out=difference).abs_().div_(scale)
        torch.add(difference[0, 0], difference[0, 1], out=kappa[index]).add_(difference[0, 2])
    return kappa.view(len(neighbours), -1).div_(-3.0)


@functools.cache
def _fused_kernel() -> Callable[..., Tensor] | None:
    """``pamr_triton`` from ``ops/pamr_triton.py``, or None when triton cannot be imported (looked up once).

    Imported on first use so that importing talk2dino (and every CPU run) never imports triton.
    """
    try:
        module = importlib.import_module("talk2dino.ops.pamr_triton")
    except ImportError as error:
        logger.debug("PAMR: triton unavailable (%s); CUDA tensors take the torch path", error)
        return None
    kernel: Callable[..., Tensor] = module.pamr_triton
    return kernel


def fused_pamr_available() -> bool:
    """Whether :func:`pamr` can use the fused Triton kernels (triton importable); they serve CUDA tensors."""
    return _fused_kernel() is not None


def pamr(image: Tensor, masks: Tensor, *, iterations: int, dilations: Sequence[int],
         fused: bool | None = None, native: bool | None = None) -> Tensor:
    """Refine score maps by propagating them along colour affinities of the guide image.

    Implements method.md §4.7 exactly: for each dilation d the 8 neighbours at offsets {−d, 0, d}² \\ (0, 0)
    with replicate borders; σ_k(x) is the sample standard deviation (n − 1) of the 9·len(dilations) stencil
    values (centre included at every dilation); κ(x, δ) = mean over k of −|I_k(x) − I_k(x+δ)| /
    (1e-8 + 0.1 σ_k(x)); α = softmax over the offsets; then ``iterations`` times m(x) ← Σ_δ α(x, δ) m(x+δ)
    (centre excluded). Classes are independent, so any chunking of C gives the same result.

    The affinities are computed once per sample, as `[H·W, K]` rows (K = 8·len(dilations)). Replicate
    borders become clamped flat indices (`[H·W, K]` int32, cached per geometry), and each iteration is
    one ``F.embedding_bag`` call: for every pixel, the sum of its K neighbours' mask rows (pixel-major
    `[H·W, C]`) weighted by α, in offset order. O(K·C·H·W) work per step, like the shift formulation,
    but one pass over memory instead of K, and about three `[H·W, C]` buffers plus α and the index
    (4·K bytes per pixel each) instead of a stack of all shifts.

    Args:
        image: `[B, 3, H, W]` guide image, float32, RGB, raw values in [0, 255] (not ImageNet-normalised;
            method.md pitfall P16); cast to float32.
        masks: `[B, C, H, W]` score maps at the guide's size (e.g. upsampled sigmoid scores in (0, 1));
            cast to float32.
        iterations: number of propagation steps (method.md §4.7; the default lives in the config).
        dilations: neighbourhood dilations, positive integers, in order (method.md §4.7).
        fused: the fused Triton kernels (``ops/pamr_triton.py``: one launch for the affinities of all
            windows, one per step) instead of the torch formulation. None (default): on CUDA tensors when
            triton imports and no input requires grad, the torch path otherwise (always on CPU). True: the
            kernels, required (they also run CPU tensors under ``TRITON_INTERPRET=1``; no autograd). False:
            the torch path.
        native: the native CPU kernel (``ops/pamr_native.c``, compiled at first use: affinities vectorised
            over pixels, then all steps in one cache-resident sweep per thread's share of the classes) for CPU
            tensors. None (default): when ``$TALK2DINO_PAMR_NATIVE`` allows it, it builds, and no input requires
            grad; otherwise the torch path. True: required (RuntimeError when it cannot be built). False: the
            torch path. The two agree within float rounding (≤ 1e-5; tests compare them).

    Returns:
        `[B, C, H, W]` float32 refined score maps; each step is a convex combination of neighbours, so
        values stay within the input's range.

    Raises:
        ValueError: on mismatched shapes, negative ``iterations`` or invalid ``dilations``.
        RuntimeError: ``fused=True`` without an importable triton; ``native=True`` without a buildable kernel.
    """
    _check_inputs(image, masks, iterations, dilations)
    guide = image.to(torch.float32)
    refined = masks.to(torch.float32)
    if iterations == 0:
        return refined.clone()
    # The kernels have no backward: a differentiable call stays on the torch path unless asked otherwise.
    if fused or (fused is None and guide.is_cuda and not (refined.requires_grad or guide.requires_grad)):
        kernel = _fused_kernel()
        if kernel is not None:
            return kernel(guide, refined, iterations=iterations, dilations=dilations)
        if fused:
            raise RuntimeError("pamr(fused=True) needs triton (pip install triton)")
    cpu_kernel = _cpu_kernel(native, guide, refined, dilations)
    if cpu_kernel is not None:
        samples = [_refine_one_native(cpu_kernel, guide[b : b + 1], refined[b : b + 1], iterations, dilations)
                   for b in range(len(guide))]
        return samples[0] if len(samples) == 1 else torch.cat(samples)
    # One sample at a time: the softmax kernel is not batch-invariant (its vectorised tail depends on the
    # tensor size), and running each window alone makes a batched call equal per-sample calls bit for bit
    # (house style §10); it also bounds memory to one window's buffers.
    samples = [_refine_one(guide[b : b + 1], refined[b : b + 1], iterations, dilations) for b in range(len(guide))]
    # A single window is returned as computed (a channels-last view), without a copy.
    return samples[0] if len(samples) == 1 else torch.cat(samples)


def _cpu_kernel(native: bool | None, image: Tensor, masks: Tensor, dilations: Sequence[int]) -> NativePamr | None:
    """The native kernel when `native` asks for it (True) or allows it (None) for these CPU inputs."""
    if native is False or image.device.type != "cpu":
        if native:
            raise ValueError(f"pamr(native=True) serves CPU tensors; got {image.device.type}")
        return None
    if 8 * len(dilations) > MAX_OFFSETS:  # the kernel's offset tables have a fixed size
        if native:
            raise ValueError(f"pamr(native=True) takes at most {MAX_OFFSETS // 8} dilations; got {len(dilations)}")
        return None
    if native is None and (image.requires_grad or masks.requires_grad):
        return None  # the kernel has no backward
    return native_pamr(require=bool(native))


def _refine_one_native(kernel: NativePamr, image: Tensor, masks: Tensor, iterations: int,
                       dilations: Sequence[int]) -> Tensor:
    """Native PAMR of one sample: image `[1, 3, H, W]`, masks `[1, C, H, W]`, both float32, on CPU.

    The affinities (H·K·Wa floats in this thread's scratch, laid out as the C source says) are computed by
    row bands, then every step runs for a share of the classes per thread, with no synchronisation between
    threads in between: both phases are one parallel region each, which keeps a busy machine from stalling
    the work (issue 13).
    """
    height, width = image.shape[-2:]
    neighbours = Offsets(_stencil_offsets(dilations, include_centre=False))
    stencil = Offsets(_stencil_offsets(dilations, include_centre=True))
    threads = torch.get_num_threads()
    alpha = _scratch(neighbours.count * height * kernel.padded_width(width), image.device)
    # The kernel pads the guide itself (a torch op here would leave torch's OpenMP workers spinning on the
    # cores the kernel's threads are about to use).
    guide = image[0].contiguous()
    # Four row bands per thread: a thread that shares its core (see run_parallel) does fewer of them.
    run_parallel([functools.partial(kernel.affinities, guide, alpha, neighbours, stencil, rows)
                  for rows in split(height, 4 * threads)], threads)
    source = masks[0].contiguous()
    out = torch.empty_like(source)
    # One share of the classes per thread: each share reads all of α once, so finer shares cost memory traffic.
    run_parallel([functools.partial(kernel.run, alpha, source, out, neighbours, iterations, channels)
                  for channels in split(source.shape[0], threads)], threads)
    return out.unsqueeze(0)


def _neighbour_index(height: int, width: int, dilations: Sequence[int], device: torch.device) -> Tensor:
    """Flat index of every pixel's neighbours, `[H·W, K]` int32, replicate borders (row-major pixels).

    Row p lists, in the fixed offset order of :func:`_stencil_offsets`, the flat index of
    ``(clamp(y + dy), clamp(x + dx))``: clamping to the border is exactly replicate padding. Cached per
    geometry (a few tens of MB for a 448×448 window), since every window of an image shares it.
    """
    key = (height, width, tuple(int(d) for d in dilations), str(device))
    cached = _INDEX_CACHE.get(key)
    if cached is not None:
        _INDEX_CACHE.move_to_end(key)
        return cached
    rows = torch.arange(height, device=device, dtype=torch.int32).view(height, 1)
    cols = torch.arange(width, device=device, dtype=torch.int32).view(1, width)
    neighbours = _stencil_offsets(dilations, include_centre=False)
    index = torch.empty((height, width, len(neighbours)), dtype=torch.int32, device=device)
    for k, (dy, dx) in enumerate(neighbours):
        index[..., k] = (rows + dy).clamp(0, height - 1) * width + (cols + dx).clamp(0, width - 1)
    flat = index.view(height * width, len(neighbours))
    _INDEX_CACHE[key] = flat
    while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return flat


def _refine_one(image: Tensor, masks: Tensor, iterations: int, dilations: Sequence[int]) -> Tensor:
    """Fast PAMR of one sample: image `[1, 3, H, W]`, masks `[1, C, H, W]`, both float32.

    Each propagation step m(x) ← Σ_δ α(x, δ) m(x + δ) is one weighted gather-and-sum over pixel-major
    masks `[H·W, C]`: ``F.embedding_bag`` with the neighbour index as the bags and α as the per-sample
    weights (a fused, multi-threaded kernel that sums the K weighted rows in offset order). It streams
    the index and α once per step instead of making K passes over the whole mask.
    """
    height, width = image.shape[-2:]
    num_classes = masks.shape[1]
    weights = _pixel_affinities(image, dilations)  # [H·W, K], the bags' weights
    with _serial_cpu(image.device, height * width):
        index = _neighbour_index(height, width, dilations, image.device)
    # Pixel-major [H·W, C], contiguous (a strided weight would take embedding_bag's slow generic path);
    # a channels-last input is already laid out this way and is not copied.
    refined = masks[0].permute(1, 2, 0).reshape(height * width, num_classes).contiguous()
    for _ in range(iterations):
        refined = F.embedding_bag(index, refined, mode="sum", per_sample_weights=weights)
    return refined.view(1, height, width, num_classes).permute(0, 3, 1, 2)


def pamr_reference(image: Tensor, masks: Tensor, *, iterations: int, dilations: Sequence[int]) -> Tensor:
    """Plain, memory-hungry PAMR used as the independent slow path in tests and benchmarks.

    Same formula as :func:`pamr` (method.md §4.7), written the obvious way: every neighbour shift is
    materialised with per-dilation replicate padding of width d, the spread is ``torch.std`` (unbiased)
    over a stacked `[B, 3, 9·len(dilations), H, W]` tensor, and each iteration stacks all shifts of all
    classes into `[B, K, C, H, W]`, K = 8·len(dilations).

    Args:
        image: `[B, 3, H, W]` guide image, float32, RGB, raw values in [0, 255]; cast to float32.
        masks: `[B, C, H, W]` score maps at the guide's size; cast to float32.
        iterations: number of propagation steps (method.md §4.7).
        dilations: neighbourhood dilations, positive integers, in order (method.md §4.7).

    Returns:
        `[B, C, H, W]` float32 refined score maps, equal to :func:`pamr` up to float rounding (≤ 1e-5).

    Raises:
        ValueError: on mismatched shapes, negative ``iterations`` or invalid ``dilations``.
    """
    _check_inputs(image, masks, iterations, dilations)
    guide = image.to(torch.float32)
    refined = masks.to(torch.float32)
    height, width = guide.shape[-2:]

    def all_shifts(tensor: Tensor, include_centre: bool) -> Tensor:
        # [B, K, ...channels..., H, W], offsets in the fixed order of _stencil_offsets.
        shifts = []
        for dilation in dilations:
            padded = F.pad(tensor, [dilation] * 4, mode="replicate")
            for dy in (-dilation, 0, dilation):
                for dx in (-dilation, 0, dilation):
                    if include_centre or dy != 0 or dx != 0:
                        rows = slice(dilation + dy, dilation + dy + height)
                        cols = slice(dilation + dx, dilation + dx + width)
                        shifts.append(padded[..., rows, cols])
        return torch.stack(shifts, dim=1)

    spread = all_shifts(guide, include_centre=True).transpose(1, 2).std(dim=2, unbiased=True)  # [B, 3, H, W]
    neighbours = all_shifts(guide, include_centre=False)  # [B, K, 3, H, W]
    kappa = -(guide.unsqueeze(1) - neighbours).abs() / (STD_EPS + STD_SCALE * spread.unsqueeze(1))
    weights = torch.softmax(kappa.mean(dim=2), dim=1)  # [B, K, H, W]

    for _ in range(iterations):
        refined = (all_shifts(refined, include_centre=False) * weights.unsqueeze(2)).sum(dim=1)
    return refined
