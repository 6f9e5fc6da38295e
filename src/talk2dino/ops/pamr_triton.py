"""PAMR as fused Triton kernels (method.md §4.7): the CUDA path of :func:`talk2dino.ops.pamr.pamr`.

Imported lazily by ``ops/pamr.py`` (only when a CUDA tensor reaches ``pamr`` and triton imports), so the
CPU install never needs triton. The same kernels run on CPU tensors under triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported): that is how CI checks them without a GPU
(tests/test_pamr_triton.py).

Two kernels, both one program per (tile of pixels[, block of classes], window), every window of the batch in
one launch, no host synchronisation:

- ``_affinity_kernel`` computes α(x, δ) once per window: the 9·L stencil values of each channel are read
  as one ``[stencil, pixels]`` gather (spread in two passes, mean then squared deviations, as
  ``torch.std``), the 8·L neighbours as one ``[neighbours, pixels]`` gather, κ summed over R, G, B and
  divided by −3, and the softmax over the offsets taken in registers (max, exp, sum: the arithmetic of
  ``torch.softmax``). α is stored offset-major, ``[B, K, H·W]``, so the propagation reads it coalesced.
- ``_propagate_kernel`` is one step m(x) ← Σ_δ α(x, δ) m(x + δ) for a ``[classes, pixels]`` tile: per
  offset one coalesced row of α and one gather of the neighbours' scores, accumulated in float32 in the
  fixed offset order (the order of the CPU path's ``embedding_bag``).

Why one launch per iteration rather than all iterations in one launch: step i + 1 at pixel x reads step
i at x + δ, up to max(d) = 24 pixels away, i.e. in another program's tile. Keeping the iterations inside
one program would need either a grid-wide barrier (not expressible in Triton) or one program per whole
window (a 448×448×C map does not fit on chip, so it would still round-trip global memory every step while
using only B·⌈C/BLOCK_C⌉ programs: a few SMs for one image). A halo of 24 px per step grows to 240 px over
10 steps, larger than the tile. So each step is one launch over all windows, ping-ponging two buffers;
α (computed once, 4·K bytes per pixel) is re-read by every class block of a tile, which run back to back
and share it through L2; the launches (1 + iterations per group of up to 27 windows of 448², see
`_ALPHA_BUDGET_BYTES`) are queued asynchronously.

Borders are replicate: every neighbour index is clamped to the image, exactly ``pamr_reference``'s
per-dilation replicate padding (and the CPU path's clamped index).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from talk2dino.ops.pamr import STD_EPS, STD_SCALE, _stencil_offsets

__all__ = ["pamr_triton"]

# Upper bound on α's bytes per launch group: windows are refined in groups so that the `[B, K, H·W]` float32
# affinities stay below it (1 GiB is 27 windows of 448×448 with the 48 default neighbours); each group is
# 1 + iterations asynchronous launches, so a batch of 128 windows is 5 groups, 55 launches.
_ALPHA_BUDGET_BYTES = 1 << 30
# Values per program of the 2-D register tiles (`[offsets, pixels]` and `[classes, pixels]`), over 4 warps.
# Compiled for sm_90a without a GPU (triton.compile + the bundled ptxas -v), 2,048 values take 72 registers
# per thread in the affinity kernel (64×32 tiles) and 40–72 in the propagation (16×128, 8×256, 4×512), no
# spills: ≥ 7 programs per SM. 4,096 took 128–247 registers (2–4 programs per SM) for the same work.
_TILE_VALUES = 2048
_CLASS_BLOCKS = (16, 8, 4)  # class-block heights tried, largest first (see `_class_block`)

# Offset tables per (dilations, device): int32 `[2, K]` (dy, dx of the neighbours) and `[2, 9·L]` (of the
# stencil). Cached so that a call makes no host-to-device copy (a blocking copy from pageable memory).
_TABLES: dict[tuple[tuple[int, ...], str], tuple[Tensor, Tensor]] = {}


@triton.jit
def _clamped_index(y: tl.tensor, x: tl.tensor, dy: tl.tensor, dx: tl.tensor, height: int, width: int) -> tl.tensor:
    """Flat index of pixel (y + dy, x + dx) clamped to the image: replicate borders; shapes broadcast."""
    return tl.minimum(tl.maximum(y + dy, 0), height - 1) * width + tl.minimum(tl.maximum(x + dx, 0), width - 1)


@triton.jit
def _tile_pixels(tile: tl.tensor, height: int, width: int, BLOCK: tl.constexpr) -> tuple[tl.tensor, ...]:
    """Flat index, in-image mask, row and column of the `BLOCK` pixels of tile `tile` of an H×W window."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    y = offs // width
    return offs, offs < height * width, y, offs - y * width


@triton.jit
def _offset_rows(dy_ptr: tl.tensor, dx_ptr: tl.tensor, y: tl.tensor, x: tl.tensor, valid: tl.tensor, height: int,
                 width: int, COUNT: tl.constexpr, PAD: tl.constexpr) -> tuple[tl.tensor, ...]:
    """The `COUNT` offsets (padded to `PAD` rows) applied to a tile's pixels: row numbers, their mask, the
    clamped neighbour index `[PAD, BLOCK]` and its mask."""
    rows = tl.arange(0, PAD)
    rows_valid = rows < COUNT
    dy = tl.load(dy_ptr + rows, mask=rows_valid, other=0)
    dx = tl.load(dx_ptr + rows, mask=rows_valid, other=0)
    index = _clamped_index(y[None, :], x[None, :], dy[:, None], dx[:, None], height, width)
    return rows, rows_valid, index, rows_valid[:, None] & valid[None, :]


@triton.jit
def _affinity_kernel(image_ptr: tl.tensor, nb_dy_ptr: tl.tensor, nb_dx_ptr: tl.tensor, st_dy_ptr: tl.tensor,
                     st_dx_ptr: tl.tensor, alpha_ptr: tl.tensor, height: int, width: int, std_eps: float,
                     std_scale: float, K: tl.constexpr, K_PAD: tl.constexpr, S: tl.constexpr,
                     S_PAD: tl.constexpr, BLOCK: tl.constexpr) -> None:
    """α of one tile of pixels of one window.

    Args:
        image_ptr: guide `[B, 3, H, W]` float32, contiguous.
        nb_dy_ptr, nb_dx_ptr: `[K]` int32 neighbour offsets, fixed order (K = 8·L).
        st_dy_ptr, st_dx_ptr: `[S]` int32 stencil offsets, centre included (S = 9·L).
        alpha_ptr: output `[B, K, H·W]` float32.
        K_PAD, S_PAD: K and S rounded up to powers of two (register tile heights).
    """
    window = tl.program_id(1).to(tl.int64)
    pixels = height * width
    offs, valid, y, x = _tile_pixels(tl.program_id(0), height, width, BLOCK)
    _, _, s_index, s_mask = _offset_rows(st_dy_ptr, st_dx_ptr, y, x, valid, height, width, S, S_PAD)
    k_rows, k_valid, k_index, k_mask = _offset_rows(nb_dy_ptr, nb_dx_ptr, y, x, valid, height, width, K, K_PAD)

    # Σ_c |I_c(x) − I_c(x + δ)| / (ε + s·σ_c(x)), channels added in the order R, G, B as `mean` does.
    total = tl.zeros([K_PAD, BLOCK], dtype=tl.float32)
    for channel in tl.static_range(3):
        plane = image_ptr + (window * 3 + channel) * pixels
        centre = tl.load(plane + offs, mask=valid, other=0.0)
        stencil = tl.load(plane + s_index, mask=s_mask, other=0.0)
        mean = tl.sum(stencil, axis=0) / S
        deviation = tl.where(s_mask, stencil - mean[None, :], 0.0)
        spread = tl.sqrt(tl.sum(deviation * deviation, axis=0) / (S - 1))  # sample std (n − 1)
        denominator = std_eps + std_scale * spread
        neighbour = tl.load(plane + k_index, mask=k_mask, other=0.0)
        total += tl.abs(centre[None, :] - neighbour) / denominator[None, :]

    # κ = −total / 3, then the softmax over the K offsets; padded rows take −inf and weigh 0.
    kappa = tl.where(k_valid[:, None], -total / 3.0, float("-inf"))
    shifted = kappa - tl.max(kappa, axis=0)[None, :]
    exps = tl.exp(shifted)
    alpha = exps / tl.sum(exps, axis=0)[None, :]
    out = alpha_ptr + window * K * pixels + k_rows[:, None] * pixels + offs[None, :]
    tl.store(out, alpha, mask=k_mask)


@triton.jit
def _propagate_kernel(source_ptr: tl.tensor, alpha_ptr: tl.tensor, nb_dy_ptr: tl.tensor, nb_dx_ptr: tl.tensor,
                      target_ptr: tl.tensor, classes: int, height: int, width: int, K: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr) -> None:
    """One propagation step for a `[BLOCK_C classes, BLOCK_P pixels]` tile of one window.

    Args:
        source_ptr: scores `[B, C, H, W]` float32, contiguous (step i).
        alpha_ptr: `[B, K, H·W]` float32 affinities.
        nb_dy_ptr, nb_dx_ptr: `[K]` int32 neighbour offsets, fixed order.
        target_ptr: `[B, C, H, W]` float32 (step i + 1); never the source.
    """
    class_block = tl.program_id(0)
    window = tl.program_id(2).to(tl.int64)
    pixels = height * width
    offs, valid, y, x = _tile_pixels(tl.program_id(1), height, width, BLOCK_P)
    rows = class_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < classes)[:, None] & valid[None, :]
    source = source_ptr + window * classes * pixels + rows[:, None] * pixels  # [BLOCK_C, 1]
    alpha = alpha_ptr + window * K * pixels + offs
    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for k in range(K):
        dy = tl.load(nb_dy_ptr + k)
        dx = tl.load(nb_dx_ptr + k)
        index = _clamped_index(y, x, dy, dx, height, width)
        weight = tl.load(alpha + k * pixels, mask=valid, other=0.0)
        total += weight[None, :] * tl.load(source + index[None, :], mask=mask, other=0.0)
    target = target_ptr + window * classes * pixels + rows[:, None] * pixels + offs[None, :]
    tl.store(target, total, mask=mask)


def _offset_tables(dilations: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(neighbours [2, K], stencil [2, 9·L])`` int32 dy/dx rows on `device`, in the fixed offset order."""
    key = (tuple(int(d) for d in dilations), str(device))
    cached = _TABLES.get(key)
    if cached is None:
        neighbours = _stencil_offsets(key[0], include_centre=False)
        stencil = _stencil_offsets(key[0], include_centre=True)
        cached = (torch.tensor(neighbours, dtype=torch.int32).t().contiguous().to(device),
                  torch.tensor(stencil, dtype=torch.int32).t().contiguous().to(device))
        _TABLES[key] = cached
    return cached


def _affinities(image: Tensor, neighbours: Tensor, stencil: Tensor) -> Tensor:
    """α for every window: image `[B, 3, H, W]` float32 contiguous -> `[B, K, H·W]` float32."""
    batch, _, height, width = image.shape
    count, points = neighbours.shape[1], stencil.shape[1]
    k_pad, s_pad = triton.next_power_of_2(count), triton.next_power_of_2(points)
    block = max(16, min(128, _TILE_VALUES // max(k_pad, s_pad)))
    alpha = torch.empty((batch, count, height * width), dtype=torch.float32, device=image.device)
    grid = (triton.cdiv(height * width, block), batch)
    _affinity_kernel[grid](image, neighbours[0], neighbours[1], stencil[0], stencil[1], alpha, height, width,
                           STD_EPS, STD_SCALE, K=count, K_PAD=k_pad, S=points, S_PAD=s_pad, BLOCK=block,
                           num_warps=4)
    return alpha


def _class_block(classes: int) -> int:
    """Class rows per program: the height in `_CLASS_BLOCKS` that pads C least (the largest on ties).

    Padded rows cost idle lanes, and every class block reads α again: 21 classes take 3 blocks of 8 (24
    rows) rather than 2 of 16 (32 rows); 20 take 5 of 4; 3 take 1 of 4.
    """
    return min(_CLASS_BLOCKS, key=lambda block: (triton.cdiv(classes, block) * block, -block))


def _propagate(source: Tensor, alpha: Tensor, neighbours: Tensor, target: Tensor) -> None:
    """One step from `source` into `target`, both `[B, C, H, W]` float32 contiguous (distinct buffers)."""
    batch, classes, height, width = source.shape
    block_c = _class_block(classes)
    block_p = _TILE_VALUES // block_c
    # Class blocks vary fastest in launch order, so the programs that read the same tile of α run together
    # and all but the first find it in L2 (α is most of the step's DRAM traffic: 4·K bytes per pixel).
    grid = (triton.cdiv(classes, block_c), triton.cdiv(height * width, block_p), batch)
    _propagate_kernel[grid](source, alpha, neighbours[0], neighbours[1], target, classes, height, width,
                            K=neighbours.shape[1], BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)


def pamr_triton(image: Tensor, masks: Tensor, *, iterations: int, dilations: Sequence[int]) -> Tensor:
    """PAMR (method.md §4.7) with the fused kernels: same formula, borders and offset order as ``pamr``.

    Called by :func:`talk2dino.ops.pamr.pamr` for CUDA tensors (inputs already checked there); under
    ``TRITON_INTERPRET=1`` it also runs on CPU tensors (tests). Each window is computed independently, so a
    batched call equals per-window calls bit for bit.

    Args:
        image: `[B, 3, H, W]` guide, RGB in [0, 255]; cast to float32.
        masks: `[B, C, H, W]` score maps at the guide's size; cast to float32.
        iterations: propagation steps, ≥ 1.
        dilations: positive dilations, in order.

    Returns:
        `[B, C, H, W]` float32 refined scores, equal to ``pamr_reference`` within float rounding (1e-5).
    """
    guide = image.to(torch.float32).contiguous()
    scores = masks.to(torch.float32).contiguous()
    batch, classes, height, width = scores.shape
    neighbours, stencil = _offset_tables(dilations, guide.device)
    refined = torch.empty_like(scores)
    spare = torch.empty_like(scores) if iterations > 1 else refined
    group = max(1, _ALPHA_BUDGET_BYTES // (4 * neighbours.shape[1] * height * width))
    # Triton launches on torch's current device: make it the tensors' one (several GPUs).
    device_guard = torch.cuda.device(guide.device) if guide.is_cuda else contextlib.nullcontext()
    with device_guard:
        for start in range(0, batch, group):
            part = slice(start, min(start + group, batch))
            alpha = _affinities(guide[part], neighbours, stencil)
            source = scores[part]
            for step in range(iterations):
                # Alternate two buffers so that the last step writes `refined` (no final copy).
                target = refined[part] if (iterations - 1 - step) % 2 == 0 else spare[part]
                _propagate(source, alpha, neighbours, target)
                source = target
    return refined
