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
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from talk2dino.errors import WeightsError
from talk2dino.fileio import atomic_path, file_sha256

logger = logging.getLogger(__name__)

SourceKind = Literal["hf-hub", "local-dir", "url", "file"]
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_TRUE = {"1", "true", "yes", "on"}


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
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise WeightsError(f"bad hub id in '{spec}': expected hf-hub:ORG/REPO[@REVISION]")
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
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"{what}: {path} has sha256 {digest}, expected {sha256}")
    if sha256 is None and git_blob_sha1 is not None:
        blob = file_git_blob_sha1(path)
        if blob != git_blob_sha1.lower():
            raise WeightsError(f"{what}: {path} has git blob sha1 {blob}, expected {git_blob_sha1}")
    return digest


def _download(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream `url` into `dest` atomically (a partial download never takes the final name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, durable=True) as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        shutil.copyfileobj(response, out, length=1 << 20)


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
    source = parse_source(spec)
    if source.kind == "hf-hub":
        folder = resolve_model_dir(spec, what=what, cache_dir=cache_dir, allow_patterns=[*folder_files, "*.json"])
        source = Source("local-dir", str(folder))
    if source.kind == "local-dir":
        folder = Path(source.location)
        for name in folder_files:
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
    name = url.rstrip("/").rsplit("/", 1)[-1] or "weights.bin"
    pin = (sha256 or git_blob_sha1 or hashlib.sha256(url.encode()).hexdigest())[:16]
    dest = cache_root(cache_dir) / "files" / pin / name
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
            f"`huggingface-cli download {source.location}` with the same cache, or pass local-dir:PATH to a "
            "folder with its config.json and model.safetensors"
        ) from err
    logger.info("%s: %s -> %s", what, source, path)
    return Path(path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint on CPU, safely: safetensors, or weights-only unpickling (pitfall P18).

    Raises:
        WeightsError: naming the file when it is unreadable, not a state dict, or unsafe to unpickle.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors all mean "not a usable checkpoint"
        raise WeightsError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)
