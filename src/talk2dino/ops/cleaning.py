"""Background cleaning of the sigmoid score maps with class-weighted CLS attention (method.md §4.5)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

# Floor on ‖e_m‖ when normalising the per-head embeddings; only a degenerate all-zero head reaches it,
# otherwise ê_m = e_m / ‖e_m‖ exactly as in method.md §4.5 step 1.
HEAD_NORM_EPS = 1e-12

__all__ = ["HEAD_NORM_EPS", "clean_background"]


def clean_background(
    scores: Tensor,
    patch_tokens: Tensor,
    attn_logits: Tensor,
    class_embeddings: Tensor,
    *,
    lam: float,
    head_embedding: Literal["logits", "softmax"] = "logits",
) -> Tensor:
    """Blend the score maps with a class-specific CLS attention map rescaled into their range.

    Implements method.md §4.5, batched over windows:

    1. e_m = (1/P) Σ_p a_{m,p} f_p (``"logits"``, the current formula) or e_m = Σ_p softmax_p(a_m)_p f_p
       (``"softmax"``, the 2024 formula of the legacy profile); ê_m = e_m / ‖e_m‖.
    2. w_{n,m} = softmax over heads of ⟨T̂_n, ê_m⟩.
    3. Ã = Σ_m w a / Σ_m w, then A = softmax over the P patches.
    4. a_lo = min A, a_hi = max(max A, max A − a_lo), s_lo = min S, s_hi = max S, each taken over all
       classes and patches of one window together (pitfall P4: per sample, never across the batch);
       Â = (A − a_lo) / a_hi · (s_hi − s_lo) + s_lo (division by a_hi, not by the range, for parity).
    5. S' = (S + λ Â) / (1 + λ).

    Args:
        scores: `[B, N, P]` sigmoid score maps S of method.md §4.4 step 5, values in (0, 1); any float
            dtype, cast to float32.
        patch_tokens: `[B, P, D]` final-norm patch tokens F, raw (not normalised); cast to float32.
        attn_logits: `[B, M, P]` CLS→patch attention logits of the last block, scaled by 1/√d_h, no
            softmax; cast to float32.
        class_embeddings: `[N, D]` unit class embeddings T̂ (method.md §4.1); cast to float32.
        lam: blend weight λ (method.md §4.5 step 5; the default lives in the inference config).
        head_embedding: ``"logits"`` for the current per-head embedding from raw logits, ``"softmax"``
            for the 2024 formula with a softmax over patches (method.md §4.5, "Previous formula").

    Returns:
        `[B, N, P]` float32 cleaned score maps S'.

    Raises:
        ValueError: if the shapes disagree or ``head_embedding`` is not one of the two choices.
    """
    if head_embedding not in ("logits", "softmax"):
        raise ValueError(f"head_embedding must be 'logits' or 'softmax'; got {head_embedding!r}")
    if scores.dim() != 3 or patch_tokens.dim() != 3 or attn_logits.dim() != 3 or class_embeddings.dim() != 2:
        raise ValueError(
            "expected scores [B, N, P], patch_tokens [B, P, D], attn_logits [B, M, P], class_embeddings [N, D]; "
            f"got {tuple(scores.shape)}, {tuple(patch_tokens.shape)}, {tuple(attn_logits.shape)}, "
            f"{tuple(class_embeddings.shape)}"
        )
    batch, num_classes, num_patches = scores.shape
    if (
        patch_tokens.shape[:2] != (batch, num_patches)
        or attn_logits.shape[0] != batch
        or attn_logits.shape[2] != num_patches
        or class_embeddings.shape != (num_classes, patch_tokens.shape[2])
    ):
        raise ValueError(
            "inconsistent shapes: expected scores [B, N, P], patch_tokens [B, P, D], attn_logits [B, M, P], "
            f"class_embeddings [N, D]; got {tuple(scores.shape)}, {tuple(patch_tokens.shape)}, "
            f"{tuple(attn_logits.shape)}, {tuple(class_embeddings.shape)}"
        )

    sigmoid_scores = scores.to(torch.float32)
    tokens = patch_tokens.to(torch.float32)
    logits = attn_logits.to(torch.float32)
    classes = class_embeddings.to(torch.float32)

    # Step 1: one D-vector per head, [B, M, D].
    if head_embedding == "logits":
        head_vectors = torch.matmul(logits, tokens) / num_patches
    else:
        head_vectors = torch.matmul(torch.softmax(logits, dim=-1), tokens)
    head_unit = head_vectors / head_vectors.norm(dim=-1, keepdim=True).clamp_min(HEAD_NORM_EPS)

    # Step 2: head weights per class, softmax over heads (temperature 1), [B, N, M].
    head_weights = torch.softmax(torch.matmul(classes, head_unit.transpose(1, 2)), dim=-1)

    # Step 3: class-specific attention, [B, N, P]; the reference divides by Σ_m w (= 1 up to rounding).
    class_attn = torch.matmul(head_weights, logits) / head_weights.sum(dim=-1, keepdim=True)
    attn = torch.softmax(class_attn, dim=-1)

    # Step 4: statistics per window over (N, P) jointly (pitfall P4), shaped [B, 1, 1] to broadcast.
    attn_max = attn.amax(dim=(1, 2), keepdim=True)
    attn_lo = attn.amin(dim=(1, 2), keepdim=True)
    attn_hi = torch.maximum(attn_max, attn_max - attn_lo)
    score_lo = sigmoid_scores.amin(dim=(1, 2), keepdim=True)
    score_hi = sigmoid_scores.amax(dim=(1, 2), keepdim=True)
    attn_rescaled = (attn - attn_lo) / attn_hi * (score_hi - score_lo) + score_lo

    # Step 5: blend.
    return (sigmoid_scores + lam * attn_rescaled) / (1 + lam)
