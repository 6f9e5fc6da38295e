"""Benchmark layouts (method.md §5.1, §5.2): tiny fixtures with the real folder and file naming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino.data.benchmarks import (
    BENCHMARKS,
    FOLDER_IMAGE_SUFFIXES,
    Sample,
    class_lists,
    dataset_root,
    folder_benchmark,
    get_benchmark,
    read_class_names_file,
)
from talk2dino.data.samples import check_sample, list_samples, load_label, load_sample
from talk2dino.errors import InvalidInputError
from talk2dino.render import palette

HEIGHT, WIDTH = 6, 8
METHOD_MD = Path(__file__).resolve().parents[2] / "shared" / "docs" / "method.md"


def _jpg(path: Path, height: int = HEIGHT, width: int = WIDTH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _rgb_png(path: Path, height: int = HEIGHT, width: int = WIDTH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)
    return path


def _label(path: Path, values: list[int] | np.ndarray, *, mode: str = "L") -> Path:
    """A label PNG whose pixels cycle through ``values`` ('P' = VOC palette PNG, 'I;16' = 16-bit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.resize(np.asarray(values), (HEIGHT, WIDTH))
    if mode == "I;16":
        Image.fromarray(array.astype(np.uint16)).save(path)
        return path
    image = Image.fromarray(array.astype(np.uint8))
    if mode == "P":
        image.putpalette(palette(256).tobytes())
    image.save(path)
    return path


def _pixels(values: list[int]) -> np.ndarray:
    return np.resize(np.asarray(values, dtype=np.int64), (HEIGHT, WIDTH))


# ------------------------------------------------------------------------------------------------------------
# Class lists
# ------------------------------------------------------------------------------------------------------------


def test_class_counts_and_verbatim_names() -> None:
    counts = {name: spec.num_classes for name, spec in BENCHMARKS.items()}
    assert counts == {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "coco_stuff": 171,
                      "coco_object": 81, "cityscapes": 19, "ade20k": 150}
    lists = class_lists()
    assert {key: len(names) for key, names in lists.items()} == {
        "voc21": 21, "context60": 60, "coco_object": 81, "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}
    ade = get_benchmark("ade20k").class_names
    assert ade[7] == "bed " and "windowpane" in ade  # trailing space kept (P25)
    voc = get_benchmark("voc21").class_names
    assert voc[0] == "background" and {"diningtable", "pottedplant", "tvmonitor"} <= set(voc)
    assert get_benchmark("voc20").class_names == voc[1:]
    assert {"water-other", "window-blind"} <= set(get_benchmark("coco_stuff").class_names)
    assert get_benchmark("coco_stuff").class_names[:80] == get_benchmark("coco_object").class_names[1:]
    assert get_benchmark("coco_stuff").class_names[80] == "banner"
    assert get_benchmark("coco_stuff").class_names[-1] == "wood"
    assert get_benchmark("context59").class_names == get_benchmark("context60").class_names[1:]


def test_context_names_follow_mmsegmentation_label_order() -> None:
    # mmsegmentation's converter numbers the 59 classes by their sorted 459-class ids, i.e. alphabetically.
    context = get_benchmark("context60").class_names
    assert context[0] == "background"
    assert list(context[1:]) == sorted(context[1:])
    assert context[1:4] == ("aeroplane", "bag", "bed") and "table" in context and "bedclothes" in context


@pytest.mark.skipif(not METHOD_MD.is_file(), reason="method.md not available")
def test_class_strings_equal_appendix_a() -> None:
    import ast
    import re

    text = METHOD_MD.read_text(encoding="utf-8")
    appendix = text[text.index("## Appendix A"):]
    blocks = [ast.literal_eval(f"[{block}]") for block in re.findall(r"`('.*?')`", appendix, flags=re.S)]
    voc21, context60, coco_object, stuff, cityscapes, ade20k = (block for block in blocks if len(block) > 1)
    lists = class_lists()
    assert list(lists["voc21"]) == voc21
    assert list(lists["coco_object"]) == coco_object
    assert list(lists["coco_stuff"]) == coco_object[1:] + stuff
    assert list(lists["cityscapes"]) == cityscapes
    assert list(lists["ade20k"]) == ade20k
    assert sorted(lists["context60"]) == sorted(context60)  # same strings; label order: see the test above


def test_benchmark_flags_match_the_protocol_table() -> None:
    table = {  # name: (tag, background, reduce_zero_label, cleaning, images)
        "voc20": ("V20", False, True, False, 1449), "voc21": ("V21", True, False, True, 1449),
        "context59": ("C59", False, True, False, 5105), "context60": ("C60", True, False, False, 5105),
        "coco_stuff": ("Stuff", False, False, False, 5000), "coco_object": ("Obj", True, False, True, 5000),
        "cityscapes": ("City", False, False, False, 500), "ade20k": ("ADE", False, True, False, 2000),
    }
    for name, (tag, background, reduce, clean, images) in table.items():
        spec = BENCHMARKS[name]
        assert (spec.tag, spec.background, spec.reduce_zero_label, spec.bg_clean, spec.num_images) == (
            tag, background, reduce, clean, images), name
        assert spec.ignore_index == 255
        assert spec.vocabulary == (spec.class_names[1:] if background else spec.class_names)
        if background:
            assert spec.class_names[0] == "background"


def test_unknown_benchmark_lists_names() -> None:
    with pytest.raises(InvalidInputError, match="voc21.*ade20k"):
        get_benchmark("pascal")


def test_classes_json_is_packaged_data() -> None:
    from importlib import resources

    data = json.loads(resources.files("talk2dino").joinpath("assets/classes.json").read_text(encoding="utf-8"))
    assert set(data) == {"voc21", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k"}


# ------------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------------


def test_voc_layout_split_pairing_and_palette_indices(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000033", "2007_000042", "2008_000001"):
        _jpg(voc / "JPEGImages" / f"{stem}.jpg")
    _label(voc / "SegmentationClass" / "2007_000033.png", [0, 1, 15, 20, 255], mode="P")
    _label(voc / "SegmentationClass" / "2007_000042.png", [0, 0, 255], mode="P")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n2007_000033\n\n")

    spec21, spec20 = get_benchmark("voc21"), get_benchmark("voc20")
    assert dataset_root(spec21, tmp_path) == voc
    samples = list_samples(spec21, voc)
    assert [sample.name for sample in samples] == ["2007_000033", "2007_000042"]  # sorted; 2008 not in split
    assert samples[0] == Sample("2007_000033", voc / "JPEGImages" / "2007_000033.jpg",
                                voc / "SegmentationClass" / "2007_000033.png")
    # Palette PNG: the indices, not the colours.
    np.testing.assert_array_equal(load_label(samples[0].label, spec21), _pixels([0, 1, 15, 20, 255]))
    # VOC-20: reduce_zero_label (0 -> 255, 255 stays, v -> v - 1).
    assert list_samples(spec20, voc) == samples
    reduced = load_label(samples[0].label, spec20)
    assert reduced.dtype == np.int64
    np.testing.assert_array_equal(reduced, _pixels([255, 0, 14, 19, 255]))
    image, label = load_sample(samples[0], spec21)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8 and label.shape == (HEIGHT, WIDTH)


def test_context_layout(tmp_path: Path) -> None:
    context = tmp_path / "VOCdevkit" / "VOC2010"
    _jpg(context / "JPEGImages" / "2008_000002.jpg")
    _label(context / "SegmentationClassContext" / "2008_000002.png", [0, 1, 59, 30])
    (context / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (context / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    spec60, spec59 = get_benchmark("context60"), get_benchmark("context59")
    samples = list_samples(spec60, dataset_root(spec60, tmp_path))
    assert [sample.name for sample in samples] == ["2008_000002"]
    np.testing.assert_array_equal(load_label(samples[0].label, spec60), _pixels([0, 1, 59, 30]))
    np.testing.assert_array_equal(load_label(samples[0].label, spec59), _pixels([255, 0, 58, 29]))


def test_coco_layout_picks_the_suffix_of_each_benchmark(tmp_path: Path) -> None:
    coco = tmp_path / "coco_stuff164k"
    for stem in ("000000000139", "000000000285"):
        _jpg(coco / "images" / "val2017" / f"{stem}.jpg")
        _label(coco / "annotations" / "val2017" / f"{stem}.png", [0, 91, 255])  # raw map, never read
        _label(coco / "annotations" / "val2017" / f"{stem}_labelTrainIds.png", [0, 80, 170, 255])
        _label(coco / "annotations" / "val2017" / f"{stem}_instanceTrainIds.png", [0, 1, 80])
    stuff, obj = get_benchmark("coco_stuff"), get_benchmark("coco_object")
    stuff_samples = list_samples(stuff, dataset_root(stuff, tmp_path))
    obj_samples = list_samples(obj, dataset_root(obj, tmp_path))
    assert [sample.name for sample in stuff_samples] == ["000000000139", "000000000285"]
    assert stuff_samples[0].label.name == "000000000139_labelTrainIds.png"
    assert obj_samples[1].label.name == "000000000285_instanceTrainIds.png"
    np.testing.assert_array_equal(load_label(stuff_samples[0].label, stuff), _pixels([0, 80, 170, 255]))
    np.testing.assert_array_equal(load_label(obj_samples[0].label, obj), _pixels([0, 1, 80]))
    with pytest.raises(InvalidInputError, match="coco_object"):
        load_label(stuff_samples[0].label, obj)  # 170 is no COCO-Object class


def test_cityscapes_layout_is_recursive(tmp_path: Path) -> None:
    city = tmp_path / "cityscapes"
    stems = {"frankfurt": "frankfurt_000000_000294", "lindau": "lindau_000000_000019"}
    for town, stem in stems.items():
        _rgb_png(city / "leftImg8bit" / "val" / town / f"{stem}_leftImg8bit.png")
        _label(city / "gtFine" / "val" / town / f"{stem}_gtFine_labelTrainIds.png", [0, 18, 255])
        _label(city / "gtFine" / "val" / town / f"{stem}_gtFine_labelIds.png", [7, 33, 0])
    spec = get_benchmark("cityscapes")
    samples = list_samples(spec, dataset_root(spec, tmp_path))
    assert [sample.name for sample in samples] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]
    assert samples[0].label == city / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(load_label(samples[1].label, spec), _pixels([0, 18, 255]))
    image, _ = load_sample(samples[0], spec)
    assert image.shape == (HEIGHT, WIDTH, 3)


def test_ade_layout_reduces_zero_label(tmp_path: Path) -> None:
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    _jpg(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    _label(ade / "annotations" / "validation" / "ADE_val_00000001.png", [0, 1, 8, 150])
    _jpg(ade / "images" / "validation" / "ADE_val_00000002.jpg")
    _label(ade / "annotations" / "validation" / "ADE_val_00000002.png", [0, 151])
    spec = get_benchmark("ade20k")
    samples = list_samples(spec, dataset_root(spec, tmp_path))
    assert [sample.name for sample in samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    np.testing.assert_array_equal(load_label(samples[0].label, spec), _pixels([255, 0, 7, 149]))
    with pytest.raises(InvalidInputError, match=r"ADE_val_00000002\.png.*151"):
        load_label(samples[1].label, spec)


def test_folder_dataset(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    _jpg(root / "images" / "a.jpg")
    _rgb_png(root / "images" / "b.PNG")
    _jpg(root / "images" / "c.jpeg")
    (root / "images" / "notes.txt").write_text("not an image")
    _label(root / "labels" / "a.png", [0, 1, 2, 255])
    _label(root / "labels" / "b.png", [2, 2], mode="I;16")  # 16-bit label maps are read as is
    _label(root / "labels" / "c.png", [1], mode="P")
    classes = root / "classes.txt"
    classes.write_bytes(b"background\r\nbed \ncat")
    spec = folder_benchmark(root, classes, background=True)
    assert spec.class_names == ("background", "bed ", "cat") and spec.vocabulary == ("bed ", "cat")
    assert spec.name == "folder" and spec.image_suffix is None and ".jpeg" in FOLDER_IMAGE_SUFFIXES
    samples = list_samples(spec, dataset_root(spec, "/unused"))
    assert [(sample.name, sample.image.name, sample.label.name) for sample in samples] == [
        ("a", "a.jpg", "a.png"), ("b", "b.PNG", "b.png"), ("c", "c.jpeg", "c.png")]
    np.testing.assert_array_equal(load_label(samples[1].label, spec), _pixels([2, 2]))
    # A split file selects stems; reduce_zero_label applies to user data too.
    (root / "val.txt").write_text("c\n")
    subset = folder_benchmark(root, classes, split_file="val.txt", reduce_zero_label=True)
    only = list_samples(subset, root)
    assert [sample.name for sample in only] == ["c"]
    np.testing.assert_array_equal(load_label(only[0].label, subset), _pixels([0]))


def test_class_names_file_rules(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("sky\n\nroad\n")
    with pytest.raises(InvalidInputError, match=r"names\.txt:2: empty line"):
        read_class_names_file(names)
    names.write_text("sky\n   \n")
    with pytest.raises(InvalidInputError, match=":2: empty line"):
        read_class_names_file(names)
    names.write_text("")
    with pytest.raises(InvalidInputError, match="empty"):
        read_class_names_file(names)
    names.write_text("sky\nsky\n")
    with pytest.raises(InvalidInputError, match="unique"):
        folder_benchmark(tmp_path, names)
    with pytest.raises(InvalidInputError, match="not found"):
        read_class_names_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------


def _ade(tmp_path: Path) -> Path:
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    _jpg(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    _label(ade / "annotations" / "validation" / "ADE_val_00000001.png", [1, 2])
    return ade


def test_missing_folders_and_files_are_named(tmp_path: Path) -> None:
    spec = get_benchmark("ade20k")
    with pytest.raises(InvalidInputError, match="dataset folder of ade20k not found"):
        list_samples(spec, tmp_path / "nowhere")
    ade = _ade(tmp_path)
    # The data root instead of the dataset folder: the message says which folder to pass.
    with pytest.raises(InvalidInputError, match=r"images/validation: image folder.*pass the dataset folder"):
        list_samples(spec, tmp_path)
    _jpg(ade / "images" / "validation" / "ADE_val_00000002.jpg")
    with pytest.raises(InvalidInputError, match=r"1 of 2 label maps.*ADE_val_00000002\.png"):
        list_samples(spec, ade)


def test_missing_annotation_folder_and_converter_hint(tmp_path: Path) -> None:
    coco = tmp_path / "coco_stuff164k"
    _jpg(coco / "images" / "val2017" / "000000000139.jpg")
    spec = get_benchmark("coco_object")
    with pytest.raises(InvalidInputError, match=r"annotations/val2017: label-map folder.*convert_coco_object"):
        list_samples(spec, coco)
    _label(coco / "annotations" / "val2017" / "000000000139.png", [0])
    with pytest.raises(InvalidInputError, match=r"000000000139_instanceTrainIds\.png.*convert_coco_object"):
        list_samples(spec, coco)


def test_split_file_errors(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _jpg(voc / "JPEGImages" / "2007_000033.jpg")
    _label(voc / "SegmentationClass" / "2007_000033.png", [0])
    spec = get_benchmark("voc21")
    with pytest.raises(InvalidInputError, match=r"Segmentation/val\.txt: split file of voc21 not found"):
        list_samples(spec, voc)
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("\n")
    with pytest.raises(InvalidInputError, match="empty split"):
        list_samples(spec, voc)
    split.write_text("2007_000033\n2007_999999\n")
    with pytest.raises(InvalidInputError, match=r"2007_999999\.jpg"):
        list_samples(spec, voc)
    split.write_text("2007_000033\n2007_000033\n")
    with pytest.raises(InvalidInputError, match="listed twice"):
        list_samples(spec, voc)


def test_empty_image_folder_is_an_empty_split(tmp_path: Path) -> None:
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=r"images/validation: empty split"):
        list_samples(get_benchmark("ade20k"), ade)


def test_label_value_and_mode_errors(tmp_path: Path) -> None:
    voc21 = get_benchmark("voc21")
    bad = _label(tmp_path / "bad.png", [0, 21, 200, 255])
    with pytest.raises(InvalidInputError, match=r"bad\.png: label values 21, 200 are outside the 21 classes"):
        load_label(bad, voc21)
    # 256 in a 16-bit map must not slip through reduce_zero_label as the ignore value.
    wide = _label(tmp_path / "wide.png", [1, 256], mode="I;16")
    with pytest.raises(InvalidInputError, match="256"):
        load_label(wide, get_benchmark("voc20"))
    with pytest.raises(InvalidInputError, match=r"colour\.png: label map has mode 'RGB'"):
        load_label(_rgb_png(tmp_path / "colour.png"), voc21)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match=r"broken\.png: cannot read label map"):
        load_label(tmp_path / "broken.png", voc21)
    with pytest.raises(InvalidInputError, match=r"missing\.png: label map not found"):
        load_label(tmp_path / "missing.png", voc21)


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    image = _jpg(tmp_path / "x.jpg", height=HEIGHT + 2)
    label = _label(tmp_path / "x.png", [0])
    sample = Sample("x", image, label)
    with pytest.raises(InvalidInputError, match=r"x\.png: label map is 8x6.*x\.jpg is 8x8"):
        load_sample(sample, get_benchmark("voc21"))
    check_sample((HEIGHT, WIDTH), np.zeros((HEIGHT, WIDTH), dtype=np.int64), sample)  # matching sizes pass
