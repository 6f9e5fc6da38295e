"""Atomic file writes and file hashing: the one implementation every writer in the package uses.

A file is written under a hidden temporary name in its destination folder and renamed over the final
name only once complete, so a reader (or a resumed run) sees either the old file or the whole new one,
never a half-written one. ``durable=True`` also flushes the data and the folder entry to disk, for
files that a killed or crashed run must find intact (shards, checkpoints, manifests).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

_CHUNK = 1 << 20


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

    The temporary name is hidden, unique, and keeps `path`'s extension, so writers that choose a format
    from the extension (Pillow, numpy, safetensors) behave as for the final name.

    Raises:
        Whatever the body raises, after the temporary file is removed; ``FileNotFoundError`` if the body
        succeeds without creating the temporary file.
    """
    final = Path(path)
    temporary = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.tmp{final.suffix}")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_bytes(data)


_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.[0-9a-f]{12}\.tmp(?P<suffix>.*)$")


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
