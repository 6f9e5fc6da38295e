"""Saved configurations keep every setting (issue 13 point 1).

Every field of `InferenceConfig` and `ModelConfig` (and their nested configs) is set to a non-default
value, saved and read back: as a dict / JSON, as a model folder read by `create_model("local-dir:…")`,
and as an ONNX export. The fields are enumerated with `dataclasses.fields`, so a field added later is
covered without touching this file. The tri-state ``bg_clean=None`` ("follow `background`") must
survive as None: resolved to False on save, a reloaded model would no longer clean with `--background`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np
import pytest
import torch

from talk2dino.config import BackboneConfig, InferenceConfig, ModelConfig, ProjectionConfig, TextConfig
from talk2dino.factory import create_model
from talk2dino.fileio import file_sha256
from talk2dino.predictor import Segmenter
from talk2dino.registry import MODEL_CONFIG_FILE, get_model_config, save_model_folder

# Values for fields whose type alone does not tell a valid non-default value.
_SPECIAL: dict[str, Any] = {
    "name": "round-trip",
    "source": "local-dir:/nowhere/part",
    "sha256": "ab" * 32,
    "git_blob_sha1": "cd" * 20,
}


def _other(value: Any, tp: Any, name: str) -> Any:
    """A valid value of type `tp` that differs from `value` (the field's default, or None)."""
    origin = get_origin(tp)
    if origin in (Union, typing.Union) or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return _SPECIAL.get(name) or _fresh(args[0], name)
        return _other(value, args[0], name)
    if name in _SPECIAL and tp is str:
        return _SPECIAL[name]
    if origin is Literal:
        return next(c for c in get_args(tp) if c != value)
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_other(v, args[0], name) for v in value[:2])  # other length, other items
        return tuple(_other(v, a, name) for v, a in zip(value, args, strict=True))
    if tp is bool:
        return not value
    if tp is int:
        return value // 2 if value >= 2 else value + 1
    if tp is float:
        return round(value * 0.9, 6) if value else 0.5
    if tp is str:
        return value + " x"
    if dataclasses.is_dataclass(tp):
        return non_default(tp)
    raise AssertionError(f"no non-default value for field {name} of type {tp}")


def _fresh(tp: Any, name: str) -> Any:
    """A value for a field without a default."""
    if dataclasses.is_dataclass(tp):
        return non_default(tp)
    return _SPECIAL.get(name) or _other(tp() if tp in (bool, int, float, str) else None, tp, name)


def non_default(cls: type, **keep: Any) -> Any:
    """An instance of dataclass `cls` with every field changed from its default (except `keep`)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in keep:
            values[f.name] = keep[f.name]
        elif f.default is not dataclasses.MISSING:
            values[f.name] = _other(f.default, hints[f.name], f.name)
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            values[f.name] = non_default(type(default)) if dataclasses.is_dataclass(default) else _other(
                default, hints[f.name], f.name)
        else:
            values[f.name] = _fresh(hints[f.name], f.name)
    return cls(**values)


def _base_model_config(inference: InferenceConfig) -> ModelConfig:
    return ModelConfig(name="tiny", backbone=BackboneConfig(source="local-dir:/b"),
                       text=TextConfig(source="local-dir:/t"), projection=ProjectionConfig(source=None),
                       inference=inference)


def _inference_cases() -> dict[str, InferenceConfig]:
    """Defaults, each field alone set to a non-default value, all at once, and the tri-state cases."""
    changed = non_default(InferenceConfig)
    cases = {"defaults": InferenceConfig()}
    for f in dataclasses.fields(InferenceConfig):
        cases[f"only-{f.name}"] = dataclasses.replace(InferenceConfig(), **{f.name: getattr(changed, f.name)})
    cases["all"] = changed
    for background in (False, True):
        for clean in (None, False, True):
            cases[f"background={background}-bg_clean={clean}"] = InferenceConfig(background=background,
                                                                                  bg_clean=clean)
    return cases


INFERENCE_CASES = _inference_cases()


def _assert_every_field_equal(got: Any, want: Any, where: str = "") -> None:
    """Field-by-field comparison with the field's name in the message (and the types: no list for a tuple)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            _assert_every_field_equal(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# (a) dict and JSON ------------------------------------------------------------------------------


def test_non_default_configs_really_differ_in_every_field() -> None:
    for cls in (InferenceConfig, ModelConfig, BackboneConfig, TextConfig, ProjectionConfig):
        changed = non_default(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert getattr(changed, f.name) != f.default, f"{cls.__name__}.{f.name}"
    non_default(InferenceConfig).validate()


@pytest.mark.parametrize("case", sorted(INFERENCE_CASES))
def test_inference_config_dict_and_json_round_trip(case: str) -> None:
    config = INFERENCE_CASES[case]
    d = config.to_dict()
    assert d == json.loads(json.dumps(d)), "to_dict must be JSON-native (lists, not tuples)"
    assert d["bg_clean"] is config.bg_clean
    loaded = ModelConfig.from_dict(json.loads(json.dumps(_base_model_config(config).to_dict())))
    _assert_every_field_equal(loaded.inference, config, "ModelConfig.inference")
    assert loaded.inference.effective_bg_clean == config.effective_bg_clean
    _assert_every_field_equal(InferenceConfig.from_dict(json.loads(json.dumps(d))), config, "InferenceConfig")


@pytest.mark.parametrize("changed", ["all", *[f.name for f in dataclasses.fields(ModelConfig)]])
def test_model_config_dict_and_json_round_trip(changed: str) -> None:
    everything = non_default(ModelConfig)
    if changed == "all":
        config = everything
    else:
        config = dataclasses.replace(_base_model_config(InferenceConfig()), **{changed: getattr(everything, changed)})
    d = config.to_dict()
    assert d == json.loads(json.dumps(d)), "to_dict must be JSON-native (lists, not tuples)"
    _assert_every_field_equal(ModelConfig.from_dict(d), config, "ModelConfig")
    _assert_every_field_equal(ModelConfig.from_dict(json.loads(json.dumps(d))), config, "ModelConfig")


def test_files_written_by_the_old_code_still_load() -> None:
    """Before issue 13 `bg_clean` was saved resolved (False for "follow background"); such files load as
    they are (an explicit False: the old file cannot tell it from a deliberate one)."""
    old = _base_model_config(InferenceConfig()).to_dict()
    old["inference"]["bg_clean"] = False
    old["backbone"]["image_mean"] = tuple(old["backbone"]["image_mean"])
    loaded = ModelConfig.from_dict(json.loads(json.dumps(old)))
    assert loaded.inference.bg_clean is False
    assert loaded.backbone.image_mean == BackboneConfig(source="x").image_mean


# (b) a model folder written by save_model_folder and loaded by create_model --------------------


def _folder_config(tiny_sources: dict[str, str], inference: InferenceConfig, projection_file: Path | None
                   ) -> ModelConfig:
    """Every field non-default except what must match the tiny weights: sources, psi's width, and the
    backbone's normalisation kept loadable (the values are still non-default)."""
    pins: dict[str, Any] = {"source": None}
    if projection_file is not None:
        data = projection_file.read_bytes()
        import hashlib

        pins = {"source": None, "sha256": file_sha256(projection_file),
                "git_blob_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    return ModelConfig(
        name="round-trip-folder",
        backbone=non_default(BackboneConfig, source=tiny_sources["backbone"]),
        text=non_default(TextConfig, source=tiny_sources["text_encoder"]),
        projection=non_default(ProjectionConfig, in_dim=512, **pins),
        inference=inference,
        profile=non_default(ModelConfig).profile,
    )


@pytest.mark.parametrize("case", ["defaults", "all", "background=True-bg_clean=None", "background=False-bg_clean=None"])
def test_model_folder_round_trip(case: str, tiny_sources: dict[str, str], tiny_model: Any, tmp_path: Path) -> None:
    inference = INFERENCE_CASES[case]
    folder = tmp_path / "model"
    save_model_folder(folder, _folder_config(tiny_sources, inference, None), tiny_model.projection)
    # Second save with the pins of the (deterministic) projection file, so create_model verifies them.
    config = _folder_config(tiny_sources, inference, folder / "projection.safetensors")
    save_model_folder(folder, config, tiny_model.projection)
    on_disk = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    assert on_disk["inference"]["bg_clean"] == inference.bg_clean
    want = dataclasses.replace(config, projection=dataclasses.replace(config.projection, source=f"local-dir:{folder}"))
    _assert_every_field_equal(get_model_config(f"local-dir:{folder}"), want, "get_model_config")
    model = create_model(f"local-dir:{folder}", device="cpu")
    _assert_every_field_equal(model.config, want, "create_model")
    assert model.config.inference.bg_clean is inference.bg_clean


def test_trained_run_folder_keeps_follow_background(tiny_sources: dict[str, str], tiny_model: Any,
                                                    tmp_path: Path) -> None:
    """The default inference settings of a new model folder (what training writes) keep bg_clean=None."""
    folder = save_model_folder(tmp_path / "run", tiny_model.config, tiny_model.projection)
    model = create_model(f"local-dir:{folder}", device="cpu")
    assert tiny_model.config.inference.bg_clean is None
    assert model.config.inference.bg_clean is None
    assert dataclasses.replace(model.config.inference, background=True).effective_bg_clean


# (c) an ONNX export -----------------------------------------------------------------------------

SIZE = 28  # the tiny DINOv2 (patch 14) exported at a 2×2 grid, as in test_onnx.py


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def onnx_folder(tiny_sources: dict[str, str], tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra")
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra")
    pytest.importorskip("onnxruntime", reason="the ONNX backend needs the onnx extra")
    from talk2dino.onnx.export import export_onnx

    # Export a model whose saved settings differ from the defaults everywhere bg_clean=None allows,
    # with the geometry the export fixes (window = exported size).
    inference = dataclasses.replace(non_default(InferenceConfig), bg_clean=None, background=False, window=SIZE,
                                    stride=14, short_side=42, max_long_side=112, pamr=False)
    model = create_model(None, device="cpu", **tiny_sources)
    model.config = dataclasses.replace(model.config, inference=inference)
    return Path(export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny", image_size=SIZE)["config"]).parent


def test_onnx_export_keeps_every_setting(onnx_folder: Path, tiny_model: Any) -> None:
    from talk2dino.factory import load_onnx_model
    from talk2dino.onnx.runtime import CONFIG_FILE

    manifest = json.loads((onnx_folder / CONFIG_FILE).read_text(encoding="utf-8"))
    assert manifest["model_config"]["inference"]["bg_clean"] is None
    saved = ModelConfig.from_dict(manifest["model_config"])
    assert saved.inference.bg_clean is None
    assert saved.to_dict() == manifest["model_config"]
    model = load_onnx_model(onnx_folder)
    assert model.config.inference.bg_clean is None
    # The runtime may only adapt what the export fixed (window batch of a fixed-batch graph: not here).
    _assert_every_field_equal(model.config, saved, "load_onnx_model")


def test_onnx_background_turns_cleaning_on_as_with_torch(onnx_folder: Path, tiny_model: Any) -> None:
    """`--background` on a reloaded export cleans, as the torch model does: the labels agree."""
    from talk2dino.factory import load_onnx_model

    onnx_model = load_onnx_model(onnx_folder)
    ort_config = dataclasses.replace(onnx_model.config.inference, background=True)  # what --background does
    torch_config = dataclasses.replace(ort_config, bg_clean=None)
    names = ["cat", "sofa", "window", "potted plant"]
    results = []
    for model, config in ((onnx_model, ort_config), (tiny_model, torch_config)):
        segmenter = Segmenter(model, config)
        segmenter.set_classes(names)
        segmenter.set_image(_image(45, 60))
        results.append(segmenter.predict())
    got, want = results
    agreement = (got.labels == want.labels).float().mean().item()
    print(f"ONNX/torch label agreement with background on: {agreement:.4%}")
    assert ort_config.effective_bg_clean, (
        f"background on must turn cleaning on (bg_clean=None follows it); labels agree on {agreement:.2%}")
    assert agreement >= 0.999, f"ONNX and torch labels agree on only {agreement:.2%} of the pixels"
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
