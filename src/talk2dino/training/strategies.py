"""Visual-embedding strategies: which image vector each caption is contrasted with (method.md §3.4, §3.6).

All four strategies feed the same loss (`talk2dino.training.loss.infonce_loss`); only the image
embedding changes. They are pure tensor functions with a leading batch dimension and no state.

======================  =====================================================================
``max`` (the method)    per image, the head whose embedding is most similar to the image's own
                        caption, §3.4 step 2 (`select_heads`)
``avg``                 the stored head-averaged embedding ``mean_heads`` (§3.6 ``mean_heads``:
                        one patch softmax over the head-mean logits)
``cls``                 the stored final-norm CLS token (§3.6 ``cls``)
``cls-weighted``        the head embeddings weighted by their cosine similarity to the CLS token
                        (`cls_weighted`; differs from §3.6's learned variant, see there)
======================  =====================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from talk2dino.config import TargetStrategy

STRATEGIES: tuple[TargetStrategy, ...] = ("max", "avg", "cls", "cls-weighted")
_NORM_FLOOR = 1e-12  # F.normalize's default eps: the norm floor of every unit vector here


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension (x̂ = x / ‖x‖, method.md §1), in float32.

    Args:
        x: ``[..., D]`` any float dtype (float16 features are cast to float32 first).

    Returns:
        ``[..., D]`` float32, unit norm along the last dimension (zero rows stay zero).
    """
    return F.normalize(x.float(), dim=-1, eps=_NORM_FLOOR)


def head_norms(heads: torch.Tensor) -> torch.Tensor:
    """‖v_{i,m}‖ in float32, floored like `unit` (so v / head_norms(v) equals unit(v)).

    Args:
        heads: ``[B, M, D]`` per-head embeddings, any float dtype.

    Returns:
        ``[B, M]`` float32 norms, at least 1e-12.
    """
    return torch.linalg.vector_norm(heads.float(), dim=-1).clamp_min(_NORM_FLOOR)


def select_heads(text_unit: torch.Tensor, heads: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Pick, per image, the head most similar to the image's own caption (method.md §3.4 step 2).

    m*(i) = argmax_m ⟨t̂_i, v̂_{i,m}⟩, computed as ⟨t̂_i, v_{i,m}⟩ / ‖v_{i,m}‖ so that only the chosen
    head needs normalising. Ties go to the lowest head index (``torch.argmax`` returns the first
    maximum). The reference's softmax over heads before the argmax changes nothing and is omitted.
    No gradient flows through the choice.

    Args:
        text_unit: ``[B, D]`` float32, unit-norm projected captions t̂_i (row i is image i's caption).
        heads: ``[B, M, D]`` per-head embeddings v_{i,m} of the same rows' images, any float dtype and
            norm (unit-norm v̂_{i,m} work as well).
        norms: ``[B, M]`` `head_norms` of `heads`, if already computed.

    Returns:
        ``[B]`` int64 chosen head m*(i) in [0, M).
    """
    with torch.no_grad():
        norms = head_norms(heads) if norms is None else norms
        similarity = torch.einsum("bd,bmd->bm", text_unit.detach().float(), heads.float()) / norms
        return similarity.argmax(dim=1)


def cls_weighted(heads: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """CLS-weighted average of the head embeddings, from stored features only (strategy ``cls-weighted``).

    Definition (ours):

        w_{i,m} = softmax_m(⟨ĉ_i, v̂_{i,m}⟩)          (cosine of the CLS token with each head, temperature 1)
        v_i     = Σ_m w_{i,m} · v̂_{i,m}                (weighted sum of the *normalised* head embeddings)

    This is **not** method.md §3.6's ``cls_weighted``. There, α_i = softmax_m(MLP(c_i)) is a small
    network trained jointly with ψ and it re-weights the CLS→patch attention *logits* before one patch
    softmax, so it needs every image's patch tokens and logits (about 260 GB for COCO train in fp32).
    The features written by ``talk2dino extract`` hold only v_{i,m}, ``mean_heads`` and c_i, so this
    strategy weights the stored head embeddings instead and has no trainable parameters.

    Args:
        heads: ``[B, M, D]`` per-head embeddings v_{i,m}, any float dtype, any norm.
        cls: ``[B, D]`` final-norm CLS tokens c_i, any float dtype, any norm.

    Returns:
        ``[B, D]`` float32 v_i, not unit-norm (a convex combination of unit vectors; consumers normalise).
    """
    heads_unit = unit(heads)
    weights = torch.einsum("bd,bmd->bm", unit(cls), heads_unit).softmax(dim=1)
    return torch.einsum("bm,bmd->bd", weights, heads_unit)


def batch_image_embeddings(
    strategy: TargetStrategy,
    *,
    heads: torch.Tensor | None = None,
    mean_heads: torch.Tensor | None = None,
    cls: torch.Tensor | None = None,
    text_unit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit image embeddings v̂_i of a batch under `strategy` (method.md §3.4, §3.6).

    Row i of every tensor belongs to the same (caption, image) pair. For ``max``, image i is
    represented by the head chosen with caption i, in every column of the similarity matrix
    (method.md §3.4 step 3).

    Args:
        strategy: ``max``, ``avg``, ``cls`` or ``cls-weighted``.
        heads: ``[B, M, D]`` per-head embeddings v_{i,m}, any float dtype; needed by ``max`` and ``cls-weighted``.
        mean_heads: ``[B, D]`` head-averaged embeddings; needed by ``avg``.
        cls: ``[B, D]`` final-norm CLS tokens; needed by ``cls`` and ``cls-weighted``.
        text_unit: ``[B, D]`` float32 unit-norm projected captions t̂_i; needed by ``max``.

    Returns:
        ``(v, chosen)``: v ``[B, D]`` float32 unit-norm image embeddings; chosen ``[B]`` int64 heads m*(i)
        for ``max``, else None.

    Raises:
        ValueError: an unknown strategy or a missing input.
    """

    def need(name: str, value: torch.Tensor | None) -> torch.Tensor:
        if value is None:
            raise ValueError(f"target strategy '{strategy}' needs `{name}`")
        return value

    if strategy == "max":
        # Normalise only the chosen head of each row: same vectors as unit(heads)[rows, chosen], a third
        # of the work on CPU (the [B, M, D] division dominated the step).
        heads_float = need("heads", heads).float()
        norms = head_norms(heads_float)
        chosen = select_heads(need("text_unit", text_unit), heads_float, norms)
        rows = torch.arange(heads_float.shape[0], device=heads_float.device)
        return heads_float[rows, chosen] / norms[rows, chosen, None], chosen
    if strategy == "avg":
        return unit(need("mean_heads", mean_heads)), None
    if strategy == "cls":
        return unit(need("cls", cls)), None
    if strategy == "cls-weighted":
        return unit(cls_weighted(need("heads", heads), need("cls", cls))), None
    raise ValueError(f"unknown target strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
