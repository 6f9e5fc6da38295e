"""GPU checks (marker `gpu`, deselected by default): CUDA results agree with CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talk2dino import InferenceConfig, Segmenter, create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype, min_agreement", [("float32", 0.999), ("bfloat16", 0.95), ("float16", 0.95)])
def test_cuda_matches_cpu(tiny_sources, dtype: str, min_agreement: float) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    config = InferenceConfig(short_side=56, window=28, stride=14, background=True)
    labels = []
    for device, dt in (("cpu", "float32"), ("cuda", dtype)):
        seg = Segmenter(create_model(None, device=device, dtype=dt, **tiny_sources), config)
        seg.set_classes(["cat", "dog", "sky"])
        seg.set_image(image)
        labels.append(seg.predict().labels)
    assert (labels[0] == labels[1]).float().mean().item() >= min_agreement


def test_compiled_backbone_on_cuda_matches_eager(tiny_sources) -> None:
    """`--compile` on GPU: the inductor-compiled fast path gives the eager outputs (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = create_model(None, device="cuda", **tiny_sources)
    x = torch.randn(4, 3, 28, 42, generator=torch.Generator().manual_seed(0)).cuda()
    eager = model.backbone(x)
    model.backbone.compile_fast_path()
    compiled = model.backbone(x)
    for name in ("patch_tokens", "attn_logits"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-4, rtol=1e-4)


def test_folder_loader_pins_windows_for_cuda(tmp_path) -> None:
    from PIL import Image

    from talk2dino.cli.batch import prepared_batches

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    config = InferenceConfig(short_side=56, window=28, stride=14)
    (item,) = next(iter(prepared_batches([path], config, batch_size=1, workers=1, pin_memory=True)))
    assert item.image is not None and item.image.guides.is_pinned()
