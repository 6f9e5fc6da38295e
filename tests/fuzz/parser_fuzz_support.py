"""Helpers shared by the parser fuzz tests and the atheris harnesses (not a test module).

``outcome`` runs one parser call and enforces the contract of every input parser: it returns, or it raises a
:class:`Talk2DinoError` whose message is one non-empty line. Any other exception propagates, which is what
hypothesis and atheris report as a crash.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
if str(HERE.parents[1] / "src") not in sys.path:  # harnesses run as scripts from a checkout
    sys.path.insert(0, str(HERE.parents[1] / "src"))

from talk2dino.errors import Talk2DinoError  # noqa: E402

T = TypeVar("T")


def check_message(exc: BaseException) -> None:
    """Raise AssertionError unless ``exc``'s message is one non-empty line of reasonable length."""
    message = str(exc)
    if not message.strip() or len(message.splitlines()) != 1 or len(message) > 3000:
        raise AssertionError(f"bad {type(exc).__name__} message: {message[:500]!r}")


def outcome(call: Callable[[], T]) -> T | Talk2DinoError:
    """``call()``, or the one-line Talk2DinoError it raised (anything else propagates)."""
    try:
        return call()
    except Talk2DinoError as exc:
        check_message(exc)
        return exc


def mutate(data: bytes, edits: list[tuple[float, int]], cut: float | None) -> bytes:
    """``data`` with ``edits`` (position as a fraction of the length, new byte) applied, then cut to ``cut``."""
    out = bytearray(data)
    for where, value in edits:
        if out:
            out[min(int(where * len(out)), len(out) - 1)] = value
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """``atheris.instrument_imports()`` when atheris is installed; nothing otherwise.

    The harnesses' ``test_one_input`` functions are also imported by pytest to replay the inputs atheris found
    (``corpus/<group>/found/atheris_*``), which needs no atheris.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if not Path(main_file).name.startswith("atheris_"):
        # Imported by pytest (to replay found inputs): instrumenting would rewrite the bytecode of every
        # talk2dino function for the rest of the test session, which breaks torch.compile's tracing.
        yield
        return
    try:
        import atheris
    except ImportError:
        yield
        return
    with atheris.instrument_imports():
        yield
    # instrument_imports skips modules loaded by a custom loader, which is how an editable install of talk2dino
    # is imported (atheris warns about it): without this, coverage would not see our own parsers at all.
    _instrument_package(atheris, "talk2dino")


def _instrument_package(atheris: Any, package: str) -> None:
    """Instrument every function and method defined in the already imported modules of ``package``."""
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(f"{package}.")):
            continue
        for obj in list(vars(module).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) and obj.__module__ == name else [obj]
            for member in members:
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if isinstance(member, types.FunctionType) and member.__module__ == name and id(member) not in seen:
                    seen.add(id(member))
                    atheris.instrument_func(member)


def json_strategies(special: list[str], *, max_size: int, max_leaves: int) -> tuple[Any, Any]:
    """Hypothesis strategies ``(scalars, documents)`` for JSON-shaped input: every JSON scalar (huge integers,
    NaN and infinities included) plus the `special` strings (paths and names that parsers must refuse), and
    nested lists/objects of them (`max_size` items per container, `max_leaves` scalars in all)."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.text(max_size=8) | st.sampled_from(special))
    documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=max_size)
                             | st.dictionaries(st.text(max_size=8), inner, max_size=max_size), max_leaves=max_leaves)
    return scalars, documents

