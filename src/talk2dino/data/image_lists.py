"""Expanding the command line's image arguments into image files: folders, list files, single files.

:func:`list_images` only finds files; :func:`talk2dino.data.images.load_image` decodes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from talk2dino.errors import InvalidInputError, error_reason, one_line
from talk2dino.fileio import open_regular

__all__ = ["IMAGE_EXTENSIONS", "list_images"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File extensions (lower case) that :func:`list_images` picks up when it scans a folder."""


def list_images(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *, recursive: bool = False
) -> list[Path]:
    """Expand command-line image arguments into a list of image files.

    Each input is expanded as follows, in order:

    - a folder: its files whose extension (case-insensitive) is in :data:`IMAGE_EXTENSIONS`, sorted by path.
      Hidden files (name starting with ``.``, e.g. macOS ``._photo.jpg`` metadata) are skipped. Sub-folders
      are scanned only when ``recursive`` is true;
    - ``@list.txt``, or any existing file whose name ends in ``.txt``: a list file with one path per line
      (UTF-8). Blank lines and lines starting with ``#`` are skipped; relative paths are resolved against the
      list file's folder. Each entry may be a file or a folder (expanded as above); list files do not nest;
    - any other file: kept as is, whatever its extension (`load_image` reports unreadable files).

    Order is kept and repeated paths (the same absolute path, however it was spelled) are dropped after their
    first occurrence.

    Args:
        inputs: Paths as given on the command line. A single string or path is treated as one input.
        recursive: Also scan sub-folders of folder inputs.

    Returns:
        The image paths, as spelled by the inputs (folder entries are ``folder / name``).

    Raises:
        InvalidInputError: An input, a list file or one of its entries does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for raw in inputs:
        text = os.fspath(raw)
        if text.startswith("@"):
            found.extend(_read_list_file(Path(text[1:]), recursive=recursive))
            continue
        path = Path(text)
        if path.is_dir():
            found.extend(_scan_folder(path, recursive=recursive))
        elif path.is_file() and path.suffix.lower() == ".txt":
            found.extend(_read_list_file(path, recursive=recursive))
        elif path.exists():
            found.append(path)
        else:
            raise InvalidInputError(f"{one_line(path, max_chars=1000)}: no such file or folder")
    return _dedupe(found)


def _scan_folder(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
    if not images:
        logger.warning("no image files (%s) found in %s", ", ".join(sorted(IMAGE_EXTENSIONS)), folder)
    return images


def _read_list_file(list_file: Path, *, recursive: bool) -> list[Path]:
    shown = one_line(list_file, max_chars=1000)
    if not list_file.exists():
        raise InvalidInputError(f"{shown}: list file not found")
    try:
        with open_regular(list_file, "list file") as handle:
            lines = handle.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{shown}: cannot read list file ({error_reason(exc)})") from exc
    base = list_file.parent
    found: list[Path] = []
    for line_number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "\x00" in entry:
            # pathlib would raise a bare ValueError ("embedded null byte") on the first file-system call.
            raise InvalidInputError(f"{shown}:{line_number}: entry {one_line(repr(entry))} holds a NUL byte")
        path = Path(entry)
        if not path.is_absolute():
            path = base / path
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise InvalidInputError(
                f"{shown}:{line_number}: cannot check {one_line(path)} ({error_reason(exc)})") from exc
        if is_dir:
            found.extend(_scan_folder(path, recursive=recursive))
        elif exists:
            found.append(path)
        else:
            raise InvalidInputError(f"{shown}:{line_number}: {one_line(path)}: no such file or folder")
    return found


def _dedupe(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    unique: list[Path] = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique
