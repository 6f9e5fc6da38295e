"""Tiny random models for `.ci/wheel-check`, saved with the test suite's own helpers (tests/conftest.py).

Run with the python of the venv that holds the installed *wheel* (no pytest there: a stub stands in for it),
from outside the checkout:

    python .ci/wheel_tiny_models.py REPO/tests OUT_DIR

writes OUT_DIR/dino (DINOv2 with registers), OUT_DIR/clip (CLIP text tower + tokenizer), OUT_DIR/psi.pth.
The CLIP tokenizer is built from ../shared/reference/clip-bpe (or $TALK2DINO_SHARED) when that is there; a
clean clone without shared/ gets a synthetic merge list of the same size instead (random weights make the
token ids meaningless anyway; what is checked is that the installed package loads and runs the model).
"""

from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path


class _Permissive:
    """Stands in for whatever conftest.py reads from pytest at import time (``pytest.fixture``,
    ``pytest.fixture(scope=...)``, ``pytest.mark.skipif(...)``, ...): any attribute is another stand-in, and
    calling one with a lone function returns that function unchanged (a no-op decorator)."""

    def __getattr__(self, name: str) -> _Permissive:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self


def _stub_pytest() -> None:
    """conftest.py imports pytest for its fixtures and marks; the user's venv has none, and none is needed here."""
    try:
        import pytest  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType("pytest")

    def skip(reason: str = "", **_: object) -> None:
        raise SystemExit(f"wheel_tiny_models: conftest wanted to skip: {reason}")

    stub.skip = skip  # type: ignore[attr-defined]
    def module_getattr(name: str) -> _Permissive:  # PEP 562; dunders stay missing (torch inspects modules)
        if name.startswith("__"):
            raise AttributeError(name)
        return _Permissive()

    stub.__getattr__ = module_getattr  # type: ignore[attr-defined]
    sys.modules["pytest"] = stub


def _synthetic_bpe(path: Path) -> Path:
    """A merge list with CLIP's layout and count (pairs of byte symbols), for when the real one is absent."""
    from talk2dino.testing.clip_vocab import NUM_MERGES, byte_symbols

    symbols = byte_symbols()
    merges = [f"{a} {b}" for a in symbols for b in symbols][:NUM_MERGES]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(["#synthetic merge list for .ci/wheel-check", *merges, ""]))
    return path


def main() -> int:
    tests, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch  # noqa: F401  # before the stub, so torch never sees it
    _stub_pytest()
    sys.path.insert(0, str(tests))
    import conftest  # the test suite's helpers, so these models are the ones the tests use

    import talk2dino

    if not Path(talk2dino.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        raise SystemExit(f"talk2dino imported from {talk2dino.__file__}, not from this venv ({sys.prefix})")
    if conftest.BPE.is_file():
        print(f"CLIP vocabulary: {conftest.BPE}")
    else:
        conftest.BPE = _synthetic_bpe(out / "synthetic_bpe.txt.gz")
        print(f"CLIP vocabulary: synthetic (no {conftest.SHARED}/reference/clip-bpe)")
    conftest.save_tiny_dinov2(out / "dino")
    conftest.save_tiny_clip(out / "clip")
    conftest.save_tiny_projection(out / "psi.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
