"""The one weight resolver: source strings -> local files, with cache, hashes and strict loading.

Accepted source strings (house-style §4):

- ``hf-hub:ORG/REPO`` or ``hf-hub:ORG/REPO@REVISION``: a Hugging Face hub repository, downloaded
  once into the cache through ``huggingface_hub`` (honours ``HF_HUB_OFFLINE``).
- ``local-dir:PATH``: a folder on disk, used as is.
- ``https://...`` (or ``file://`` for a local mirror): a single file (the authors' psi checkpoints),
  downloaded once into the cache and pinned by hash.
- an existing file path (``.pth``, ``.pt``, ``.safetensors``).

Anything else is refused rather than guessed at: a bare ``org/repo`` could be a hub id or a
relative path, and loading the wrong weights silently is worse than an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from talk2dino.errors import WeightsError, error_summary
from talk2dino.fileio import atomic_path, file_sha256

logger = logging.getLogger(__name__)

SourceKind = Literal["hf-hub", "local-dir", "url", "file"]
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_TRUE = {"1", "true", "yes", "on"}
# Hub ids and revisions become folder names in the cache (huggingface_hub writes refs/<revision>), so
# anything that could climb out of it ("..", absolute paths, odd characters) is refused up front.
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
# A zip checkpoint (torch's format) is stored uncompressed, so its entries add up to about the file
# size; one that declares far more is a zip bomb or corrupt, refused before torch inflates it.
_ZIP_SLACK = 2.0
_ZIP_MIN_ALLOWANCE = 64 << 20


# Leading bytes of common files that are not checkpoints (a photo passed where psi is expected): recognised
# before any unpickling, so that the user reads "not a checkpoint" rather than "unsafe pickle".
_NOT_CHECKPOINT_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image"),
    (b"GIF87a", 0, "a GIF image"),
    (b"GIF89a", 0, "a GIF image"),
    (b"WEBP", 8, "a WebP image"),
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"BM", 0, "a BMP image"),
    (b"%PDF-", 0, "a PDF document"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", 0, "a JPEG 2000 image"),
    (b"ftypavif", 4, "an AVIF image"),
    (b"ftypheic", 4, "a HEIC image"),
    (b"ONNX", 0, "an ONNX file"),
)


def sniff_not_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """What a file looks like when its first bytes show it is no checkpoint (``"a JPEG image"``), else None.

    Only well-known signatures of other formats count; zip (torch), pickle (legacy torch) and safetensors files,
    and anything unrecognised, give None and are left to the loaders (which refuse unsafe pickles themselves).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    for magic, offset, what in _NOT_CHECKPOINT_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what
    return None


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``torch.load``: for a refused global, the line that names it.

    torch's weights_only message spans several lines and opens with advice to turn the check off;
    only the line naming the culprit (``unsupported GLOBAL posix.system``) is worth showing. transformers
    before 5.0 re-raises the refusal as a generic OSError ("Unable to load weights ... TF 2.0 checkpoint"),
    so the chain of causes is searched for it.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, pickle.UnpicklingError):
            for line in str(cause).splitlines():
                if "GLOBAL" in line or "nsupported" in line:
                    return f"{type(cause).__name__}: {line.strip()[:200]}"
        cause = cause.__cause__ or cause.__context__
    return error_summary(err)


def check_pin(value: str | None, *, length: int, what: str) -> str | None:
    """Return a hash pin in lower case after checking it is `length` hex digits (None passes).

    Raises:
        WeightsError: the pin is not a hex digest of that length (it also becomes a cache folder name).
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
        raise WeightsError(f"{what}: bad hash pin {str(value)[:80]!r}; expected {length} hex digits")
    return value.lower()


@dataclass(frozen=True)
class Source:
    """A parsed weight source."""

    kind: SourceKind
    location: str  # repo id, folder, URL or file path
    revision: str | None = None  # hub revision (branch, tag or commit), hf-hub only

    def __str__(self) -> str:
        if self.kind == "hf-hub":
            return f"hf-hub:{self.location}" + (f"@{self.revision}" if self.revision else "")
        if self.kind == "local-dir":
            return f"local-dir:{self.location}"
        return self.location


def parse_source(spec: str) -> Source:
    """Parse a source string; refuse ambiguous ones.

    Raises:
        WeightsError: when the string is empty or could mean several things.
    """
    spec = spec.strip()
    if not spec:
        raise WeightsError("empty weight source; use hf-hub:ORG/REPO, local-dir:PATH, a URL or a file path")
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        revision = None
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        parts = repo.split("/")
        if len(parts) != 2 or not all(_HUB_PART.match(p) and ".." not in p for p in parts):
            raise WeightsError(f"bad hub id in {spec!r}: expected hf-hub:ORG/REPO[@REVISION] with letters, digits, "
                               "'.', '_' or '-' (no '..', no absolute path)")
        if revision is not None and (not _REVISION.match(revision)
                                     or any(p in ("", ".", "..") for p in revision.split("/"))):
            raise WeightsError(f"bad hub revision in {spec!r}: use a branch, tag or commit without '..' or "
                               "empty path parts")
        return Source("hf-hub", repo, revision or None)
    if spec.startswith("local-dir:"):
        path = spec[len("local-dir:"):]
        if not path:
            raise WeightsError(f"'{spec}' names no folder")
        return Source("local-dir", os.path.expanduser(path))
    if spec.startswith(("https://", "http://", "file://")):
        return Source("url", spec)
    if spec.startswith("file:"):
        spec = spec[len("file:"):]
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return Source("file", path)
    if path.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"weight file '{path}' does not exist")
    raise WeightsError(
        f"ambiguous weight source '{spec}': write hf-hub:{spec} for a hub repository, "
        f"local-dir:{spec} for a folder, or give an existing file path"
    )


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TALK2DINO_OFFLINE`` asks for no network access."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TALK2DINO_OFFLINE"))


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: ``cache_dir``, else ``$TALK2DINO_CACHE``, else ``~/.cache/talk2dino``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TALK2DINO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "talk2dino"


def file_git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """Git blob SHA-1: sha1(b"blob <size>\\0" + bytes) (method.md §7), used to pin files without a sha256."""
    h = hashlib.sha1()
    h.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, *, sha256: str | None, git_blob_sha1: str | None, what: str) -> str:
    """Check a file against its pinned hashes; returns its sha256.

    Raises:
        WeightsError: naming the file and both hashes when a pin does not match.
    """
    sha256 = check_pin(sha256, length=64, what=what)
    git_blob_sha1 = check_pin(git_blob_sha1, length=40, what=what)
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256:
        raise WeightsError(f"{what}: {path} has sha256 {digest}, expected {sha256}")
    if sha256 is None and git_blob_sha1 is not None:
        blob = file_git_blob_sha1(path)
        if blob != git_blob_sha1:
            raise WeightsError(f"{what}: {path} has git blob sha1 {blob}, expected {git_blob_sha1}")
    return digest


def _download(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream `url` into `dest` atomically (a partial download never takes the final name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, durable=True) as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        shutil.copyfileobj(response, out, length=1 << 20)


def url_file_name(url: str) -> str:
    """The cache file name for `url`: its last path segment when that is a plain file name.

    Query strings, fragments, percent-escapes and names such as ``..`` never reach the file system;
    anything that is not a plain name becomes ``weights.bin`` (the pin folder keeps files apart).
    """
    path = urllib.parse.urlsplit(url).path
    name = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return name if _SAFE_NAME.match(name) and ".." not in name else "weights.bin"


def _check_inside(path: Path, root: Path, *, what: str) -> None:
    """Refuse a cache path that resolves outside the cache root (defence in depth against traversal)."""
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise WeightsError(f"{what}: refusing cache path {path}, which lies outside the cache {resolved_root}")


def resolve_file(
    spec: str,
    *,
    what: str,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    git_blob_sha1: str | None = None,
    folder_files: Sequence[str] = ("projection.safetensors",),
) -> tuple[Path, str]:
    """Resolve a single weight file; returns (local path, sha256).

    URLs are downloaded once into ``<cache>/files/<first 16 hex of the pin>/<name>`` and verified;
    a cached file that fails verification is deleted and reported (pitfall P6). A ``local-dir:``
    source must hold one of `folder_files`.

    Raises:
        WeightsError: with the file, where it was looked for, and how to supply it locally.
    """
    sha256 = check_pin(sha256, length=64, what=what)
    git_blob_sha1 = check_pin(git_blob_sha1, length=40, what=what)
    source = parse_source(spec)
    if source.kind == "hf-hub":
        folder = resolve_model_dir(spec, what=what, cache_dir=cache_dir, allow_patterns=[*folder_files, "*.json"])
        source = Source("local-dir", str(folder))
    if source.kind == "local-dir":
        folder = Path(source.location)
        for name in folder_files:
            if not _SAFE_NAME.match(name):  # a file name from a config must not climb out of the folder
                raise WeightsError(f"{what}: refusing file name {name!r} in {folder}; expected a plain file name")
            if (folder / name).is_file():
                path = folder / name
                break
        else:
            raise WeightsError(f"{what}: folder {folder} holds none of {list(folder_files)}")
        return path, verify_file(path, sha256=sha256, git_blob_sha1=git_blob_sha1, what=what)
    if source.kind == "file":
        path = Path(source.location)
        return path, verify_file(path, sha256=sha256, git_blob_sha1=git_blob_sha1, what=what)

    # URL: cache under the pin so that a silently replaced upstream file (pitfall P6) never
    # shadows the one we verified.
    url = source.location
    name = url_file_name(url)
    pin = (sha256 or git_blob_sha1 or hashlib.sha256(url.encode()).hexdigest())[:16]
    dest = cache_root(cache_dir) / "files" / pin / name
    _check_inside(dest, cache_root(cache_dir), what=what)
    if dest.is_file():
        try:
            return dest, verify_file(dest, sha256=sha256, git_blob_sha1=git_blob_sha1, what=what)
        except WeightsError as err:
            logger.warning("deleting cached file that fails verification: %s", err)
            dest.unlink(missing_ok=True)
    how = f"download it on a connected machine and pass the file path (or place it at {dest})"
    if is_offline():
        raise WeightsError(f"{what}: {name} is not cached at {dest} and offline mode is on; {how}")
    logger.info("downloading %s from %s", what, url)
    try:
        _download(url, dest)
    except Exception as err:  # urllib raises several unrelated types; all mean the same to the user
        raise WeightsError(f"{what}: cannot download {name} from {url} ({err}); {how}") from err
    try:
        digest = verify_file(dest, sha256=sha256, git_blob_sha1=git_blob_sha1, what=what)
    except WeightsError:
        dest.unlink(missing_ok=True)
        raise
    logger.info("%s: %s sha256=%s", what, dest, digest)
    return dest, digest


def resolve_model_dir(
    spec: str,
    *,
    what: str,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_patterns: Sequence[str] = ("*.json", "*.txt", "*.safetensors"),
) -> Path:
    """Resolve a transformers-style model folder (``config.json`` + safetensors).

    Raises:
        WeightsError: when the folder is missing or the hub download fails (offline, no network).
    """
    source = parse_source(spec)
    if source.kind == "local-dir":
        folder = Path(source.location)
        if not folder.is_dir():
            raise WeightsError(f"{what}: folder {folder} does not exist")
        return folder
    if source.kind != "hf-hub":
        raise WeightsError(f"{what}: '{spec}' is a single file; a model folder (hf-hub: or local-dir:) is needed")
    from huggingface_hub import snapshot_download  # deferred: import reads HF_HUB_OFFLINE

    try:
        path = snapshot_download(
            source.location,
            revision=source.revision,
            cache_dir=str(cache_root(cache_dir) / "hf"),
            allow_patterns=list(allow_patterns),
            local_files_only=is_offline(),
        )
    except Exception as err:  # hub errors come in many classes; the remedy is the same
        raise WeightsError(
            f"{what}: cannot get hub repository {source.location} into {cache_root(cache_dir) / 'hf'} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); on a connected machine run "
            f"`hf download {source.location}{f' --revision {source.revision}' if source.revision else ''} "
            f"--cache-dir {cache_root(cache_dir) / 'hf'}`, or pass local-dir:PATH to a folder with its "
            "config.json and model.safetensors"
        ) from err
    logger.info("%s: %s -> %s", what, source, path)
    return Path(path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint on CPU, safely: safetensors, or weights-only unpickling (pitfall P18).

    Raises:
        WeightsError: naming the file when it is unreadable, not a state dict, or unsafe to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file does not exist (or is not a regular file)")
    looks_like = sniff_not_checkpoint(path)
    if looks_like is not None:
        raise WeightsError(f"{path} is not a checkpoint (.pth/.safetensors): it looks like {looks_like}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            check_zip_checkpoint(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except pickle.UnpicklingError as err:
        # weights_only refused a global: the file asks to build Python objects (possibly to run code).
        raise WeightsError(
            f"{path}: not a loadable checkpoint: refused to unpickle ({describe_load_error(err)}); it holds "
            "Python objects besides "
            "tensors and may run code, so it is not loaded: get the weights from a trusted source or as .safetensors"
        ) from err
    except Exception as err:  # zip, storage and safetensors errors all mean "not a usable checkpoint"
        raise WeightsError(
            f"{path}: not a loadable checkpoint ({error_summary(err)}); re-download or re-export it") from err
    check_state_dict(state, origin=str(path))
    return dict(state)


def check_state_dict(state: object, *, origin: str) -> None:
    """Check that `state` is a flat ``{str: dense tensor}`` mapping.

    Raises:
        WeightsError: naming `origin` and the first offending key or type.
    """
    if not isinstance(state, dict):
        raise WeightsError(f"{origin}: expected a state dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"{origin}: state dict key {str(key)[:60]!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{origin}: expected a state dict of tensors, but {key[:80]!r} is a "
                               f"{type(value).__name__}")
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise WeightsError(f"{origin}: tensor {key[:80]!r} is not a plain dense tensor ({value.layout})")


def check_zip_checkpoint(path: Path) -> None:
    """Refuse a zip checkpoint whose entries claim far more bytes than the file holds (a zip bomb).

    Non-zip files (the legacy pickle format) pass; torch reads them itself.

    Raises:
        WeightsError: naming the file, the declared and the actual size.
    """
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise WeightsError(
            f"{path}: corrupt zip checkpoint ({error_summary(err)}); re-download or re-export it") from err
    if declared > max(_ZIP_SLACK * size, _ZIP_MIN_ALLOWANCE):
        raise WeightsError(f"{path}: zip checkpoint declares {declared} bytes of content in a {size}-byte file "
                           "(a zip bomb or a corrupt file); not loaded")
