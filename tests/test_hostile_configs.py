"""Hostile configuration files (issue 14): YAML recipes, COCO captions JSON, model-folder configs and psi files.

Each test is the regression test of one finding of the adversarial probe: the input used to be accepted (or to
fail late, or to give garbage with exit 0); now it is refused at once with a one-line `Talk2DinoError` naming
the file and the key or value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_tiny_projection, write_noise_image

from talk2dino.cli import main
from talk2dino.cli.flags import add_config_flags, build_config
from talk2dino.cli.recipes import load_recipe, parse_recipe_text
from talk2dino.config import EvalConfig, ExtractConfig, ModelConfig, TrainConfig
from talk2dino.errors import InvalidInputError, WeightsError
from talk2dino.extract.coco import image_inside, read_coco_captions
from talk2dino.extract.preprocess import CropDataset, read_rgb
from talk2dino.extract.run import run_extract
from talk2dino.factory import create_model, load_projection
from talk2dino.fileio import DuplicateKeyError, json_loads_unique
from talk2dino.models.projection import Projection
from talk2dino.registry import MODEL_CONFIG_FILE, get_model_config, save_model_folder
from talk2dino.weights import load_state_dict


def _one_line(err: BaseException, *parts: str) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _train_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig, title="Training")
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------------------------------------
# 1. Duplicate keys in a recipe
# ------------------------------------------------------------------------------------------------------------


def test_duplicate_recipe_key_is_refused_naming_key_and_lines(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "features: f\nout: o\nepochs: 10\nlr: 1.0e-4\nepochs: 100000000\n")
    with pytest.raises(InvalidInputError) as info:
        load_recipe(path)
    assert str(info.value) == (f"{path}: key 'epochs' is given twice (lines 3 and 5); each setting may appear once")


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("features: f\nout: o\nbetas: [0.9, 0.99]\nx:\n  a: 1\n  b: 2\n  a: 3\n", "a", "lines 5 and 7"),
    ("features: f\nrecall_ks: [{k: 1, k: 2}]\n", "k", "lines 2 and 2"),
    ("{features: f, out: o, features: g}\n", "features", "lines 1 and 1"),
    ("features: f\n'out': o\nout: p\n", "out", "lines 2 and 3"),  # quoting does not make another key
    ("features: f\nlr: 0.1\nlr: 0.1\n", "lr", "lines 2 and 3"),  # the same value twice is still refused
])
def test_duplicate_keys_are_refused_at_any_depth(tmp_path: Path, text: str, key: str, lines: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_recipe(_recipe(tmp_path, text))
    _one_line(info.value, "r.yaml", f"key '{key}' is given twice", lines)


def test_merge_keys_are_refused(tmp_path: Path) -> None:
    # A merge overrides keys silently, like a duplicate; a plain `<<` is an unknown key (no merge resolver).
    with pytest.raises(InvalidInputError) as info:
        load_recipe(_recipe(tmp_path, "? !!merge <<\n: {epochs: 2}\nfeatures: f\nout: o\n"))
    _one_line(info.value, "r.yaml", "merge key '<<' on line 1")
    with pytest.raises(InvalidInputError, match=r"unknown TrainConfig keys in recipe: \['<<', 'base'\]"):
        build_config(TrainConfig, recipe=load_recipe(_recipe(tmp_path, "base: &b {epochs: 2}\n<<: *b\nfeatures: f\n")))


def test_cli_train_with_duplicate_recipe_key_exits_2_with_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _recipe(tmp_path, "features: f\nout: o\nepochs: 10\nepochs: 100000000\n")
    assert main(["train", "--recipe", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"{path}: key 'epochs' is given twice (lines 3 and 4); each setting may appear once")


def test_python_tags_are_still_refused(tmp_path: Path) -> None:
    # The recipe loader is driven directly (not yaml.safe_load): it must stay a safe loader.
    marker = tmp_path / "PWNED"
    with pytest.raises(InvalidInputError, match="could not determine a constructor"):
        parse_recipe_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# 2. YAML 1.1 scalars
# ------------------------------------------------------------------------------------------------------------

YAML11_ONLY = ["1:20", "-1:20", "190:20:30.15", "010", "0o17", "0x1F", "0b101", "1_000", "1_000.5", ".inf", "-.inf",
               ".nan", ".NaN", "yes", "No", "ON", "off", "y", "N", "2001-12-14", "2001-12-14 21:59:43.10 -5"]


@pytest.mark.parametrize("text", YAML11_ONLY)
def test_yaml_1_1_only_scalars_are_read_as_text(text: str) -> None:
    assert parse_recipe_text(f"value: {text}\n") == {"value": text}


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("+7", 7), ("0", 0), ("0.5", 0.5), (".5", 0.5), ("-1.5e3", -1500.0), ("1e-4", 1e-4),
    ("1.0E+2", 100.0), ("true", True), ("False", False), ("TRUE", True), ("null", None), ("~", None), ("", None),
    ("'010'", "010"), ("hello", "hello"),
])
def test_yaml_1_2_scalars_keep_their_types(text: str, value: Any) -> None:
    parsed = parse_recipe_text(f"value: {text}\n")["value"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(("line", "field"), [
    ("seed: 1:20", "seed"), ("seed: 010", "seed"), ("seed: 0x1F", "seed"), ("batch_size: 1_000", "batch_size"),
    ("on_device: yes", "on_device"), ("loss_divide_by_batch_squared: off", "loss_divide_by_batch_squared"),
    ("lr: .inf", "lr"), ("epochs: .nan", "epochs"), ("seed: 2001-12-14", "seed"), ("lr: '1e-4'", "lr"),
])
def test_yaml_1_1_forms_are_refused_by_the_field_type(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        build_config(TrainConfig, recipe=load_recipe(_recipe(tmp_path, f"features: f\nout: o\n{line}\n")))
    _one_line(info.value, "r.yaml", f"TrainConfig.{field}: expected", "write numbers in plain decimal")


@pytest.mark.parametrize("line", ["seed: !!int 0x1F", "seed: !!int 1:20", "on_device: !!bool yes",
                                  "lr: !!float .inf"])
def test_explicit_tags_are_held_to_plain_forms(tmp_path: Path, line: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_recipe(_recipe(tmp_path, f"features: f\nout: o\n{line}\n"))
    _one_line(info.value, "r.yaml", "on line 3 is not a plain")


def test_date_and_yes_like_text_is_kept_for_string_settings(tmp_path: Path) -> None:
    config = build_config(TrainConfig, recipe=load_recipe(_recipe(tmp_path, "features: 2001-12-14\nout: yes\n")))
    assert (config.features, config.out) == ("2001-12-14", "yes")


# ------------------------------------------------------------------------------------------------------------
# 3. Numeric settings: types and ranges
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ("epochs: 100000000", "TrainConfig.epochs (--epochs) must be in [1, 100000], got 100000000"),
    ("epochs: 1000000000000", "TrainConfig.epochs (--epochs) must be in [1, 100000], got 1000000000000"),
    ("epochs: 0", "TrainConfig.epochs (--epochs) must be in [1, 100000], got 0"),
    ("batch_size: 1000000000000", "TrainConfig.batch_size (--batch-size) must be in [1, 65536], got 1000000000000"),
    ("lr: 0.0", "TrainConfig.lr (--lr) must be in (0, 10], got 0.0"),
    ("lr: 1.0e+10", "TrainConfig.lr (--lr) must be in (0, 10], got 10000000000.0"),
    ("seed: -1", "TrainConfig.seed (--seed) must be in [0, 9223372036854775807], got -1"),
    ("max_steps: 100000000000000", "TrainConfig.max_steps (--max-steps) must be in [1, 1000000000]"),
    ("temperature: 0.0", "TrainConfig.temperature (--temperature) must be in [0.0001, 100], got 0.0"),
    ("betas: [0.9, 1.0]", "TrainConfig.betas (--betas) must be in [0, 1), got 1.0"),
    ("recall_ks: [1, 0]", "TrainConfig.recall_ks (--recall-ks) must be in [1, 1048576], got 0"),
    ("epochs: ten", "TrainConfig.epochs: expected int, got 'ten'"),
    ("epochs: '10'", "TrainConfig.epochs: expected int, got '10'"),
    ("epochs: 2.5", "TrainConfig.epochs: expected int, got 2.5"),
    ("epochs: true", "TrainConfig.epochs: expected int, got True"),
])
def test_train_recipe_numbers_are_typed_and_bounded(tmp_path: Path, line: str, message: str) -> None:
    path = _recipe(tmp_path, f"features: f\nout: o\n{line}\n")
    with pytest.raises(InvalidInputError) as info:
        build_config(TrainConfig, recipe=load_recipe(path))
    assert _one_line(info.value, message).startswith(f"{path}: ")


def test_flags_are_held_to_the_same_ranges(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, "features: f\nout: o\nepochs: 10\n"))
    with pytest.raises(InvalidInputError, match=r"^TrainConfig\.epochs \(--epochs\) must be in \[1, 100000\]"):
        build_config(TrainConfig, _train_flags("--epochs", "100000000"), recipe=recipe)
    with pytest.raises(InvalidInputError, match=r"lr \(--lr\) must be in \(0, 10\], got nan"):
        build_config(TrainConfig, _train_flags("--lr", "nan"), recipe=recipe)
    assert build_config(TrainConfig, _train_flags("--epochs", "100000"), recipe=recipe).epochs == 100_000


@pytest.mark.parametrize(("cls", "values", "message"), [
    (ExtractConfig, {"coco_root": "c", "batch_size": 10**9}, "ExtractConfig.batch_size (--batch-size) must be in"),
    (ExtractConfig, {"coco_root": "c", "num_workers": -1}, "ExtractConfig.num_workers (--num-workers) must be in"),
    (ExtractConfig, {"coco_root": "c", "limit": 0}, "ExtractConfig.limit (--limit) must be in [1, 1000000000]"),
    (EvalConfig, {"bg_threshold": [0.5, 1.5]}, "EvalConfig.bg_threshold (--bg-threshold) must be in (0, 1), got 1.5"),
    (EvalConfig, {"short_side": [448, 0]}, "EvalConfig.short_side (--short-side) must be in [1, 16384], got 0"),
    (EvalConfig, {"limit": 10**12}, "EvalConfig.limit (--limit) must be in [1, 1000000000]"),
])
def test_extract_and_eval_recipes_are_bounded(tmp_path: Path, cls: type, values: dict[str, Any], message: str) -> None:
    path = tmp_path / "r.json"  # JSON is YAML: the same loader
    path.write_text(json.dumps(values), encoding="utf-8")
    with pytest.raises(InvalidInputError) as info:
        build_config(cls, recipe=load_recipe(path))
    _one_line(info.value, str(path), message)


def test_real_recipes_still_load(tmp_path: Path) -> None:
    text = ("features: feats\nout: run\nepochs: 100\nbatch_size: 128\nlr: 1e-4\nbetas: [0.9, 0.999]\neps: 1.0e-8\n"
            "temperature: 0.07\nseed: 123\nrecall_ks: [1, 5, 10]\nval_max_images: ~\non_device: false\n")
    config = build_config(TrainConfig, recipe=load_recipe(_recipe(tmp_path, text)))
    assert (config.epochs, config.lr, config.eps, config.val_max_images, config.on_device) == (100, 1e-4, 1e-8, None,
                                                                                              False)


# ------------------------------------------------------------------------------------------------------------
# 4-6. COCO captions JSON
# ------------------------------------------------------------------------------------------------------------


def _coco(root: Path, text: str | bytes) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2014").mkdir(exist_ok=True)
    path = root / "annotations" / "captions_train2014.json"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_coco_duplicate_annotations_key_is_refused(tmp_path: Path) -> None:
    # The real list first, an empty one last: json.loads keeps the empty one and extraction had 0 captions.
    path = _coco(tmp_path, '{"images": [{"id": 1, "file_name": "a.jpg"}], '
                           '"annotations": [{"id": 5, "image_id": 1, "caption": "a cat"}], "annotations": []}')
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(tmp_path, "train")
    assert str(info.value) == (f"{path}: duplicate key 'annotations' in one JSON object; a COCO file names each key "
                               "once, so this one was edited or corrupted (re-download it)")


def test_coco_duplicate_key_inside_an_entry_is_refused(tmp_path: Path) -> None:
    _coco(tmp_path, '{"images": [{"id": 1, "file_name": "a.jpg", "file_name": "b.jpg"}], '
                    '"annotations": [{"id": 5, "image_id": 1, "caption": "a cat"}]}')
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(tmp_path, "train")
    _one_line(info.value, "captions_train2014.json", "duplicate key 'file_name'")


@pytest.mark.parametrize(("annotations", "counts"), [
    ([], "(0 listed in all, 0 naming no listed image, 0 empty)"),
    ([{"id": 5, "image_id": 1, "caption": " \n"}], "(1 listed in all, 0 naming no listed image, 1 empty)"),
    ([{"id": 5, "image_id": 9, "caption": "a cat"}], "(1 listed in all, 1 naming no listed image, 0 empty)"),
])
def test_coco_without_usable_captions_is_an_error(tmp_path: Path, annotations: list[Any], counts: str) -> None:
    path = _coco(tmp_path, json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": annotations}))
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(tmp_path, "train")
    assert str(info.value) == (f"{path}: no usable caption for the 1 image(s) kept {counts}; is this the captions "
                               "file of the split?")


def test_coco_limit_keeping_only_captionless_images_is_an_error(tmp_path: Path) -> None:
    _coco(tmp_path, json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                                "annotations": [{"id": 5, "image_id": 2, "caption": "a cat"}]}))
    assert read_coco_captions(tmp_path, "train").num_captions == 1
    with pytest.raises(InvalidInputError, match="no usable caption for the 1 image"):
        read_coco_captions(tmp_path, "train", limit=1)


def test_coco_without_images_is_an_error(tmp_path: Path) -> None:
    _coco(tmp_path, json.dumps({"images": [], "annotations": []}))
    with pytest.raises(InvalidInputError, match=r"captions_train2014\.json: lists no images$"):
        read_coco_captions(tmp_path, "train")


@pytest.mark.parametrize(("where", "value", "shown"), [
    ("image", 10**30, "images[0].id is 1000000000000000000000000000000, outside [0, 2**63)"),
    ("image", 2**63, "images[0].id is 9223372036854775808, outside [0, 2**63)"),
    ("image", -1, "images[0].id is -1, outside [0, 2**63)"),
    ("image", 1.0, "images[0].id is 1.0 (float), expected int"),
    ("image", True, "images[0].id is True (bool), expected int"),
    ("image", "1", "images[0].id is '1' (str), expected int"),
    ("caption", 2**64, "annotations[0].id is 18446744073709551616, outside [0, 2**63)"),
    ("caption_image", -5, "annotations[0].image_id is -5, outside [0, 2**63)"),
])
def test_coco_ids_are_int64_and_checked_when_read(tmp_path: Path, where: str, value: Any, shown: str) -> None:
    image = {"id": value if where == "image" else 1, "file_name": "a.jpg"}
    caption = {"id": value if where == "caption" else 5,
               "image_id": value if where in ("image", "caption_image") else 1, "caption": "a cat"}
    _coco(tmp_path, json.dumps({"images": [image], "annotations": [caption]}))
    with pytest.raises(InvalidInputError) as info:
        read_coco_captions(tmp_path, "train")
    _one_line(info.value, f"captions_train2014.json: {shown}")


def test_largest_coco_id_is_accepted(tmp_path: Path) -> None:
    big = 2**63 - 1
    _coco(tmp_path, json.dumps({"images": [{"id": big, "file_name": "a.jpg"}, {"id": 0, "file_name": "b.jpg"}],
                                "annotations": [{"id": big, "image_id": big, "caption": "a cat"}]}))
    coco = read_coco_captions(tmp_path, "train")
    assert [image.image_id for image in coco.images] == [0, big] and coco.num_captions == 1


def test_json_loads_unique() -> None:
    assert json_loads_unique(b'{"a": {"b": 1}, "c": [{"b": 2}, {"b": 3}]}') == {"a": {"b": 1},
                                                                              "c": [{"b": 2}, {"b": 3}]}
    with pytest.raises(DuplicateKeyError, match="^duplicate key 'b' in one JSON object$"):
        json_loads_unique('{"a": [{"b": 1, "b": 1}]}')
    with pytest.raises(DuplicateKeyError, match=r"^duplicate key 'x\\ny' in one JSON object$"):
        json_loads_unique('{"x\\ny": 1, "x\\ny": 2}')  # a key holding a line break stays one line
    assert isinstance(DuplicateKeyError("x"), ValueError)


# ------------------------------------------------------------------------------------------------------------
# 5. COCO images that are symlinks out of the image folder
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def linked_coco(tmp_path: Path) -> tuple[Path, Path]:
    """A COCO folder whose train2014/ is itself a symlink, holding a real image, a link to an image inside the
    folder, and a link to a (valid) image outside it."""
    real_images = tmp_path / "disk" / "train2014"
    real_images.mkdir(parents=True)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2014").symlink_to(real_images, target_is_directory=True)  # a root that is a link is fine
    write_noise_image(real_images / "good.png")
    (real_images / "alias.png").symlink_to(real_images / "good.png")
    outside = write_noise_image(tmp_path / "private.png", seed=3)
    (real_images / "escape.png").symlink_to(outside)
    data = {"images": [{"id": i, "file_name": name} for i, name in enumerate(("good.png", "alias.png",
                                                                                 "escape.png"), start=1)],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": f"picture {i}"} for i in (1, 2, 3)]}
    (coco / "annotations" / "captions_train2014.json").write_text(json.dumps(data), encoding="utf-8")
    return coco, outside


def test_image_link_out_of_the_folder_is_refused_unopened(linked_coco: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    coco, outside = linked_coco
    root = coco / "train2014"
    assert read_rgb(root / "escape.png").size == (60, 40)  # without a root the link is followed (other callers)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    with pytest.raises(InvalidInputError) as info:
        read_rgb(root / "escape.png", root)
    _one_line(info.value, f"{root / 'escape.png'}: resolves to {outside}, outside the image folder "
                          f"{os.path.realpath(root)}; not opened")
    assert str(outside) not in opened
    assert read_rgb(root / "alias.png", root).size == read_rgb(root / "good.png", root).size == (60, 40)
    with pytest.raises(InvalidInputError, match="outside the image folder"):
        image_inside(root / ".", root)  # the folder itself is no image


def test_crop_dataset_reports_the_escaping_link_as_a_failed_image(linked_coco: tuple[Path, Path]) -> None:
    coco, _ = linked_coco
    root = coco / "train2014"
    dataset = CropDataset([str(root / n) for n in ("good.png", "alias.png", "escape.png")], 14, root=str(root))
    results = [dataset[i] for i in range(3)]
    assert [crop is not None for _, crop, _ in results] == [True, True, False]
    assert "outside the image folder" in str(results[2][2])


def test_extract_skips_an_image_linked_out_of_the_folder(linked_coco: tuple[Path, Path], tmp_path: Path,
                                                         tiny_sources: dict[str, str]) -> None:
    coco, _ = linked_coco
    config = ExtractConfig(coco_root=str(coco), split="train", out=str(tmp_path / "features"),
                           backbone=tiny_sources["backbone"], text_encoder=tiny_sources["text_encoder"],
                           image_size=28, shard_size=4, batch_size=2, num_workers=0, device="cpu")
    manifest = json.loads((run_extract(config, progress=False) / "manifest.json").read_text(encoding="utf-8"))
    assert [f["image_id"] for f in manifest["failed_images"]] == [3]
    assert "outside the image folder" in manifest["failed_images"][0]["error"]
    assert manifest["counts"]["images"] == 2


# ------------------------------------------------------------------------------------------------------------
# 7. Model-folder config values
# ------------------------------------------------------------------------------------------------------------


def _model_folder(folder: Path, **changes: Any) -> Path:
    """A model folder whose talk2dino.json has `changes` ("part.field": value) applied."""
    data: dict[str, Any] = {"name": "x", "backbone": {"source": "hf-hub:facebook/dinov2-small"},
                            "text": {"source": "hf-hub:openai/clip-vit-base-patch16"}, "projection": {"source": None}}
    for dotted, value in changes.items():
        part, field = dotted.split(".")
        data[part][field] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize(("change", "message"), [
    ({"backbone.image_std": [0, 0, 0]}, "BackboneConfig.image_std must be 3 finite values in [0.001, 10], got "
                                        "[0.0, 0.0, 0.0]"),
    ({"backbone.image_std": [-0.229, 0.224, 0.225]}, "BackboneConfig.image_std must be 3 finite values in"),
    ({"backbone.image_std": [1e-30, 1e-30, 1e-30]}, "BackboneConfig.image_std must be 3 finite values in"),
    ({"backbone.image_std": [100.0, 1.0, 1.0]}, "BackboneConfig.image_std must be 3 finite values in"),
    ({"backbone.image_mean": [1e6, 0.5, 0.5]}, "BackboneConfig.image_mean must be 3 finite values in [-10, 10]"),
    ({"text.context_length": 1}, "TextConfig.context_length must be >= 3 (start and end tokens plus one word"),
    ({"text.context_length": 2}, "TextConfig.context_length must be >= 3"),
])
def test_model_config_values_that_give_garbage_are_refused(tmp_path: Path, change: dict[str, Any],
                                                            message: str) -> None:
    folder = _model_folder(tmp_path / "model", **change)
    with pytest.raises(WeightsError) as info:
        get_model_config(f"local-dir:{folder}")
    _one_line(info.value, str(folder / MODEL_CONFIG_FILE), message)


def test_model_config_non_finite_mean_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _model_folder(folder)
    text = (folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8")
    (folder / MODEL_CONFIG_FILE).write_text(text.replace('"backbone": {', '"backbone": {"image_mean": [NaN, 0, 0], '),
                                            encoding="utf-8")
    with pytest.raises(WeightsError) as info:
        get_model_config(f"local-dir:{folder}")
    _one_line(info.value, MODEL_CONFIG_FILE, "BackboneConfig.image_mean[0]: expected a finite number, got nan")


def test_model_config_duplicate_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _model_folder(folder)
    text = (folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8")
    hidden = '"backbone": {"image_std": [0.229, 0.224, 0.225], "image_std": [0.0, 0.0, 0.0], '
    (folder / MODEL_CONFIG_FILE).write_text(text.replace('"backbone": {', hidden), encoding="utf-8")
    with pytest.raises(WeightsError) as info:
        get_model_config(f"local-dir:{folder}")
    _one_line(info.value, str(folder / MODEL_CONFIG_FILE), "duplicate key 'image_std'")


def test_model_config_sane_values_load(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model", **{"backbone.image_std": [1.0, 1.0, 1.0],
                                                  "backbone.image_mean": [0.0, 0.0, 0.0], "text.context_length": 3})
    config = get_model_config(f"local-dir:{folder}")
    assert (config.backbone.image_std, config.text.context_length) == ((1.0, 1.0, 1.0), 3)


def test_context_length_beyond_the_text_encoder_positions_is_refused(tmp_path: Path,
                                                                     tiny_sources: dict[str, str]) -> None:
    config = ModelConfig.from_dict({"name": "long-context", "backbone": {"source": tiny_sources["backbone"]},
                                    "text": {"source": tiny_sources["text_encoder"], "context_length": 100},
                                    "projection": {"source": None}})
    torch.manual_seed(0)
    folder = save_model_folder(tmp_path / "model", config, Projection(512, 32))
    with pytest.raises(WeightsError) as info:
        create_model(f"local-dir:{folder}", device="cpu")
    _one_line(info.value, "has 77 token positions, fewer than the model configuration's text.context_length 100")


# ------------------------------------------------------------------------------------------------------------
# 8. An all-zero psi
# ------------------------------------------------------------------------------------------------------------


def _psi_state(out_dim: int = 8, *, zero: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"linear_layer.weight": torch.randn(out_dim, 512, generator=g),
             "linear_layer.bias": torch.randn(out_dim, generator=g),
             "hidden_layers.0.weight": torch.randn(out_dim, out_dim, generator=g),
             "hidden_layers.0.bias": torch.randn(out_dim, generator=g)}
    return {k: torch.zeros_like(v) if k in zero else v for k, v in state.items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("zero", [("linear_layer.weight", "linear_layer.bias", "hidden_layers.0.weight",
                                   "hidden_layers.0.bias"), ("linear_layer.weight",), ("hidden_layers.0.weight",)])
def test_all_zero_projection_weights_are_refused(tmp_path: Path, suffix: str, zero: tuple[str, ...]) -> None:
    from talk2dino.config import ProjectionConfig

    path = _save(_psi_state(zero=zero), tmp_path / f"psi{suffix}")
    with pytest.raises(WeightsError) as info:
        load_projection(ProjectionConfig(source=str(path)), out_dim=8, pretrained=True, cache_dir=tmp_path / "c")
    zeroed = sorted(k for k in zero if k.endswith(".weight"))
    _one_line(info.value, f"{path}: projection weight matrices {zeroed} hold only zeros")


def test_zero_biases_and_tiny_random_psi_still_load(tmp_path: Path) -> None:
    psi = Projection(512, 8)
    psi.load_checked(_psi_state(zero=("linear_layer.bias", "hidden_layers.0.bias")), origin="zero-bias")
    tiny = load_state_dict(save_tiny_projection(tmp_path / "tiny.pth"))
    Projection(512, 32).load_checked(tiny, origin="tiny")


def test_resumed_training_checkpoint_with_zero_psi_is_refused() -> None:
    # The trainer's resume goes through the same check (Projection.load_checked).
    with pytest.raises(WeightsError, match=r"checkpoint\.pt: projection weight matrices"):
        Projection(512, 8).load_checked(_psi_state(zero=("hidden_layers.0.weight",)), origin="run/checkpoint.pt")


def test_ranges_sit_on_numeric_fields() -> None:
    # A range is declared on its field (talk2dino.settings.meta), so a renamed field keeps its bound; it must sit
    # on a number (or a tuple of numbers), or it would never be checked.
    import typing

    from talk2dino.settings import field_meta, unwrap_optional

    ranged = 0
    for cls in (TrainConfig, ExtractConfig, EvalConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if field_meta(f).range is None:
                continue
            ranged += 1
            kind = unwrap_optional(hints[f.name])
            items = set(typing.get_args(kind)) - {Ellipsis} if typing.get_origin(kind) is tuple else {kind}
            assert items <= {int, float}, f"{cls.__name__}.{f.name}: {kind}"
    assert ranged >= 24  # every range of the former table (12 train, 6 extract, 6 eval)
