"""The output folder of ``talk2dino segment`` (issue 14): checked before the model loads, never written over by
surprise.

The folder must be usable (`check_output_folder`); each input gets an output stem decided once, shortened when
the file system's name limit needs it (`plan_stems`); no file there that talk2dino did not write is replaced
without ``--overwrite``, and an input image never is (`refuse_overwrites`, `talk2dino_outputs`); temp files a
killed run left behind are removed (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from talk2dino.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["check_output_folder", "fit_stem", "max_stem_bytes", "output_names", "plan_stems", "refuse_overwrites",
           "remove_if_unused", "remove_stale_temps", "talk2dino_outputs"]


def check_output_folder(out_dir: Path) -> bool:
    """Make sure `out_dir` exists (created with its parents if missing), is a folder and is writable.

    Writability is tried, not guessed: a temporary file is created in it and removed.

    Returns:
        Whether the folder itself was created here (so that a run failing before it writes anything can remove
        it again, see `remove_if_unused`).

    Raises:
        InvalidInputError: one line naming the folder and the reason.
    """
    from talk2dino.errors import one_line

    shown = one_line(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {shown}: is a file, not a folder; give a folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # a parent is a file, or the folder became a file
        raise InvalidInputError(f"--out {shown}: cannot create the folder: {one_line(err.filename or err)} is a "
                                "file") from err
    except OSError as err:
        raise InvalidInputError(f"--out {shown}: cannot create the folder ({one_line(err.strerror or err)})") from err
    try:
        handle, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=out_dir)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise InvalidInputError(f"--out {shown}: folder is not writable ({one_line(err.strerror or err)})") from err
    return created


def remove_if_unused(out_dir: Path, created: bool) -> None:
    """Remove `out_dir` when this run created it and it is still empty (the run failed before writing), so that
    a typo in a model name does not leave an empty ``talk2dino-out`` behind. Its parents are left alone."""
    if created:
        with contextlib.suppress(OSError):  # not empty, or gone: nothing to undo
            out_dir.rmdir()


_HASH_CHARS = 8  # hex digits of sha256 that `fit_stem` appends to a shortened stem


def max_stem_bytes(out_dir: Path) -> int:
    """The longest output stem, in bytes, whose every output name fits the file-name limit of `out_dir`'s file
    system (`talk2dino.fileio.name_max`, 255 bytes on common ones): the limit less the longest suffix any
    option adds (``_attention.png``), so that a stem does not depend on the options of the run."""
    from talk2dino.fileio import NAME_MAX_DEFAULT, name_bytes, name_max

    suffixes = output_names("", overlay=True, save_scores=True, save_heatmaps=True, save_attention=True)
    return min(name_max(out_dir), NAME_MAX_DEFAULT) - max(name_bytes(suffix) for suffix in suffixes)


def fit_stem(stem: str, limit: int) -> str:
    """`stem` if it is at most `limit` bytes (UTF-8, as file names count), else its longest prefix that leaves
    room for ``~`` and 8 hex digits of its sha256, cut at a character boundary: deterministic, and distinct
    stems stay distinct (but for a 32-bit hash collision, which `plan_stems` then numbers)."""
    from talk2dino.fileio import name_bytes

    if name_bytes(stem) <= limit:
        return stem
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:_HASH_CHARS]
    room = limit - 1 - _HASH_CHARS
    prefix = stem
    while prefix and name_bytes(prefix) > room:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def plan_stems(paths: Sequence[Path], *, stem_bytes: int | None = None) -> dict[Path, str]:
    """Each input's output stem, decided once before the run: ``x``, else ``x_1``, ``x_2``, ... .

    A renamed output is logged as one warning naming both inputs, so ``a/x.jpg b/x.jpg`` do not silently
    become ``x.*`` and ``x_1.*``. `paths` hold no repeats (`list_images` drops them).

    With `stem_bytes` (see `max_stem_bytes`), a stem whose output names would be too long for the file system
    (a 250-byte image name; 83 CJK characters are 249 bytes in UTF-8) is shortened by `fit_stem`, with one
    warning naming the input: its JSON's ``image`` still names the input in full.
    """
    taken: dict[str, Path] = {}
    stems: dict[Path, str] = {}

    def fitted(stem: str) -> str:
        return stem if stem_bytes is None else fit_stem(stem, stem_bytes)

    for path in paths:
        first = fitted(path.stem)
        stem, n = first, 1
        while stem in taken:
            stem = fitted(f"{path.stem}_{n}")
            n += 1
        if stem != first:
            logger.warning("%s is written as %s.* because %s already took %s.*", path, stem, taken[first], first)
        elif stem != path.stem:
            logger.warning("%s is written as %s.*: its name is too long for output file names (%d bytes at most "
                           "before the suffix); its JSON names the image", path, stem, stem_bytes)
        taken[stem] = path
        stems[path] = stem
    return stems


_PROBE_PREFIX = ".talk2dino-write-test-"  # `check_output_folder`'s write probe


def remove_stale_temps(out_dir: Path, *, before: float, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete the temp files an interrupted ``segment`` left in `out_dir`; returns their names.

    A run killed hard (SIGKILL, the OOM killer, power loss) leaves its `talk2dino.fileio.atomic_path` temp
    files behind (the rename never came). Removed are only regular files in `out_dir` itself (no recursion,
    no links), last modified before `before` (the start of this run: a temp file of a run started after this
    one is left alone), named exactly as talk2dino names its temp files: ``.<output name>.<12 hex>.tmp<ext>``
    for one of segment's output names, the stem-free ``.t2d-<12 hex>.tmp<ext>``, or the write probe of
    `check_output_folder`; and never a name in `keep` (the outputs talk2dino's JSONs list: an image named
    ``.a.0123456789ab.tmp.png`` has outputs that look like temp files).
    """
    from talk2dino.fileio import is_temp_name, temp_target

    kinds = tuple(output_names("", overlay=True, save_scores=True, save_heatmaps=True, save_attention=True))
    removed: list[str] = []
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or name in keep:
            continue
        target = temp_target(name)
        if target is not None:
            ours = target.endswith(kinds)
        else:
            ours = is_temp_name(name) or name.startswith(_PROBE_PREFIX)
        if not ours:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before:
                continue
            os.unlink(entry.path)
        except OSError as err:  # gone meanwhile, or not ours to delete: leave it, say so
            logger.debug("%s: cannot remove %s (%s)", out_dir, name, err)
            continue
        removed.append(name)
    return removed


def output_names(stem: str, *, overlay: bool, save_scores: bool, save_heatmaps: bool,
                 save_attention: bool) -> list[str]:
    """The file names `talk2dino.render.write_result_files` writes for `stem` with these options, its JSON last."""
    from talk2dino.render import result_file_names

    names = result_file_names(stem, overlay=overlay, save_scores=save_scores, save_heatmaps=save_heatmaps,
                              save_attention=save_attention)
    return [*names.values(), f"{stem}.json"]


def _read_summary(path: Path) -> dict[str, object] | None:
    """`path` as a talk2dino summary JSON (a dict with ``image`` and a ``files`` dict of names), else None.

    A FIFO, socket, device or folder named ``*.json`` in --out is no summary: it is refused without being read
    (reading a FIFO would block the run forever, before it started)."""
    from talk2dino.fileio import open_regular

    limit = 64 * 1024 * 1024
    try:
        with open_regular(path, "summary") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            return None
        summary = json.loads(data)
    except (OSError, ValueError, RecursionError):  # InvalidInputError (not a regular file) is a ValueError
        return None
    if isinstance(summary, dict) and "image" in summary and isinstance(summary.get("files"), dict):
        return summary
    return None


def talk2dino_outputs(out_dir: Path) -> set[str]:
    """Names of the files in `out_dir` that talk2dino wrote there: every ``<stem>.json`` that is a talk2dino
    summary, and the files its ``files`` lists."""
    names: set[str] = set()
    try:
        candidates = [p for p in out_dir.iterdir() if p.suffix == ".json"]
    except OSError:
        return names
    for path in candidates:
        summary = _read_summary(path)
        if summary is None:
            continue
        names.add(path.name)
        files = summary["files"]
        assert isinstance(files, dict)
        names.update(v for v in files.values() if isinstance(v, str) and "/" not in v and "\\" not in v)
    return names


def refuse_overwrites(out_dir: Path, targets: Sequence[str], inputs: Sequence[Path], *, overwrite: bool,
                      ours: set[str]) -> None:
    """Refuse (one line) to write over a file of `out_dir` that this run did not create.

    An input image is never written over, even with `overwrite`. Another existing target is refused unless it
    is one of `ours` (talk2dino's earlier outputs, see `talk2dino_outputs`) or `overwrite` is given.

    Raises:
        InvalidInputError: naming the folder and (up to 5 of) the files.
    """
    from talk2dino.errors import one_line

    def listing(names: list[str]) -> str:
        return ", ".join(one_line(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    shown = one_line(out_dir)
    folder = out_dir.resolve()
    input_names = {p.name for p in inputs if p.resolve().parent == folder}
    clash = [name for name in targets if name in input_names]
    if clash:
        raise InvalidInputError(f"--out {shown}: would write over input image(s) {listing(clash)}; choose another "
                                "--out")
    # A folder in the way is never replaced (the rename would fail for that image only, after its computation).
    folders = [name for name in targets if (out_dir / name).is_dir() and not (out_dir / name).is_symlink()]
    if folders:
        raise InvalidInputError(f"--out {shown}: {listing(folders)} would be written where a folder is; talk2dino "
                                "never replaces a folder: move it, or choose another --out")
    existing = [name for name in targets if os.path.lexists(out_dir / name) and name not in ours]
    if existing and not overwrite:
        raise InvalidInputError(f"--out {shown}: would write over {len(existing)} file(s) talk2dino did not write: "
                                f"{listing(existing)}; choose another --out, or pass --overwrite to replace them")
