"""The per-head visual targets `talk2dino extract` stores, from one backbone pass (method.md §3.3, §3.6).

Pure, batched tensor functions. Both weight the full D-dimensional final-norm patch tokens by a softmax
over the patches of the last block's CLS->patch attention logits, and keep the reference's 1/P factor (it
has no effect after normalisation, but keeps stored features byte-comparable, method.md §3.3). They are
computed in float32 whatever the backbone dtype. Which of the stored targets a caption is trained against
is chosen later, at training time (`talk2dino.training.strategies`).
"""

from __future__ import annotations

import torch

__all__ = ["head_targets", "mean_head_target"]


def _check(patch_tokens: torch.Tensor, attn_logits: torch.Tensor) -> None:
    if patch_tokens.ndim != 3 or attn_logits.ndim != 3:
        raise ValueError(
            f"expected patch_tokens [B, P, D] and attn_logits [B, M, P], got {tuple(patch_tokens.shape)} "
            f"and {tuple(attn_logits.shape)}"
        )
    if patch_tokens.shape[0] != attn_logits.shape[0] or patch_tokens.shape[1] != attn_logits.shape[2]:
        raise ValueError(
            f"patch_tokens {tuple(patch_tokens.shape)} and attn_logits {tuple(attn_logits.shape)} disagree on "
            "B or P"
        )
    if patch_tokens.shape[1] == 0:
        raise ValueError("no patch tokens (P = 0)")


def head_targets(patch_tokens: torch.Tensor, attn_logits: torch.Tensor) -> torch.Tensor:
    """Per-head attention-weighted patch embeddings v_{i,m} (method.md §3.3).

    v_{i,m} = (1/P) · Σ_p softmax_p(a_{i,m,·})_p · f_{i,p}

    Args:
        patch_tokens: ``[B, P, D]`` final-LayerNorm patch tokens f, any float dtype.
        attn_logits: ``[B, M, P]`` last-block CLS->patch attention logits, scaled by 1/√d_h, no softmax.

    Returns:
        ``[B, M, D]`` float32 targets, unnormalised.

    Raises:
        ValueError: the shapes do not fit together.
    """
    _check(patch_tokens, attn_logits)
    weights = torch.softmax(attn_logits.float(), dim=-1)  # [B, M, P]
    return (weights @ patch_tokens.float()) / patch_tokens.shape[1]


def mean_head_target(patch_tokens: torch.Tensor, attn_logits: torch.Tensor) -> torch.Tensor:
    """Head-averaged embedding of the `mean_heads` strategy (method.md §3.6).

    ā_p = (1/M) Σ_m a_{i,m,p};  v_i = (1/P) · Σ_p softmax_p(ā)_p · f_{i,p}

    The *logits* are averaged over heads and **one** softmax is taken over patches; this is neither the
    mean of M softmaxes nor the mean of the M head targets (the reference's ``avg_self_attn_out``).

    Args:
        patch_tokens: ``[B, P, D]`` final-LayerNorm patch tokens f, any float dtype.
        attn_logits: ``[B, M, P]`` last-block CLS->patch attention logits, scaled by 1/√d_h, no softmax.

    Returns:
        ``[B, D]`` float32 embeddings, unnormalised.

    Raises:
        ValueError: the shapes do not fit together.
    """
    _check(patch_tokens, attn_logits)
    weights = torch.softmax(attn_logits.float().mean(dim=1), dim=-1)  # [B, P]
    return (weights.unsqueeze(1) @ patch_tokens.float()).squeeze(1) / patch_tokens.shape[1]
