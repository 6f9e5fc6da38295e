"""Label-map converters (method.md §5.2, §5.3, P9) on synthetic maps and synthetic COCO-format JSONs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino.data.benchmarks import get_benchmark
from talk2dino.data.coco_masks import coco_masks_to_stuffthingmap, write_stuffthingmaps
from talk2dino.data.convert_folders import convert_cityscapes, convert_coco_object, convert_coco_stuff, convert_context
from talk2dino.data.converters import (
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    COCO_THING_IDS,
    cityscapes_train_ids,
    coco_object_from_stuffthingmap,
    coco_stuff_train_ids,
    context_from_459,
    context_mapping,
    read_numbered_names_file,
)
from talk2dino.data.samples import read_label_png
from talk2dino.errors import InvalidInputError

# Written out independently of the module: COCO ids 1..90 minus the 10 ids that have no category.
UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
THING_IDS = [category_id for category_id in range(1, 91) if category_id not in UNUSED_THING_IDS]
STUFF_IDS = list(range(92, 183))


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def test_thing_ids() -> None:
    assert list(COCO_THING_IDS) == THING_IDS and len(THING_IDS) == 80


def test_coco_object_every_raw_value(caplog: pytest.LogCaptureFixture) -> None:
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every thing value, every stuff value, 255, the rest
    with caplog.at_level(logging.WARNING, logger="talk2dino.data.converters"):
        labels = coco_object_from_stuffthingmap(raw)
    assert labels.dtype == np.uint8 and labels.shape == raw.shape
    expected = np.zeros(256, dtype=np.uint8)
    for index, category_id in enumerate(THING_IDS):
        expected[category_id - 1] = index + 1
    np.testing.assert_array_equal(labels.ravel(), expected)
    names = get_benchmark("coco_object").class_names
    assert names[labels.ravel()[0]] == "person" and names[labels.ravel()[89]] == "toothbrush"
    assert names[labels.ravel()[12]] == "stop sign"  # id 13 follows the unused id 12
    assert labels.ravel()[11] == 0 and labels.ravel()[255] == 0  # unused thing id 12, unlabelled
    assert not labels.ravel()[91:182].any()  # every stuff value is background
    assert "11" in caplog.text  # unused thing ids are logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="talk2dino.data.converters"):
        coco_object_from_stuffthingmap(np.array([[0, 91, 255]], dtype=np.uint8), source="x.png")
    assert caplog.text == ""  # a clean raw map logs nothing


def test_coco_object_typical_map_and_errors() -> None:
    raw = np.array([[0, 91, 255], [89, 181, 2]], dtype=np.uint8)  # person, banner, unlabelled / toothbrush, wood, car
    np.testing.assert_array_equal(coco_object_from_stuffthingmap(raw), [[1, 0, 0], [80, 0, 3]])
    with pytest.raises(InvalidInputError, match=r"\[0, 255\]"):
        coco_object_from_stuffthingmap(np.array([[0, 300]], dtype=np.int64))
    with pytest.raises(InvalidInputError, match="integer"):
        coco_object_from_stuffthingmap(np.zeros((2, 2), dtype=np.float32))


def test_coco_stuff_train_ids() -> None:
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    train = coco_stuff_train_ids(raw).ravel()
    expected = np.full(256, 255, dtype=np.uint8)
    for train_id, category_id in enumerate(THING_IDS + STUFF_IDS):
        expected[category_id - 1] = train_id
    np.testing.assert_array_equal(train, expected)
    assert train[0] == 0 and train[89] == 79 and train[91] == 80 and train[181] == 170
    assert train[11] == 255 and train[90] == 255 and train[200] == 255 and train[255] == 255
    names = get_benchmark("coco_stuff").class_names
    assert names[train[91]] == "banner" and names[train[177]] == "water-other" and names[train[181]] == "wood"


def test_cityscapes_train_ids() -> None:
    ids = np.array([list(range(0, 34)) + [34, 100, 255, -1]], dtype=np.int64)
    train = cityscapes_train_ids(ids)
    expected = [255] * 38
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                               25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}.items():
        expected[label_id] = train_id
    np.testing.assert_array_equal(train[0], expected)
    assert len(CITYSCAPES_LABEL_TO_TRAIN_ID) == 19
    names = get_benchmark("cityscapes").class_names
    assert names[train[0, 26]] == "car" and names[train[0, 32]] == "motorcycle"
    with pytest.raises(InvalidInputError):
        cityscapes_train_ids(np.array([[256]]))


def test_convert_coco_object_and_stuff_commands(tmp_path: Path) -> None:
    folder = tmp_path / "annotations" / "val2017"
    _png(folder / "000000000139.png", np.array([[0, 91], [255, 89]], dtype=np.uint8))
    _png(folder / "000000000285.png", np.array([[2, 2], [181, 11]], dtype=np.uint8))
    _png(folder / "000000000285_labelTrainIds.png", np.array([[7, 7], [7, 7]], dtype=np.uint8))  # never read as raw
    counts = convert_coco_object(folder)
    assert (counts.written, counts.skipped) == (2, 0)
    np.testing.assert_array_equal(read_label_png(folder / "000000000139_instanceTrainIds.png"), [[1, 0], [0, 80]])
    np.testing.assert_array_equal(read_label_png(folder / "000000000285_instanceTrainIds.png"), [[3, 3], [0, 0]])
    assert not (folder / "000000000285_labelTrainIds_instanceTrainIds.png").exists()
    again = convert_coco_object(folder)  # resumable: existing outputs are kept
    assert (again.written, again.skipped) == (0, 2)
    assert convert_coco_object(folder, overwrite=True).written == 2
    out = tmp_path / "stuff_out"
    stuff = convert_coco_stuff(folder, out)
    assert stuff.written == 2
    np.testing.assert_array_equal(read_label_png(out / "000000000139_labelTrainIds.png"), [[0, 80], [255, 79]])
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_convert_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="stuffthingmaps folder not found"):
        convert_coco_object(tmp_path / "missing")
    folder = tmp_path / "converted_only"
    _png(folder / "000000000139_labelTrainIds.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match="no raw stuffthingmaps.*only converted"):
        convert_coco_object(folder)
    _png(folder / "000000000001.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match=r"000000000001\.png: label map has mode 'RGB'"):
        convert_coco_stuff(folder)


def test_convert_cityscapes(tmp_path: Path) -> None:
    gtfine = tmp_path / "cityscapes" / "gtFine"
    source = _png(gtfine / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png",
                  np.array([[7, 26], [0, 33]], dtype=np.uint8))
    _png(gtfine / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.array([[24]], dtype=np.uint8))
    counts = convert_cityscapes(gtfine)
    assert (counts.written, counts.skipped) == (2, 0)
    output = source.with_name("frankfurt_000000_000294_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(read_label_png(output), [[0, 13], [255, 18]])
    assert convert_cityscapes(gtfine / "val").skipped == 1
    with pytest.raises(InvalidInputError, match="gtFine folder not found"):
        convert_cityscapes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"no \*_gtFine_labelIds\.png"):
        convert_cityscapes(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------
# PASCAL-Context
# ------------------------------------------------------------------------------------------------------------


def _labels_txt(path: Path) -> dict[str, int]:
    """A 459-style names file: the 59 Context classes at scattered ids, among other classes."""
    names = list(get_benchmark("context59").class_names)
    others = ["accordion", "airconditioner", "antenna", "diningtable", "zebra"]
    everything = sorted(names + others)
    ids = {name: index * 2 + 1 for index, name in enumerate(everything)}  # 1, 3, 5, ...
    path.write_text("".join(f"{class_id}: {name}\n" for name, class_id in ids.items()))
    return ids


def test_context_mapping_matches_names(tmp_path: Path) -> None:
    ids = _labels_txt(tmp_path / "labels.txt")
    names459 = read_numbered_names_file(tmp_path / "labels.txt")
    table = context_mapping(names459)
    context = get_benchmark("context60").class_names
    label459 = np.array([[0, ids["aeroplane"], ids["wood"]], [ids["zebra"], ids["table"], ids["diningtable"]]])
    labels = context_from_459(label459, table)
    assert labels.dtype == np.uint8
    assert [context[value] for value in labels.ravel()] == [
        "background", "aeroplane", "wood", "background", "table", "background"]
    with pytest.raises(InvalidInputError, match="outside"):
        context_from_459(np.array([[10_000]]), table)
    del names459[ids["sofa"]]
    with pytest.raises(InvalidInputError, match="lacks 1 of the 59.*sofa"):
        context_mapping(names459)
    (tmp_path / "spaces.txt").write_text("1 accordion\n2:  aeroplane \n")
    assert read_numbered_names_file(tmp_path / "spaces.txt") == {1: "accordion", 2: "aeroplane"}
    (tmp_path / "bad.txt").write_text("1: accordion\naeroplane\n")
    with pytest.raises(InvalidInputError, match=r"bad\.txt:2"):
        read_numbered_names_file(tmp_path / "bad.txt")


def test_convert_context(tmp_path: Path) -> None:
    ids = _labels_txt(tmp_path / "labels.txt")
    trainval = tmp_path / "trainval"
    _png(trainval / "2008_000002.png", np.array([[ids["sky"], ids["zebra"]], [0, ids["wood"]]], dtype=np.uint16))
    _png(trainval / "2008_000003.png", np.array([[ids["bag"]]], dtype=np.uint16))
    voc2010 = tmp_path / "VOCdevkit" / "VOC2010"
    (voc2010 / "ImageSets" / "Main").mkdir(parents=True)
    (voc2010 / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n2008_000099\n")
    pytest.importorskip("scipy", reason="scipy reads the official .mat annotations")
    from scipy.io import savemat

    trainval.mkdir(exist_ok=True)
    savemat(trainval / "2008_000004.mat", {"LabelMap": np.array([[ids["cat"], ids["dog"]]], dtype=np.uint16)})

    counts = convert_context(trainval, tmp_path / "labels.txt", voc2010)
    assert (counts.written, counts.skipped) == (3, 0)
    context = get_benchmark("context60").class_names
    out = voc2010 / "SegmentationClassContext"
    two = read_label_png(out / "2008_000002.png")
    assert [context[value] for value in two.ravel()] == ["sky", "background", "background", "wood"]
    four = read_label_png(out / "2008_000004.png")
    assert [context[value] for value in four.ravel()] == ["cat", "dog"]
    split = voc2010 / "ImageSets" / "SegmentationContext" / "val.txt"
    assert split.read_text() == "2008_000002\n"  # VOC2010 val images that have a map
    assert convert_context(trainval, tmp_path / "labels.txt", voc2010).skipped == 3


def test_convert_context_says_which_files_are_needed(tmp_path: Path) -> None:
    voc2010 = tmp_path / "VOC2010"
    voc2010.mkdir()
    with pytest.raises(InvalidInputError, match="trainval.tar.gz.*labels.txt.*trainval_merged.json"):
        convert_context(tmp_path / "trainval", tmp_path / "labels.txt", voc2010)
    (tmp_path / "trainval").mkdir()
    with pytest.raises(InvalidInputError, match=r"labels\.txt: names file not found.*trainval.tar.gz"):
        convert_context(tmp_path / "trainval", tmp_path / "labels.txt", voc2010)
    _labels_txt(tmp_path / "labels.txt")
    with pytest.raises(InvalidInputError, match=r"no \.mat.*trainval.tar.gz"):
        convert_context(tmp_path / "trainval", tmp_path / "labels.txt", voc2010)


# ------------------------------------------------------------------------------------------------------------
# COCO JSON masks (pycocotools)
# ------------------------------------------------------------------------------------------------------------


def _coco_json(mask_api) -> dict:
    height, width = 6, 8
    stuff = np.zeros((height, width), dtype=np.uint8, order="F")
    stuff[:, 4:] = 1  # right half: banner (id 92, raw 91), compressed RLE
    rle = mask_api.encode(np.asfortranarray(stuff))
    rle["counts"] = rle["counts"].decode("ascii")
    # Uncompressed RLE (column-major run lengths): 6 zeros, then 2 ones -> rows 0-1 of column 1: car (id 3).
    uncompressed = {"size": [height, width], "counts": [6, 2, 40]}
    return {
        "images": [{"id": 139, "height": height, "width": width, "file_name": "000000000139.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 92, "segmentation": rle, "iscrowd": 0},
            # A rectangle polygon over columns 1-5, rows 1-3: person (id 1, raw 0), painted over the banner.
            {"id": 2, "image_id": 139, "category_id": 1, "iscrowd": 0,
             "segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 3.0, 1.0, 3.0]]},
            {"id": 3, "image_id": 139, "category_id": 3, "segmentation": uncompressed, "iscrowd": 1},
            {"id": 4, "image_id": 139, "category_id": 183, "segmentation": [[0, 0, 8, 0, 8, 6, 0, 6]]},  # 'other'
        ],
    }


# pycocotools 2.0.x decodes through a numpy-2-deprecated __array__ path; harmless, and not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_masks_to_stuffthingmap(tmp_path: Path) -> None:
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is in the eval extra")
    coco = _coco_json(mask_api)
    raw = coco_masks_to_stuffthingmap(coco, 139)
    assert raw.shape == (6, 8) and raw.dtype == np.uint8
    polygon = np.asarray(mask_api.decode(mask_api.merge(mask_api.frPyObjects(
        coco["annotations"][1]["segmentation"], 6, 8))), dtype=bool)
    assert polygon[2, 2] and polygon[2, 4] and not polygon[5, 0] and not polygon[0, 7]
    expected = np.full((6, 8), 255, dtype=np.uint8)
    expected[:, 4:] = 91  # banner
    expected[polygon] = 0  # person over banner: later annotations win
    expected[0:2, 1] = 2  # car, uncompressed RLE; 'other' (183) is skipped
    np.testing.assert_array_equal(raw, expected)
    labels = coco_object_from_stuffthingmap(raw)
    assert set(np.unique(labels).tolist()) == {0, 1, 3}  # background (stuff + unlabelled), person, car

    path = tmp_path / "instances.json"
    import json

    path.write_text(json.dumps(coco))
    counts = write_stuffthingmaps([path], tmp_path / "out")
    assert counts.written == 1
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "000000000139.png"), expected)
    converted = convert_coco_object(tmp_path / "out")
    assert converted.written == 1
    with pytest.raises(InvalidInputError, match="not 9x9|is 8x6"):
        coco_masks_to_stuffthingmap(coco, 139, 9, 9)
    with pytest.raises(InvalidInputError, match="pass height and width"):
        coco_masks_to_stuffthingmap(coco, 1)
    with pytest.raises(InvalidInputError, match="COCO JSON not found"):
        coco_masks_to_stuffthingmap(tmp_path / "missing.json", 139)
