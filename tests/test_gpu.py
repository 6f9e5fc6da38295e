"""GPU checks (marker `gpu`, deselected by default): CUDA results agree with CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talk2dino import InferenceConfig, Segmenter, create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype, min_agreement", [("float32", 0.999), ("bfloat16", 0.95)])
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
