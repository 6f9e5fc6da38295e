"""Where a transformers backbone keeps its blocks and projections, in every layout transformers has shipped.

The fast paths run the models' blocks themselves, so they read submodules by name; those names changed
across transformers releases (checked in the released wheels 4.48.0, 4.56.0, 4.57.6, 5.0.0, 5.17.0,
5.18.0 and 5.25.0):

- ``Dinov2Model`` / ``Dinov2WithRegistersModel`` up to 5.17: q, k, v in ``attention.attention.{query,key,value}``,
  output ``attention.output.dense``, MLP ``mlp``, blocks ``encoder.layer``.
- the same from 5.18: ``attention.{q,k,v}_proj`` and ``attention.o_proj``; MLP and blocks unchanged.
- ``ViTModel`` 4.x (and early 5.x): q, k, v and output as old DINOv2; MLP ``intermediate`` + ``output.dense``
  (whose forward also adds the residual); blocks ``encoder.layer``.
- ``ViTModel`` later 5.x (5.17 included): ``attention.{q,k,v,o}_proj``, MLP ``mlp`` + the block's
  ``dropout``, blocks ``layers``.
- ``DINOv3ViTModel`` 4.56 to 5.0: ``attention.{q,k,v,o}_proj``, MLP ``mlp``, blocks ``layer``; later 5.x:
  blocks ``model.layer``.

Each accessor below recognises a layout by the attributes present, never by the version number, so a
release that keeps one of these layouts works without a change here; one with a new layout fails with a
`WeightsError` naming the module and the installed transformers version instead of an ``AttributeError``
from inside a forward. Dropout modules are identities in eval mode; they are applied anyway, exactly
where the model applies them, so the blocks stay the model's own computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from talk2dino.errors import WeightsError

__all__ = ["attention_output", "attention_projections", "block_list", "vit_attention_dropout", "vit_mlp"]


def _unknown(what: str, module: Any) -> WeightsError:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        installed = "unknown"
    return WeightsError(
        f"backbone: the {type(module).__name__} module of transformers {installed} has an unknown {what} "
        "layout; talk2dino supports the layouts of transformers 4.48 to 5.x (please report this version)"
    )


def attention_projections(attention: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The q, k, v projections ``Linear(D, M·d_h)`` of a transformers attention module, in either layout.

    Args:
        attention: a block's ``attention`` submodule (``Dinov2Attention``, ``ViTAttention``, ...).

    Raises:
        WeightsError: neither layout's attributes are present.
    """
    if hasattr(attention, "q_proj"):
        return attention.q_proj, attention.k_proj, attention.v_proj
    inner = getattr(attention, "attention", None)
    if inner is not None and hasattr(inner, "query"):
        return inner.query, inner.key, inner.value
    raise _unknown("attention projection", attention)


def attention_output(attention: Any, context: torch.Tensor) -> torch.Tensor:
    """The attention module's output projection applied to the attended values ``[B, T, M·d_h]``.

    The older layout follows its ``dense`` projection with the module's own dropout (``ViTSelfOutput``,
    ``Dinov2SelfOutput``); the newer layout has none there (ViT applies the block's dropout instead,
    see `vit_attention_dropout`).

    Returns:
        ``[B, T, D]``.

    Raises:
        WeightsError: neither layout's attributes are present.
    """
    if hasattr(attention, "o_proj"):
        return attention.o_proj(context)
    output = getattr(attention, "output", None)
    if output is not None and hasattr(output, "dense"):
        return output.dropout(output.dense(context))
    raise _unknown("attention output", attention)


def vit_mlp(layer: Any, normed: torch.Tensor) -> torch.Tensor:
    """A ``ViTLayer``'s feed-forward branch (before the residual add), in either layout.

    Args:
        layer: a transformers ``ViTLayer``.
        normed: ``[B, T, D]`` the block's ``layernorm_after`` output.

    Returns:
        ``[B, T, D]``: ``dropout(fc2(act(fc1(x))))`` (new layout) or ``output.dropout(output.dense(
        intermediate(x)))`` (old layout, whose ``ViTOutput.forward`` would also add the residual: we add it
        ourselves, in the residual stream's dtype).

    Raises:
        WeightsError: neither layout's attributes are present.
    """
    if hasattr(layer, "mlp"):
        return layer.dropout(layer.mlp(normed))
    if hasattr(layer, "intermediate") and hasattr(layer, "output"):
        return layer.output.dropout(layer.output.dense(layer.intermediate(normed)))
    raise _unknown("feed-forward", layer)


def vit_attention_dropout(layer: Any, branch: torch.Tensor) -> torch.Tensor:
    """The dropout a ``ViTLayer`` applies to its attention branch: the block's own in the new layout; in
    the old one `attention_output` already applied the attention module's."""
    return layer.dropout(branch) if hasattr(layer, "mlp") else branch


def block_list(model: Any) -> Any:
    """The transformer blocks (an ``nn.ModuleList``) of a backbone model, first to last, in any layout of the
    table above. Typed loosely, as the model is: the blocks' submodules are read by name.

    Raises:
        WeightsError: no known attribute holds the blocks.
    """
    for path in (("layers",), ("encoder", "layer"), ("model", "layer"), ("layer",)):
        found: Any = model
        for name in path:
            found = getattr(found, name, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList):
            return found
    raise _unknown("block list", model)
