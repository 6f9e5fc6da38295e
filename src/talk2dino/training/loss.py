"""Symmetric InfoNCE with a fixed temperature (method.md §3.4 steps 3–5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_loss(
    text_unit: torch.Tensor,
    image_unit: torch.Tensor,
    *,
    temperature: float,
    divide_by_batch_squared: bool,
) -> torch.Tensor:
    """Symmetric InfoNCE of a batch of (caption, image) pairs (method.md §3.4).

    S = t̂ v̂ᵀ (rows: captions, columns: images of the same batch rows), and

        L = ½ · [CE(S/τ, diag) + CE(Sᵀ/τ, diag)],

    with the cross-entropies averaged over the B rows (PyTorch's ``mean`` reduction). τ is a plain
    constant, never trained (pitfall P11). With `divide_by_batch_squared`, L is then divided by B², as
    the reference does (pitfall P12); a last partial batch of B' rows is divided by B'².

    Args:
        text_unit: ``[B, D]`` float32 unit-norm projected captions t̂_i.
        image_unit: ``[B, D]`` float32 unit-norm image embeddings v̂_i (row i: caption i's image).
        temperature: τ (0.07 in the recipe).
        divide_by_batch_squared: divide the loss by B².

    Returns:
        ``[]`` float32 scalar loss.
    """
    batch = text_unit.shape[0]
    logits = text_unit @ image_unit.t() / temperature
    labels = torch.arange(batch, device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    if divide_by_batch_squared:
        loss = loss / (batch * batch)
    return loss
