"""Arrays in, numpy out: the one conversion the render modules apply to tensors and array-likes.

torch is never imported here: a tensor is recognised by its ``detach`` method, so that drawing a numpy
label map does not load torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy"]


def as_numpy(values: Any) -> np.ndarray:
    """`values` as a numpy array: a tensor is detached and moved to the CPU (low-precision floats as float32).

    Args:
        values: a numpy array (returned as is), a torch tensor on any device, or anything ``np.asarray`` takes.

    Returns:
        The values as a numpy array, same shape.
    """
    if isinstance(values, np.ndarray):
        return values
    detach = getattr(values, "detach", None)
    if callable(detach):  # a torch tensor; torch is not imported here unless the caller already has it
        tensor = detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    return np.asarray(values)
