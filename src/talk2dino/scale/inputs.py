"""What a `segment_dataset` run reads: the input listing (with the stat that keys resuming) and the images
already in the output.

Inputs, each one of:

- a local folder, list file (``@list.txt`` or ``*.txt``) or image file: `talk2dino.data.image_lists.list_images`,
  as ``talk2dino segment`` reads them;
- a glob (``photos/**/*.jpg``, ``s3://bucket/tiles/*.png``);
- a table: a ``.parquet`` or ``.csv`` file with an image-path column (`path_column`); relative local paths are
  read against the table's folder;
- a URI folder or file any pyarrow filesystem understands (``s3://``, ``gs://``, ``hdfs://``): its image files.

The stat (size, modification time) is taken here, on the driver, once per file; it is the resume key.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from talk2dino.data.image_lists import IMAGE_EXTENSIONS, list_images
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.scale.schema import LISTING_SCHEMA, check_output_schema

logger = logging.getLogger(__name__)

InputSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
_GLOB_CHARS = frozenset("*?[")
_TABLE_SUFFIXES = (".parquet", ".csv")


def is_uri(text: str) -> bool:
    """A ``scheme://`` location other than a local ``file://`` one."""
    return "://" in text and not text.startswith("file://")


def _filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem of `uri` and the path inside it."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as err:  # an unknown scheme, a missing filesystem driver
        raise InvalidInputError(f"{one_line(uri)}: cannot open ({one_line(err)})") from err


def _stat_local(paths: list[str]) -> pa.Table:
    sizes: list[int | None] = []
    mtimes: list[int | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        except OSError:  # gone since listing: the decode task reports it as this image's error
            sizes.append(None)
            mtimes.append(None)
    return pa.table({"path": paths, "size": sizes, "mtime_ns": mtimes}, schema=LISTING_SCHEMA)


def _stat_remote(uris: list[str]) -> pa.Table:
    sizes: list[int | None] = []
    mtimes: list[int | None] = []
    for uri in uris:
        filesystem, inner = _filesystem(uri)
        info = filesystem.get_file_info(inner)
        sizes.append(info.size)
        mtimes.append(info.mtime_ns)
    return pa.table({"path": uris, "size": sizes, "mtime_ns": mtimes}, schema=LISTING_SCHEMA)


def _remote_images(uri: str) -> list[str]:
    """The image files of a URI folder (not recursive), a URI glob, or the URI itself when it is a file."""
    from pyarrow import fs

    filesystem, inner = _filesystem(uri)
    scheme = uri.split("://", 1)[0]
    pattern = inner if _GLOB_CHARS & set(inner) else None
    if pattern is None:
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.File:
            return [uri]
        if info.type != fs.FileType.Directory:
            raise InvalidInputError(f"{one_line(uri)}: no such file or folder")
        base, recursive = inner, False
    else:
        stem = [part for part in PurePosixPath(inner).parts]
        fixed = [part for part in stem[: next(i for i, p in enumerate(stem) if _GLOB_CHARS & set(p))]]
        base, recursive = str(PurePosixPath(*fixed)) if fixed else "", "**" in inner or len(stem) - len(fixed) > 1
    infos = filesystem.get_file_info(fs.FileSelector(base, recursive=recursive))
    found = sorted(i.path for i in infos if i.type == fs.FileType.File)
    if pattern is not None:
        found = [p for p in found if fnmatch.fnmatch(p, pattern)]
    else:
        found = [p for p in found if PurePosixPath(p).suffix.lower() in IMAGE_EXTENSIONS
                 and not PurePosixPath(p).name.startswith(".")]
    return [f"{scheme}://{p}" for p in found]


def _table_paths(source: str, path_column: str) -> list[str]:
    """The image paths of a Parquet or CSV table's `path_column` (relative local paths against its folder)."""
    try:
        if source.lower().endswith(".csv"):
            from pyarrow import csv

            if is_uri(source):
                filesystem, inner = _filesystem(source)
                with filesystem.open_input_stream(inner) as stream:
                    table = csv.read_csv(stream)
            else:
                table = csv.read_csv(source)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(source, columns=[path_column])
    except (pa.ArrowException, OSError) as err:
        raise InvalidInputError(f"{one_line(source)}: cannot read the table ({one_line(err)})") from err
    if path_column not in table.column_names:
        raise InvalidInputError(f"{one_line(source)}: no column {path_column!r} (columns: "
                                f"{', '.join(table.column_names)}); name the image-path column with --path-column")
    paths = [p for p in table.column(path_column).to_pylist() if p]
    if is_uri(source):
        return [str(p) for p in paths]
    folder = Path(source).parent
    return [str(p) if is_uri(str(p)) or os.path.isabs(p) else str(folder / p) for p in paths]


def list_inputs(inputs: InputSpec, *, path_column: str = "path") -> pa.Table:
    """The images of `inputs` (see the module's docstring), deduplicated in order, with their stat.

    Returns:
        A `LISTING_SCHEMA` table: path, size, mtime_ns (null for a local file that vanished since listing).

    Raises:
        InvalidInputError: an input that does not exist, a table without the path column, no images at all.
    """
    items = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(i) for i in inputs]
    local: list[str] = []
    remote: list[str] = []
    for item in items:
        if item.lower().endswith(_TABLE_SUFFIXES) and not item.startswith("@"):
            for path in _table_paths(item, path_column):
                (remote if is_uri(path) else local).append(path)
        elif is_uri(item):
            remote.extend(_remote_images(item))
        elif _GLOB_CHARS & set(item) and not Path(item).exists():
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise InvalidInputError(f"{one_line(item)}: the pattern matches no file")
            local.extend(str(p) for p in list_images(matched))
        else:
            local.extend(str(p) for p in list_images([item.removeprefix("file://")]))
    local = list(dict.fromkeys(local))
    remote = list(dict.fromkeys(remote))
    if not local and not remote:
        raise InvalidInputError(f"no images found in {one_line(items)}")
    return pa.concat_tables([_stat_local(local), _stat_remote(remote)])


def done_keys(out: str, *, retry_errors: bool = False) -> set[tuple[str, int | None, int | None]]:
    """``(path, size, mtime_ns)`` of every image already in the output dataset `out` (none if it is missing);
    with `retry_errors`, only of those segmented without an error (a failed image is tried again).

    Part files being written (hidden ``.``-prefixed temporaries) are not read.

    Raises:
        InvalidInputError: `out` holds Parquet files of another table.
    """
    import pyarrow.dataset as ds

    if is_uri(out):
        from pyarrow import fs

        filesystem, inner = _filesystem(out)
        if filesystem.get_file_info(inner).type != fs.FileType.Directory:
            return set()
        dataset = ds.dataset(inner, filesystem=filesystem, format="parquet")
    else:
        if not Path(out).is_dir():
            return set()
        dataset = ds.dataset(out, format="parquet")
    if not dataset.files:
        return set()
    check_output_schema(dataset.schema, out)
    table = dataset.to_table(columns=["path", "size", "mtime_ns"],
                             filter=ds.field("error").is_null() if retry_errors else None)
    return set(zip(*(table.column(c).to_pylist() for c in ("path", "size", "mtime_ns")), strict=True))


def pending(listing: pa.Table, done: set[tuple[str, int | None, int | None]]) -> pa.Table:
    """The rows of `listing` whose ``(path, size, mtime_ns)`` is not in `done` (a changed file is redone)."""
    if not done:
        return listing
    keys = zip(*(listing.column(c).to_pylist() for c in ("path", "size", "mtime_ns")), strict=True)
    mask = [key not in done for key in keys]
    return listing.filter(pa.array(mask, type=pa.bool_()))
