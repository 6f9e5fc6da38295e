"""Property tests of extracted features: ``read_shard``, ``read_manifest``, ``load_features``, ``iter_shards``.

Any shard bytes, tensor dict or manifest either loads consistently or is refused with a one-line
``FeatureFormatError``; a manifest entry can never make the loader open a file outside the features folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_corpus import caption_tensors, image_tensors, manifest  # noqa: E402
from parser_fuzz_support import json_strategies, mutate, outcome  # noqa: E402

from talk2dino.data.features import (  # noqa: E402
    CAPTION_KEYS,
    IMAGE_KEYS,
    FeatureFormatError,
    FeatureSet,
    iter_shards,
    load_features,
    read_manifest,
    read_shard,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID_IMAGES = save(image_tensors())
VALID_CAPTIONS = save(caption_tensors([1, 2]))
DTYPES = [torch.int64, torch.int32, torch.float16, torch.float32, torch.bfloat16, torch.bool, torch.uint8]
JSON_SCALARS, JSON = json_strategies(
    ["../../etc/passwd", "/etc/passwd", "images-000-00000.safetensors", "a\x00"], max_size=3, max_leaves=10)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shards")


@SETTINGS
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6), cut=st.none() | st.floats(0, 1),
       captions=st.booleans())
def test_mutated_shards(scratch: Path, edits: list[tuple[float, int]], cut: float | None, captions: bool) -> None:
    path = scratch / "shard.safetensors"
    keys = CAPTION_KEYS if captions else IMAGE_KEYS
    path.write_bytes(mutate(VALID_CAPTIONS if captions else VALID_IMAGES, edits, cut))
    tensors = outcome(lambda: read_shard(path, keys))
    if not isinstance(tensors, FeatureFormatError):
        assert len({int(tensors[k].shape[0]) for k in keys}) == 1


@SETTINGS
@given(shapes=st.dictionaries(st.sampled_from(sorted(set(IMAGE_KEYS) | {"extra"})),
                              st.tuples(st.lists(st.integers(0, 3), max_size=4), st.sampled_from(DTYPES)),
                              max_size=5))
def test_tensor_dicts(scratch: Path, shapes: dict[str, tuple[list[int], torch.dtype]]) -> None:
    path = scratch / "dict.safetensors"
    path.write_bytes(save({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}))
    tensors = outcome(lambda: read_shard(path, IMAGE_KEYS))
    if not isinstance(tensors, FeatureFormatError):
        assert tensors["image_ids"].dtype == torch.int64 and tensors["heads"].ndim == 3


def _write_folder(folder: Path, manifest_bytes: bytes) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "images-000-00000.safetensors").write_bytes(VALID_IMAGES)
    (folder / "captions-000-00000.safetensors").write_bytes(VALID_CAPTIONS)
    (folder / "manifest.json").write_bytes(manifest_bytes)


def _load_both(folder: Path) -> None:
    features = outcome(lambda: load_features(folder))
    streamed = outcome(lambda: list(iter_shards(folder)))
    if not isinstance(features, FeatureFormatError):
        assert isinstance(features, FeatureSet)
        assert features.caption_image.max() < features.image_ids.shape[0]
    if not isinstance(streamed, FeatureFormatError):
        assert streamed


@SETTINGS
@given(doc=JSON | st.builds(lambda extra: json.loads(manifest([("images-000-00000.safetensors", VALID_IMAGES)],
                                                              [("captions-000-00000.safetensors", VALID_CAPTIONS)]))
                            | extra, st.dictionaries(st.sampled_from(["format", "complete", "backbone", "image_shards",
                                                                      "caption_shards"]), JSON, max_size=2)))
def test_manifests(scratch: Path, doc: Any) -> None:
    folder = scratch / "features"
    _write_folder(folder, json.dumps(doc).encode())
    outcome(lambda: read_manifest(folder))
    _load_both(folder)


@SETTINGS
@given(name=st.text(max_size=20) | st.sampled_from(["../secret.safetensors", "/etc/passwd", "..", ".", "",
                                                     "sub/../../secret.safetensors", "./images-000-00000.safetensors",
                                                     "//etc/passwd", "\x00", "images-000-00000.safetensors/"]),
       which=st.sampled_from(["image_shards", "caption_shards"]))
def test_entry_names_never_escape(scratch: Path, name: str, which: str, monkeypatch_module: list[Path]) -> None:
    """Whatever the ``file`` of an entry, no path outside the folder is ever read."""
    folder = scratch / "escape" / "features"
    images = [("images-000-00000.safetensors", VALID_IMAGES)]
    captions = [("captions-000-00000.safetensors", VALID_CAPTIONS)]
    doc = json.loads(manifest(images, captions))
    doc[which][0]["file"] = name
    doc[which][0].pop("sha256")
    _write_folder(folder, json.dumps(doc).encode())
    (folder.parent / "secret.safetensors").write_bytes(VALID_IMAGES if which == "image_shards" else VALID_CAPTIONS)
    monkeypatch_module.clear()
    _load_both(folder)
    root = folder.resolve()
    for read in monkeypatch_module:
        assert read.resolve() == root or root in read.resolve().parents, read


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    """Records every path the shard reader opens."""
    opened: list[Path] = []
    original = Path.read_bytes

    def spy(self: Path) -> bytes:
        opened.append(self)
        return original(self)

    patch = pytest.MonkeyPatch()
    patch.setattr(Path, "read_bytes", spy)
    yield opened
    patch.undo()


def test_valid_folder_loads(scratch: Path) -> None:
    folder = scratch / "valid"
    _write_folder(folder, manifest([("images-000-00000.safetensors", VALID_IMAGES)],
                                   [("captions-000-00000.safetensors", VALID_CAPTIONS)]))
    features = load_features(folder)
    assert features.image_ids.tolist() == [1, 2] and features.caption_image.tolist() == [0, 1]
    assert len(list(iter_shards(folder))) == 1
    assert hashlib.sha256(VALID_IMAGES).hexdigest() in (folder / "manifest.json").read_text()
