"""Property tests of dataset input: class-names files, label-map PNGs, dataset folders and COCO JSON.

Each parser either returns a valid result or refuses with a one-line ``InvalidInputError``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parser_fuzz_support import json_strategies, mutate, outcome  # noqa: E402

from talk2dino.data.benchmarks import folder_benchmark, read_class_names_file  # noqa: E402
from talk2dino.data.coco_masks import CocoStuffThingPainter  # noqa: E402
from talk2dino.data.converters import read_numbered_names_file  # noqa: E402
from talk2dino.data.samples import list_samples, load_label, read_label_png  # noqa: E402
from talk2dino.errors import InvalidInputError  # noqa: E402
from talk2dino.extract.coco import read_coco_captions  # noqa: E402

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_SCALARS, JSON = json_strategies(
    ["../x.jpg", "/abs.jpg", "a\x00b", "", "a.jpg"], max_size=4, max_leaves=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_class_names_files(scratch: Path, data: bytes) -> None:
    path = scratch / "classes.txt"
    path.write_bytes(data)
    names = outcome(lambda: read_class_names_file(path))
    if not isinstance(names, InvalidInputError):
        assert isinstance(names, tuple) and names and all(isinstance(n, str) and n.strip() for n in names)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_numbered_names_files(scratch: Path, data: bytes) -> None:
    path = scratch / "labels459.txt"
    path.write_bytes(data)
    names = outcome(lambda: read_numbered_names_file(path))
    if not isinstance(names, InvalidInputError):
        assert names and all(isinstance(k, int) and k >= 0 for k in names)


def _png(values: np.ndarray, mode: str | None) -> bytes:
    image = Image.fromarray(values)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@SETTINGS
@given(values=st.integers(0, 300), mode=st.sampled_from([None, "P", "L", "RGB", "LA", "RGBA", "1"]),
       sixteen=st.booleans(), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.floats(0, 1), reduce_zero=st.booleans())
def test_label_maps(scratch: Path, values: int, mode: str | None, sixteen: bool, edits: list[tuple[float, int]],
                    cut: float | None, reduce_zero: bool) -> None:
    array = (np.arange(20).reshape(4, 5) * values % (65536 if sixteen else 256)).astype(
        np.uint16 if sixteen else np.uint8)
    data = mutate(_png(array, None if sixteen else mode), edits, cut)
    path = scratch / "label.png"
    path.write_bytes(data)
    classes = scratch / "classes3.txt"
    classes.write_text("a\nb\nc\n", encoding="utf-8")
    spec = folder_benchmark(scratch, classes, reduce_zero_label=reduce_zero)
    raw = outcome(lambda: read_label_png(path))
    label = outcome(lambda: load_label(path, spec))
    if not isinstance(raw, InvalidInputError):
        assert raw.ndim == 2 and raw.dtype == np.int64
    if not isinstance(label, InvalidInputError):
        assert label.ndim == 2 and label.dtype == np.int64
        assert bool((((label >= 0) & (label < 3)) | (label == spec.ignore_index)).all())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.none() | st.lists(st.text(max_size=10) | st.sampled_from(["a", "b", "../a", "/a", "a\x00"]),
                                  max_size=5),
       images=st.lists(st.sampled_from(["a.png", "b.jpg", "a.jpg", "c.JPEG", ".h.png", "d.txt", "e.png"]),
                       max_size=4, unique=True),
       labels=st.lists(st.sampled_from(["a.png", "b.png", "c.png", "e.png"]), max_size=4, unique=True),
       suffix=st.none() | st.sampled_from([".png", ".jpg", ""]))
def test_dataset_folders(scratch: Path, split: list[str] | None, images: list[str], labels: list[str],
                         suffix: str | None) -> None:
    root = scratch / "dataset"
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in images:
        (root / "images" / name).write_bytes(b"")
    for name in labels:
        (root / "labels" / name).write_bytes(b"")
    (root / "classes.txt").write_text("x\ny\n", encoding="utf-8")
    if split is not None:
        (root / "split.txt").write_text("\n".join(split), encoding="utf-8", errors="surrogatepass")
    spec = folder_benchmark(root, root / "classes.txt", image_suffix=suffix or None,
                            split_file="split.txt" if split is not None else None)
    samples = outcome(lambda: list_samples(spec, root))
    if not isinstance(samples, InvalidInputError):
        assert samples and [s.name for s in samples] == sorted(s.name for s in samples)
        for sample in samples:
            assert sample.image.is_file() and sample.label.is_file()
            assert root.resolve() in sample.image.resolve().parents


def _coco_doc(images: Any, annotations: Any) -> dict[str, Any]:
    return {"images": images, "annotations": annotations}


CAPTION_IMAGE = st.fixed_dictionaries({"id": JSON_SCALARS, "file_name": JSON_SCALARS}) | JSON
CAPTION = st.fixed_dictionaries({"id": JSON_SCALARS, "image_id": JSON_SCALARS, "caption": JSON_SCALARS}) | JSON
GOOD_IMAGE = st.builds(lambda i: {"id": i, "file_name": f"{i}.jpg"}, st.integers(0, 5))
GOOD_CAPTION = st.builds(lambda i, j, t: {"id": i, "image_id": j, "caption": t}, st.integers(0, 9),
                         st.integers(0, 6), st.text(max_size=5))


@SETTINGS
@given(doc=st.builds(_coco_doc, st.lists(CAPTION_IMAGE | GOOD_IMAGE, max_size=4) | JSON,
                     st.lists(CAPTION | GOOD_CAPTION, max_size=4) | JSON) | JSON,
       limit=st.none() | st.integers(1, 3))
def test_coco_captions_json(scratch: Path, doc: Any, limit: int | None) -> None:
    root = scratch / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(doc), encoding="utf-8")
    result = outcome(lambda: read_coco_captions(root, "val", limit=limit))
    if not isinstance(result, InvalidInputError):
        ids = [image.image_id for image in result.images]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for image in result.images:
            assert (root / "val2014").resolve() in image.path.resolve().parents


@SETTINGS
@given(data=st.binary(max_size=120))
def test_coco_captions_raw_bytes(scratch: Path, data: bytes) -> None:
    root = scratch / "coco-bytes"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_bytes(data)
    outcome(lambda: read_coco_captions(root, "val"))


INSTANCE_IMAGE = st.fixed_dictionaries({"id": JSON_SCALARS, "height": JSON_SCALARS, "width": JSON_SCALARS}) | JSON
INSTANCE = st.fixed_dictionaries({"image_id": JSON_SCALARS, "category_id": JSON_SCALARS,
                                  "segmentation": JSON}) | JSON


@SETTINGS
@given(doc=st.builds(_coco_doc, st.lists(INSTANCE_IMAGE, max_size=3) | JSON, st.lists(INSTANCE, max_size=3) | JSON)
       | JSON)
def test_coco_instances_json(scratch: Path, monkeypatch_module: pytest.MonkeyPatch, doc: Any) -> None:
    path = scratch / "instances.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    painter = outcome(lambda: CocoStuffThingPainter(path))
    if not isinstance(painter, InvalidInputError):
        assert all(isinstance(i, int) for i in painter.image_ids)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    # Indexing the JSON needs no mask API; a stub keeps the test independent of pycocotools being installed.
    patch = pytest.MonkeyPatch()
    patch.setattr("talk2dino.data.coco_masks._mask_api", lambda: object())
    yield patch
    patch.undo()


# --- issue 14: duplicate keys and ids in COCO captions ------------------------------------------------------

def _with_duplicate(doc: Any, rng_path: list[int]) -> tuple[str, str] | None:
    """`doc` as JSON text with one object's first key written a second time (the object chosen by walking
    `rng_path` through the containers); (text, key), or None when the walk meets no object with a key."""
    node, steps = doc, iter(rng_path)
    target = None
    while isinstance(node, (dict, list)) and node:
        if isinstance(node, dict):
            target = node
        children = list(node.values()) if isinstance(node, dict) else node
        node = children[next(steps, 0) % len(children)]
    if target is None:
        return None
    key = next(iter(target))
    marker = "\x00DUP\x00"
    target[marker] = None  # placeholder, replaced below by the repeated key
    text = json.dumps(doc).replace(json.dumps(marker), json.dumps(key))
    del target[marker]
    return text, key


@SETTINGS
@given(images=st.lists(GOOD_IMAGE, min_size=1, max_size=3, unique_by=lambda i: i["id"]),
       captions=st.lists(GOOD_CAPTION, min_size=1, max_size=3, unique_by=lambda c: c["id"]),
       path=st.lists(st.integers(0, 5), max_size=4))
def test_coco_key_given_twice_is_refused(scratch: Path, images: list[Any], captions: list[Any],
                                         path: list[int]) -> None:
    """Any object of a COCO captions file (top level, an image, a caption) naming a key twice is refused,
    naming the key and the file, instead of json's silent last-one-wins."""
    made = _with_duplicate(_coco_doc(images, captions), path)
    assert made is not None
    text, key = made
    root = scratch / "coco-dup"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(root, "val")
    message = str(info.value)
    assert "\n" not in message and "captions_val2014.json" in message and f"duplicate key '{key}'" in message


@SETTINGS
@given(image_id=st.integers(-(2**70), 2**70) | st.sampled_from([0, 2**63 - 1, 2**63, -1]),
       caption_id=st.integers(-(2**70), 2**70) | st.sampled_from([0, 2**63 - 1, 2**63, -1]))
def test_coco_ids_load_exactly_in_int64_range(scratch: Path, image_id: int, caption_id: int) -> None:
    """Ids are accepted iff 0 <= id < 2**63, when the JSON is read (not when the first shard is written)."""
    root = scratch / "coco-ids"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    doc = _coco_doc([{"id": image_id, "file_name": "a.jpg"}],
                    [{"id": caption_id, "image_id": image_id, "caption": "a cat"}])
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(doc), encoding="utf-8")
    result = outcome(lambda: read_coco_captions(root, "val"))
    valid = 0 <= image_id < 2**63 and 0 <= caption_id < 2**63
    assert isinstance(result, InvalidInputError) != valid, (image_id, caption_id, result)
    if valid:
        assert result.images[0].image_id == image_id and result.num_captions == 1
    else:
        assert "outside [0, 2**63)" in str(result)
