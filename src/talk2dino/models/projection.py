"""The projection psi: psi(t) = W2 · tanh(W1 t + b1) + b2 (method.md §2.3).

Parameter names equal the released checkpoints' keys (``linear_layer.*``, ``hidden_layers.0.*``),
so the authors' files load strictly, without renaming.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talk2dino.errors import WeightsError
from talk2dino.fileio import atomic_write_bytes, write_json

logger = logging.getLogger(__name__)

PROJECTION_FILE = "projection.safetensors"
PROJECTION_CONFIG_FILE = "projection.json"
# The one legacy alias the reference accepts (method.md §2.3); we read it, never write it.
_LEGACY_ALIASES = {"linear_layer2.": "hidden_layers.0."}


class Projection(nn.Module):
    """psi: R^in_dim -> R^out_dim, hidden width out_dim, no norm, no residual, no output activation."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.linear_layer = nn.Linear(in_dim, out_dim)
        self.hidden_layers = nn.ModuleList([nn.Linear(out_dim, out_dim)])

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Args:
            text_embeddings: ``[N, in_dim]`` raw, unnormalised CLIP embeddings (cast to float32).

        Returns:
            ``[N, out_dim]`` float32, not normalised (every consumer normalises).
        """
        x = text_embeddings.to(self.linear_layer.weight.dtype)
        return self.hidden_layers[0](torch.tanh(self.linear_layer(x)))

    def load_checked(self, state: dict[str, torch.Tensor], *, origin: str) -> None:
        """Strictly load `state`: every key present, none extra, every shape equal (house-style §4), floating
        point, finite, and no weight matrix all zeros. Every psi file (.pth and .safetensors, via
        `talk2dino.weights.load_state_dict`) and every training checkpoint's psi goes through here.

        Raises:
            WeightsError: listing missing and unexpected keys and mismatched shapes, or naming the non-float,
                non-finite or all-zero tensors; the message names `origin`.
        """
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            for old, new in _LEGACY_ALIASES.items():
                if key.startswith(old):
                    logger.info("%s: legacy key %s read as %s", origin, key, new + key[len(old):])
                    key = new + key[len(old):]
            if key in renamed:  # e.g. both linear_layer2.* and hidden_layers.0.*: which one is psi is unknowable
                raise WeightsError(f"{origin}: projection checkpoint holds {key} twice (under its legacy name too)")
            renamed[key] = value
        expected = self.state_dict()
        missing = sorted(set(expected) - set(renamed))
        unexpected = sorted(set(renamed) - set(expected))
        shapes = [
            f"{k}: file {tuple(renamed[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items() if k in renamed and renamed[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            hint = ""
            if shapes:
                hint = (f" (this psi expects a {self.in_dim}-d text embedding and a {self.out_dim}-d backbone; "
                        "was it trained for another backbone size?)")
            raise WeightsError(
                f"{origin}: projection checkpoint does not match: missing={missing} unexpected={unexpected} "
                f"shape_mismatch={shapes}{hint}"
            )
        # A cast would silently turn integer, bool or complex data into "weights"; NaN/inf would poison
        # every score map. Both mean a corrupt or foreign file.
        wrong = [f"{k}: {v.dtype}" for k, v in renamed.items() if not v.is_floating_point()]
        if wrong:
            raise WeightsError(f"{origin}: projection weights must be floating point, got {wrong}")
        nonfinite = [k for k, v in renamed.items() if not bool(torch.isfinite(v).all())]
        if nonfinite:
            raise WeightsError(f"{origin}: projection weights hold NaN or infinity in {nonfinite}; the file is corrupt")
        # A weight matrix of zeros makes psi's output the same for every text (tanh(b1), then W2 tanh(.) + b2):
        # every class gets the same embedding and the segmentation is uniform garbage with exit 0. Only a
        # placeholder or truncated export looks like this; trained (or randomly initialised) psi never does.
        zero = sorted(k for k, v in renamed.items() if k.endswith(".weight") and v.numel() > 0 and not bool(v.any()))
        if zero:
            raise WeightsError(f"{origin}: projection weight matrices {zero} hold only zeros, so every text would "
                               "map to the same embedding; the file is a placeholder or corrupt: use the released psi")
        self.load_state_dict({k: v.to(torch.float32) for k, v in renamed.items()}, strict=True)


def projection_dims(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(in_dim, out_dim) of a psi state dict, read from ``linear_layer.weight`` [out, in]."""
    weight = state.get("linear_layer.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or min(weight.shape) < 1:
        raise WeightsError(f"not a projection checkpoint: keys {sorted(state)[:6]}")
    return int(weight.shape[1]), int(weight.shape[0])


def save_projection(folder: str | os.PathLike[str], projection: Projection, metadata: dict[str, Any]) -> Path:
    """Write psi as ``projection.safetensors`` plus ``projection.json`` (dims and `metadata`).

    Returns:
        The path of the safetensors file.
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PROJECTION_FILE
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in projection.state_dict().items()}
    # Serialised in memory (psi is a few MB) and written by our own atomic writer: safetensors' save_file
    # goes through a temp file of its own (".tmpXXXXXX") that a kill leaves behind under a name no resume
    # recognises (found by the SIGKILL harness).
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}), durable=True)
    info = {"in_dim": projection.in_dim, "out_dim": projection.out_dim, **metadata}
    write_json(folder / PROJECTION_CONFIG_FILE, info, durable=True)
    return path
