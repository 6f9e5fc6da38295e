"""Atomic file writes, JSON writing and file hashing: the one implementation every writer in the package uses.

A file is written under a hidden temporary name in its destination folder and renamed over the final
name only once complete, so a reader (or a resumed run) sees either the old file or the whole new one,
never a half-written one. ``durable=True`` also flushes the data and the folder entry to disk, for
files that a killed or crashed run must find intact (shards, checkpoints, manifests).

Crash testing: `fault_point` is a named site in the writers and run loops where a crash test can have the
process killed with SIGKILL (``TALK2DINO_FAULT_INJECT=<site>:<n>``, see its docstring); it is inert when
that variable is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from talk2dino.errors import InvalidInputError, one_line

_CHUNK = 1 << 20

FAULT_ENV = "TALK2DINO_FAULT_INJECT"
# Every site `fault_point` is called with; tests/crash_harness.py draws its kill points from this list.
FAULT_SITES = (
    "atomic-mid-write",  # atomic_write_bytes: half of the data is in the temp file
    "atomic-temp-written",  # atomic_path: the temp file is complete, not yet fsynced
    "atomic-before-rename",  # atomic_path: fsynced, not yet renamed over the final name
    "atomic-after-rename",  # atomic_path: renamed, the folder entry not yet fsynced
    "extract-batch",  # extract: after the features of one batch of images
    "extract-mid-shard",  # extract: the image shard file is written, its caption shard is not
    "extract-shard-files",  # extract: both files of a shard are written, the manifest does not list them yet
    "train-step",  # train: after one optimiser step
    "train-after-checkpoint",  # train: checkpoint.pt committed, model files and log not yet rewritten
    "train-before-log",  # train: model files rewritten, log.jsonl not yet
    "eval-image",  # eval: after the cache lines of one image
    "eval-torn-line",  # eval: half of one cache line is written
    "eval-before-results",  # eval: every image done, results.json not yet written
)
_fault_hits: dict[str, int] = {}


def fault_point(site: str) -> None:
    """Crash-test hook: kill this process with SIGKILL at the n-th call with `site`.

    Armed by ``TALK2DINO_FAULT_INJECT=<site>:<n>[,<site>:<n>...]`` (n counts from 1, per process).
    SIGKILL runs no handler, ``finally`` or ``atexit``: the process stops as on a power cut or the
    OOM killer, which is what resume code must survive. With the variable unset this is one environment
    lookup, so sites may sit in loops.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    hits = _fault_hits[site] = _fault_hits.get(site, 0) + 1
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        if name == site and count.isdigit() and int(count) == hits:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # SIGTERM: Windows has no SIGKILL


# What reading a JSON file from disk can raise on a hostile or broken file: OSError (unreadable); ValueError
# (bad JSON, bad UTF-8, or an integer over CPython's 4,300-digit limit, found by atheris); RecursionError (JSON
# nested deeper than the json module can parse, "[[[[...").
JSON_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RecursionError)


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (raised by `json_loads_unique`; a ``ValueError``, so it is one
    of `JSON_READ_ERRORS`). The message names the key, escaped and cut by `one_line`."""


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` of `json_loads_unique`: the object as a dict, or DuplicateKeyError."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"duplicate key '{one_line(key, max_chars=80)}' in one JSON object")
            seen.add(key)
    return obj


def json_loads_unique(data: str | bytes) -> Any:
    """``json.loads(data)``, refusing an object that names a key twice, at any depth.

    Python's json keeps the last value silently, so a file with a real ``"annotations"`` list followed by an
    empty one would read as empty (or a hidden second ``"image_std"`` would win); a file we did not write
    must mean one thing. Bytes are decoded as UTF-8 (a BOM is refused, as by ``json.loads``).

    Raises:
        DuplicateKeyError: naming the key (callers add the file name).
        ValueError, RecursionError: as ``json.loads`` (bad JSON, bad UTF-8, absurd nesting).
    """
    import json

    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)


def stays_inside(name: str) -> bool:
    """Whether a file name read from an untrusted file (a manifest, a split list, a COCO JSON) stays inside
    the folder it is joined to: relative, no drive, no ``..`` component, no NUL byte. Symlinks are not
    followed here; callers that must also refuse links leading out resolve the joined path themselves.
    """
    path = Path(name)
    return "\x00" not in name and not path.is_absolute() and not path.drive and ".." not in path.parts


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _not_regular(path: str | os.PathLike[str], mode: int, what: str) -> InvalidInputError | None:
    """The error for a file of `mode` that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return InvalidInputError(f"{one_line(path, max_chars=1000)}: {what} is {kind}, not a regular file")


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """``os.stat(path)``, refusing anything but a regular file (links are followed).

    Reading a FIFO blocks until a writer appears (forever, usually), and a device or socket is no input
    file either; every reader of user-named files checks this first.

    Raises:
        InvalidInputError: one line, ``"<path>: <what> is a FIFO, not a regular file"`` (or a socket, a
            device, a folder).
        OSError: `os.stat` failed (e.g. ``FileNotFoundError``); callers word that themselves.
    """
    info = os.stat(path)
    error = _not_regular(path, info.st_mode, what)
    if error is not None:
        raise error
    return info


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open a regular file for binary reading, refusing a FIFO, socket, device or folder without blocking.

    The path is opened with ``O_NONBLOCK`` (so a FIFO swapped in after a check cannot block the open),
    checked with ``fstat`` on the open descriptor (so the check and the read concern the same file), and
    the flag is then cleared.

    Raises:
        InvalidInputError: the path is not a regular file (see `check_regular_file`).
        OSError: the file cannot be opened.
    """
    check_regular_file(path, what)  # a clear error before opening anything (opening a device can act)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        error = _not_regular(path, os.fstat(fd).st_mode, what)
        if error is not None:
            raise error
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (makes a rename durable); best effort, as some file systems refuse it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on failure remove it.

    The temporary name (`temp_name`) is hidden, unique, and keeps `path`'s extension, so writers that choose a
    format from the extension (Pillow, numpy, safetensors) behave as for the final name; for a final name too
    long to carry the temp decorations it is the short ``.t2d-<hex>.tmp<suffix>``.

    Raises:
        Whatever the body raises, after the temporary file is removed; ``FileNotFoundError`` if the body
        succeeds without creating the temporary file.
    """
    final = Path(path)
    temporary = final.with_name(temp_name(final.name, final.parent))
    try:
        yield temporary
        fault_point("atomic-temp-written")
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        fault_point("atomic-before-rename")
        os.replace(temporary, final)
        fault_point("atomic-after-rename")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as temporary:
        if not os.environ.get(FAULT_ENV):
            temporary.write_bytes(data)
            return
        with open(temporary, "wb") as handle:  # crash test: a kill can land with half the data written
            handle.write(data[: len(data) // 2])
            handle.flush()
            fault_point("atomic-mid-write")
            handle.write(data[len(data) // 2:])


def json_default(obj: Any) -> Any:
    """``default`` of `write_json`: numpy scalars and arrays as Python numbers and lists, paths as strings.

    numpy is recognised by the object's module, so this module never imports it.

    Raises:
        TypeError: anything else (as ``json.dumps`` without a ``default``).
    """
    if type(obj).__module__ == "numpy" and callable(getattr(obj, "tolist", None)):
        return obj.tolist()  # np.generic -> Python scalar, np.ndarray -> nested lists
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def json_bytes(obj: Any, *, default: Callable[[Any], Any] = json_default) -> bytes:
    """The package's JSON file format: UTF-8, indent 2, non-ASCII kept as is, a trailing newline.

    Args:
        obj: A JSON-serialisable object.
        default: How objects JSON lacks are written; by default numpy values as numbers and lists and paths as
            strings (`json_default`); ``str`` writes anything as its text.

    Raises:
        TypeError: ``obj`` holds something `default` refuses.
    """
    import json

    return (json.dumps(obj, indent=2, ensure_ascii=False, default=default) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = False,
               default: Callable[[Any], Any] = json_default) -> None:
    """Write ``obj`` as `json_bytes` to `path`, atomically (see `atomic_path`).

    The one JSON file writer of the package (result JSONs, model configs, manifests, run records).

    Args:
        path: Destination file; its parent folder must exist.
        obj: A JSON-serialisable object.
        durable: Also flush the file and its folder entry to disk (see `atomic_path`).
        default: As for `json_bytes`.

    Raises:
        TypeError: ``obj`` holds something `default` refuses; the old file, if any, is left untouched.
    """
    atomic_write_bytes(path, json_bytes(obj, default=default), durable=durable)


_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.[0-9a-f]{12}\.tmp(?P<suffix>.*)$")
# The stem-free form `temp_name` falls back to for long final names: it names no target.
_SHORT_TEMP_NAME = re.compile(r"^\.t2d-[0-9a-f]{12}\.tmp(\.[^./\\]{1,16})?$")

NAME_MAX_DEFAULT = 255
"""Longest file name, in bytes, of the common file systems (ext4, XFS, Btrfs, tmpfs, APFS); used where
``os.pathconf`` cannot tell."""


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name, in bytes, that `folder`'s file system accepts (``PC_NAME_MAX``; else 255)."""
    try:
        value = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder, no pathconf (Windows), unknown name
        return NAME_MAX_DEFAULT
    return value if isinstance(value, int) and value > 0 else NAME_MAX_DEFAULT


def name_bytes(name: str) -> int:
    """Length of a file name as the file system counts it: bytes of its encoding (UTF-8 on Linux and macOS)."""
    return len(os.fsencode(name))


def temp_name(final_name: str, folder: str | os.PathLike[str] = ".") -> str:
    """A fresh `atomic_path` temp name for `final_name` in `folder`.

    Normally ``.<stem>.<12 hex>.tmp<suffix>``, which `temp_target` maps back to `final_name` (resume code uses
    that to tell its own leftovers apart). When that would be longer than 255 bytes or the folder's `name_max`
    (the decorations add 18 bytes: a final name of 238+ bytes), the stem-free ``.t2d-<12 hex>.tmp<suffix>``
    (the suffix dropped if over 16 characters): a long output name must not fail on its temp file alone.
    `is_temp_name` recognises both forms.
    """
    token = uuid.uuid4().hex[:12]
    final = Path(final_name)
    name = f".{final.stem}.{token}.tmp{final.suffix}"
    if name_bytes(name) <= min(name_max(folder), NAME_MAX_DEFAULT):
        return name
    suffix = final.suffix if _SHORT_TEMP_NAME.match(f".t2d-{token}.tmp{final.suffix}") else ""
    return f".t2d-{token}.tmp{suffix}"


def is_temp_name(name: str) -> bool:
    """Whether `name` is an `atomic_path` temp file name, of either form (see `temp_name`)."""
    return _TEMP_NAME.match(name) is not None or _SHORT_TEMP_NAME.match(name) is not None


def temp_target(name: str) -> str | None:
    """The final file name that an `atomic_path` temp file named `name` stands for, else None.

    A run killed hard (SIGKILL, power loss) can leave such a file; resuming code uses this to tell its
    own leftovers from foreign files.
    """
    match = _TEMP_NAME.match(name)
    return match.group("stem") + match.group("suffix") if match else None


def remove_temps(folder: str | os.PathLike[str], targets: Iterable[str]) -> list[str]:
    """Delete leftover temp files in `folder` whose final names are in `targets`; returns their names."""
    wanted = set(targets)
    removed = []
    for path in Path(folder).iterdir():
        if temp_target(path.name) in wanted:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
