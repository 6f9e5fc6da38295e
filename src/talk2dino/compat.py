"""The few places where supported dependency versions differ, decided in one module.

The declared ranges (pyproject.toml) are proven at both ends in CI; this module holds what the lower end
needs and the one-line refusals for features that need a newer release. Versions are read from the
installed distributions' metadata, so nothing here imports torch or transformers.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from talk2dino.errors import Talk2DinoError

__all__ = ["installed_version", "require", "transformers_dtype_kwargs", "version_tuple"]


def version_tuple(text: str) -> tuple[int, ...]:
    """``"4.56.0.dev0"`` -> ``(4, 56, 0)``; ``"2.13.0+cpu"`` -> ``(2, 13, 0)`` (release numbers only)."""
    parts: list[int] = []
    for piece in text.split("+")[0].split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # "0rc1", "0dev": the release part ends here
            break
    return tuple(parts)


@cache
def installed_version(distribution: str) -> str | None:
    """The installed version string of `distribution`, or None when it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def require(distribution: str, minimum: str, feature: str) -> None:
    """Refuse `feature` in one line when `distribution` is older than `minimum` (or missing).

    Raises:
        Talk2DinoError: naming the feature, the version it needs, the installed one and the upgrade command.
    """
    found = installed_version(distribution)
    if found is None or version_tuple(found) < version_tuple(minimum):
        raise Talk2DinoError(
            f"{feature} needs {distribution}>={minimum} (installed: {found or 'none'}); "
            f"upgrade with: pip install -U '{distribution}>={minimum}'"
        )


# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56 (the old name warns from then on).
_DTYPE_KWARG_SINCE = (4, 56)


def transformers_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` or, before transformers 4.56, ``{"torch_dtype": dtype}`` for ``from_pretrained``."""
    found = installed_version("transformers")
    if found is not None and version_tuple(found) < _DTYPE_KWARG_SINCE:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
