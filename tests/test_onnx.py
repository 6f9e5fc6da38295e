"""ONNX export and the onnxruntime backend against PyTorch on the tiny models (issue 6 item 7).

The tiny DINOv2-reg (patch 14) is exported at a 28-pixel window (a 2×2 grid); every graph output,
the class embeddings and a whole `Segmenter` prediction are compared with the PyTorch fast path.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs the onnx extra (pip install 'talk2dino[onnx]')")
pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (pip install 'talk2dino[onnx]')")
pytest.importorskip("onnxruntime", reason="the ONNX backend needs the onnx extra (pip install 'talk2dino[onnx]')")

from talk2dino.config import InferenceConfig  # noqa: E402
from talk2dino.errors import InvalidInputError, WeightsError  # noqa: E402
from talk2dino.factory import load_onnx_model  # noqa: E402
from talk2dino.fileio import file_sha256  # noqa: E402
from talk2dino.onnx.export import export_onnx  # noqa: E402
from talk2dino.onnx.runtime import CONFIG_FILE, OnnxBackbone, OnnxProjection, OnnxTextEncoder  # noqa: E402
from talk2dino.predictor import Segmenter  # noqa: E402

SIZE = 28  # the exported window: 2×2 patches of the tiny DINOv2 (patch 14)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
# Under pytest-xdist the module runs in one worker, so the export (module fixture, ~6 s) is done once.
pytestmark = pytest.mark.xdist_group("onnx")


@pytest.fixture(scope="module")
def exported(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny", image_size=SIZE)


@pytest.fixture(scope="module")
def onnx_model(exported: dict[str, Path]) -> Any:
    return load_onnx_model(exported["config"].parent)


def _pixels(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_loaded_model_is_built_from_onnx_components(onnx_model: Any, tiny_model: Any) -> None:
    assert isinstance(onnx_model.backbone, OnnxBackbone)
    assert isinstance(onnx_model.text_encoder, OnnxTextEncoder)
    assert isinstance(onnx_model.projection, OnnxProjection)
    assert not list(onnx_model.parameters())
    for name in ("embed_dim", "num_heads", "head_dim", "num_registers", "num_global", "patch_size"):
        assert getattr(onnx_model.backbone, name) == getattr(tiny_model.backbone, name), name
    for name in ("embed_dim", "eot_id", "pad_id", "context_length"):
        assert getattr(onnx_model.text_encoder, name) == getattr(tiny_model.text_encoder, name), name
    assert onnx_model.config.inference.window == SIZE
    assert onnx_model.config.backbone == tiny_model.config.backbone
    assert onnx_model.weights_info["projection"] == tiny_model.weights_info["projection"]
    assert onnx_model.weights_info["runtime"]["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch", [1, 3])
def test_image_outputs_equal_pytorch_fast_path(onnx_model: Any, tiny_model: Any, batch: int) -> None:
    pixels = _pixels(batch, seed=batch)
    got = onnx_model.encode_image(pixels)
    want = tiny_model.encode_image(pixels)
    assert got.grid == want.grid == (SIZE // 14, SIZE // 14)
    for name in ("patch_tokens", "cls_token", "register_tokens", "attn_logits"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape and g.dtype == w.dtype == torch.float32, name
        torch.testing.assert_close(g, w, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    # forward_reference has no separate graph; it is the exported fast path.
    torch.testing.assert_close(onnx_model.encode_image(pixels, reference=True).attn_logits, got.attn_logits)


def test_text_embeddings_and_class_embeddings_equal_pytorch(onnx_model: Any, tiny_model: Any) -> None:
    prompts = ["a photo of a cat.", "x", "itap of a very large and extremely red double-decker bus in a video game."]
    for pad in (False, True):  # the dynamic token length: longest prompt, and the full 77-token context
        torch.testing.assert_close(onnx_model.encode_text(prompts, pad_to_context=pad),
                                   tiny_model.encode_text(prompts, pad_to_context=pad), **TOLERANCE)
    assert onnx_model.encode_text([]).shape == (0, 512)
    names = ["cat", "sofa", "potted plant", "tvmonitor"]
    got = onnx_model.embed_classes(names)
    torch.testing.assert_close(got, tiny_model.embed_classes(names), **TOLERANCE)
    assert got.shape == (len(names), tiny_model.backbone.embed_dim)
    raw = torch.randn(5, 512, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(onnx_model.projection(raw), tiny_model.projection(raw), **TOLERANCE)


def _image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def test_segmenter_prediction_equals_pytorch(onnx_model: Any, tiny_model: Any) -> None:
    # 45×60 -> resized 42×56 -> 2×3 windows of 28 at stride 14, run in backbone batches of 4 and 2.
    config = InferenceConfig(short_side=42, max_long_side=112, window=SIZE, stride=14, background=True,
                             pamr=True, window_batch_size=4)
    names = ["cat", "sofa", "window", "potted plant"]
    results = []
    for model in (onnx_model, tiny_model):
        segmenter = Segmenter(model, config)
        segmenter.set_classes(names)
        segmenter.set_image(_image(45, 60))
        results.append(segmenter.predict())
    got, want = results
    assert got.config.effective_bg_clean and got.class_names == want.class_names
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    flips = (got.labels != want.labels).float().mean().item()
    assert flips <= 1e-3, f"{flips:.4%} of the labels differ"


def test_wrong_input_size_raises_a_clear_error(onnx_model: Any) -> None:
    with pytest.raises(InvalidInputError, match=r"exported for 28x28 windows, got 42x42"):
        onnx_model.encode_image(_pixels(1, size=42))
    with pytest.raises(InvalidInputError, match=r"\[B, 3, H, W\]"):
        onnx_model.encode_image(torch.zeros(3, SIZE, SIZE))
    segmenter = Segmenter(onnx_model, InferenceConfig(window=42, stride=14, short_side=42, max_long_side=84))
    with pytest.raises(InvalidInputError, match="window=28"):
        segmenter.set_image(_image(42, 42))


def test_export_folder_records_hashes_and_geometry(exported: dict[str, Path], tiny_model: Any) -> None:
    folder = exported["config"].parent
    manifest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    files = manifest["files"]
    for role in ("image_encoder", "text_encoder", "projection"):
        assert exported[role].name in files
    assert any(name.startswith("tokenizer/") for name in files)
    for name, digest in files.items():
        assert file_sha256(folder / name) == digest, name
    image = manifest["image"]
    assert (image["image_size"], image["patch_size"], image["num_heads"], image["num_registers"],
            image["embed_dim"]) == (SIZE, 14, 4, 4, 32)
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 17
    assert manifest["talk2dino_version"]
    assert manifest["model_config"] == json.loads(json.dumps(tiny_model.config.to_dict()))
    assert manifest["weights_info"] == json.loads(json.dumps(tiny_model.weights_info))
    assert max(e for errs in manifest["verification"].values() for e in errs.values()) <= 1e-4


def test_damaged_or_missing_export_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported["config"].parent, copy)
    data = bytearray((copy / "projection.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "projection.onnx").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"projection\.onnx hash mismatch"):
        load_onnx_model(copy)
    with pytest.raises(WeightsError, match="not an ONNX export"):
        load_onnx_model(tmp_path)


def test_export_refuses_a_window_off_the_patch_grid(tiny_model: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        export_onnx(tiny_model, tmp_path, image_size=30)
    assert not list(tmp_path.iterdir())


def test_fixed_batch_export_runs_one_window_at_a_time(tiny_model: Any, tmp_path: Path) -> None:
    export_onnx(tiny_model, tmp_path, image_size=SIZE, dynamic_batch=False)
    model = load_onnx_model(tmp_path)
    assert model.backbone.batch_size == 1 and model.config.inference.window_batch_size == 1
    with pytest.raises(InvalidInputError, match="fixed batch of 1, got 2"):
        model.encode_image(_pixels(2))
    torch.testing.assert_close(model.encode_image(_pixels(1)).patch_tokens,
                               tiny_model.encode_image(_pixels(1)).patch_tokens, **TOLERANCE)
    segmenter = Segmenter(model, dataclasses.replace(model.config.inference, short_side=SIZE, max_long_side=56))
    segmenter.set_classes(["cat", "dog"])
    segmenter.set_image(_image(30, 50))  # 28×46 -> 3 windows, one backbone call each
    assert segmenter.predict().labels.shape == (30, 50)


def test_cli_export_then_segment_with_onnx_runtime(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    """`talk2dino export-onnx` then `segment --runtime onnx` writes the labels the torch runtime writes."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    from talk2dino.cli import main

    parts = ["--backbone", tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"],
             "--projection", tiny_sources["projection"], "--device", "cpu"]
    onnx_dir = tmp_path / "onnx"
    assert main(["-q", "export-onnx", *parts, "--out", str(onnx_dir)]) == 0
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    common = [str(image), "--labels", "cat, dog", "--background", "--no-progress"]
    assert main(["-q", "segment", *common, *parts, "--out", str(tmp_path / "torch")]) == 0
    assert main(["-q", "segment", *common, "--runtime", "onnx", "--onnx-dir", str(onnx_dir),
                 "--out", str(tmp_path / "ort")]) == 0
    ours = np.array(Image.open(tmp_path / "ort" / "img_labels.png"))
    theirs = np.array(Image.open(tmp_path / "torch" / "img_labels.png"))
    assert (ours == theirs).mean() > 0.999
    assert main(["-q", "segment", *common, "--runtime", "onnx", "--out", str(tmp_path / "x")]) == 2
