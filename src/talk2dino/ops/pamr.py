"""PAMR: pixel-adaptive mask refinement with dilated local affinities (method.md §4.7).

Two implementations of the same formula:

- :func:`pamr`, the fast path: affinities are computed once, and each propagation step accumulates the
  48 weighted shifts into a single output buffer, so memory stays at a few copies of the mask.
- :func:`pamr_reference`, a deliberately plain path that materialises every neighbour shift; it is the
  independent check for tests and benchmarks.

Neighbour offsets are enumerated in one fixed order in both: dilations in the given order, and within a
dilation row-major over (dy, dx) ∈ {−d, 0, d}², skipping (0, 0) for the propagation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Constants of the affinity formula κ = −|I(x) − I(x+δ)| / (STD_EPS + STD_SCALE · σ(x)); method.md §4.7.
STD_EPS = 1e-8
STD_SCALE = 0.1

__all__ = ["STD_EPS", "STD_SCALE", "pamr", "pamr_reference"]


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
            "upsample the masks to the window size first (method.md §4.4 step 7)"
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


def _affinities(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """α(x, δ) of method.md §4.7: `[B, K, H, W]` float32, K = 8·len(dilations), softmax over K."""
    height, width = image.shape[-2:]
    pad = max(dilations)
    padded = F.pad(image, [pad] * 4, mode="replicate")

    # Sample standard deviation (n − 1) over the full stencils, centre included, in two passes
    # (mean, then squared deviations) to keep float32 accuracy on 0–255 values.
    stencil = _stencil_offsets(dilations, include_centre=True)
    total = torch.zeros_like(image)
    for dy, dx in stencil:
        total += _shifted(padded, pad, dy, dx, height, width)
    mean = total / len(stencil)
    squares = torch.zeros_like(image)
    for dy, dx in stencil:
        squares += (_shifted(padded, pad, dy, dx, height, width) - mean).square()
    spread = (squares / (len(stencil) - 1)).sqrt()  # [B, 3, H, W]
    denominator = STD_EPS + STD_SCALE * spread

    neighbours = _stencil_offsets(dilations, include_centre=False)
    kappa = torch.empty((image.shape[0], len(neighbours), height, width), dtype=image.dtype, device=image.device)
    for index, (dy, dx) in enumerate(neighbours):
        difference = (image - _shifted(padded, pad, dy, dx, height, width)).abs()
        kappa[:, index] = (-difference / denominator).mean(dim=1)
    return torch.softmax(kappa, dim=1)


def pamr(image: Tensor, masks: Tensor, *, iterations: int, dilations: Sequence[int]) -> Tensor:
    """Refine score maps by propagating them along colour affinities of the guide image.

    Implements method.md §4.7 exactly: for each dilation d the 8 neighbours at offsets {−d, 0, d}² \\ (0, 0)
    with replicate borders; σ_k(x) is the sample standard deviation (n − 1) of the 9·len(dilations) stencil
    values (centre included at every dilation); κ(x, δ) = mean over k of −|I_k(x) − I_k(x+δ)| /
    (1e-8 + 0.1 σ_k(x)); α = softmax over the offsets; then ``iterations`` times m(x) ← Σ_δ α(x, δ) m(x+δ)
    (centre excluded). Classes are independent, so any chunking of C gives the same result.

    The affinities are computed once per sample. Each iteration pads the masks once (replicate, width max(d)) and
    accumulates the weighted shifts into one buffer: O(8·len(dilations)·C·H·W) work and about three
    `[B, C, H, W]` buffers of memory (plus the padded copy), instead of a stack of all shifts.

    Args:
        image: `[B, 3, H, W]` guide image, float32, RGB, raw values in [0, 255] (not ImageNet-normalised;
            method.md pitfall P16); cast to float32.
        masks: `[B, C, H, W]` score maps at the guide's size (e.g. upsampled sigmoid scores in (0, 1));
            cast to float32.
        iterations: number of propagation steps (method.md §4.7; the default lives in the config).
        dilations: neighbourhood dilations, positive integers, in order (method.md §4.7).

    Returns:
        `[B, C, H, W]` float32 refined score maps; each step is a convex combination of neighbours, so
        values stay within the input's range.

    Raises:
        ValueError: on mismatched shapes, negative ``iterations`` or invalid ``dilations``.
    """
    _check_inputs(image, masks, iterations, dilations)
    guide = image.to(torch.float32)
    refined = masks.to(torch.float32)
    if iterations == 0:
        return refined.clone()
    # One sample at a time: the softmax kernel is not batch-invariant (its vectorised tail depends on the
    # tensor size), and running each window alone makes a batched call equal per-sample calls bit for bit
    # (house style §10); it also bounds memory to one window's buffers.
    samples = [_refine_one(guide[b : b + 1], refined[b : b + 1], iterations, dilations) for b in range(len(guide))]
    return torch.cat(samples)


def _refine_one(image: Tensor, masks: Tensor, iterations: int, dilations: Sequence[int]) -> Tensor:
    """Fast PAMR of one sample: image `[1, 3, H, W]`, masks `[1, C, H, W]`, both float32."""
    height, width = image.shape[-2:]
    pad = max(dilations)
    neighbours = _stencil_offsets(dilations, include_centre=False)
    weights = _affinities(image, dilations).unsqueeze(2)  # [1, K, 1, H, W], broadcast over classes

    refined = masks
    for _ in range(iterations):
        padded = F.pad(refined, [pad] * 4, mode="replicate")
        accumulated = torch.zeros_like(refined)
        for index, (dy, dx) in enumerate(neighbours):
            accumulated.addcmul_(weights[:, index], _shifted(padded, pad, dy, dx, height, width))
        refined = accumulated
    return refined


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
