"""Sigmoid-cosine score maps between class embeddings and patch tokens (method.md §4.4 step 5)."""

from __future__ import annotations

import torch
from torch import Tensor

# Floor on the patch-token norm before normalising, so that a zero token gives a zero cosine
# instead of NaN. See method.md §4.4 step 5 (f̂_p = f_p / max(‖f_p‖, 1e-6)).
PATCH_NORM_EPS = 1e-6

__all__ = ["PATCH_NORM_EPS", "sigmoid_cosine"]


def sigmoid_cosine(patch_tokens: Tensor, class_embeddings: Tensor) -> Tensor:
    """Score every patch against every class: S[b, n, p] = σ(⟨T̂_n, f̂_p⟩).

    There is no temperature and no bias, and the sigmoid is applied here, on the patch grid, before
    any resampling or averaging (method.md §4.4 step 5, pitfall P15). See method.md §4.4.

    Args:
        patch_tokens: `[B, P, D]` final-norm patch tokens of the backbone, raw (not normalised), any
            float dtype; cast to float32. Each token is divided by max(‖f_p‖, 1e-6).
        class_embeddings: `[N, D]` class embeddings T̂, already unit-norm (method.md §4.1 step 3), any
            float dtype; cast to float32.

    Returns:
        `[B, N, P]` float32 score maps, values in (σ(−1), σ(1)) = (0.2689, 0.7311); exactly σ(0) = 0.5
        for an all-zero patch token.

    Raises:
        ValueError: if the shapes are not `[B, P, D]` and `[N, D]` with the same D.
    """
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch_tokens must be [B, P, D]; got shape {tuple(patch_tokens.shape)}")
    if class_embeddings.dim() != 2:
        raise ValueError(f"class_embeddings must be [N, D]; got shape {tuple(class_embeddings.shape)}")
    if patch_tokens.shape[-1] != class_embeddings.shape[-1]:
        raise ValueError(
            f"width mismatch: patch_tokens has D={patch_tokens.shape[-1]}, "
            f"class_embeddings has D={class_embeddings.shape[-1]}; project the text with the psi of this backbone"
        )
    tokens = patch_tokens.to(torch.float32)
    classes = class_embeddings.to(torch.float32)
    tokens_unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(PATCH_NORM_EPS)
    cosine = torch.matmul(classes, tokens_unit.transpose(1, 2))  # [N, D] @ [B, D, P] -> [B, N, P]
    return torch.sigmoid(cosine)
