"""GPU checks (marker `gpu`, deselected by default): CUDA results agree with CPU."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from talk2dino import InferenceConfig, Segmenter, create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture
def full_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls *and* cuDNN convolutions (PyTorch leaves the latter on by default), restored
    afterwards so later tests see the process defaults."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


def test_compiled_backbone_on_cuda_matches_eager(tiny_sources, full_fp32) -> None:
    """`--compile` on GPU: the inductor-compiled fast path gives the eager outputs (fp32, TF32 off everywhere).

    Issue 16: this failed on an H200 (atol 1e-4) when only matmul TF32 was turned off. Evidence, gathered
    without a GPU: (1) on CPU the inductor-compiled fast path equals eager within 4.8e-7 (patch tokens,
    |x| ≤ 3.6) and 6.5e-9 (logits), the same model and input as here, so the compiled computation is the
    same computation; (2) `torch.backends.cudnn.allow_tf32` is True by default, so the patch-embedding Conv2d
    may run in TF32, and inductor does not hand cuDNN the same call as eager: it peels the bias off and, for
    a small graph like this one (one conv of ≤ 64 channels, < 300 nodes: `GraphLowering.decide_layout_opt`),
    converts the conv to channels-last, another cuDNN algorithm, which may use TF32 where eager's does not
    (or the reverse); (3) emulating that on CPU (conv inputs rounded to TF32 in one path only) moves the
    patch tokens by 1.3e-3, beyond atol = rtol = 1e-4. So it was the precision mode, not a difference in
    the computation. To confirm on a GPU: with cuDNN TF32 off as well the difference is ~1e-6 (the message
    below prints it). The comparison with the plain path checks that both are right, not merely equal.
    """
    model = create_model(None, device="cuda", **tiny_sources)
    x = torch.randn(4, 3, 28, 42, generator=torch.Generator().manual_seed(0)).cuda()
    eager = model.backbone(x)
    reference = model.backbone.forward_reference(x)
    model.backbone.compile_fast_path()
    compiled = model.backbone(x)
    for name in ("patch_tokens", "cls_token", "attn_logits"):
        got, want, plain = getattr(compiled, name), getattr(eager, name), getattr(reference, name)
        gaps = (f"{name}: |compiled - eager| {(got - want).abs().max():.2e}, "
                f"|eager - plain| {(want - plain).abs().max():.2e}")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=gaps)
        torch.testing.assert_close(want, plain, atol=1e-4, rtol=1e-4, msg=gaps)


@pytest.mark.parametrize("dilations", [(1, 2, 4, 8, 12, 24), (1, 3)])
def test_fused_pamr_on_cuda_matches_reference(dilations: tuple[int, ...]) -> None:
    """The compiled Triton kernels (``pamr``'s default on CUDA) on two real-size windows, VOC-21: equal to
    ``pamr_reference`` and to the torch path within 1e-5, batched equal to per-window bit for bit, and no
    host synchronisation once the offset tables are cached."""
    from talk2dino.ops.pamr import fused_pamr_available, pamr, pamr_reference

    if not fused_pamr_available():
        pytest.skip("triton is not importable")
    generator = torch.Generator().manual_seed(16)
    image = (torch.rand(2, 3, 448, 448, generator=generator) * 255).round().cuda()
    masks = (0.27 + 0.46 * torch.rand(2, 21, 448, 448, generator=generator)).cuda()
    fused = pamr(image, masks, iterations=10, dilations=dilations)
    torch.testing.assert_close(fused, pamr_reference(image, masks, iterations=10, dilations=dilations),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, pamr(image, masks, iterations=10, dilations=dilations, fused=False),
                               atol=1e-5, rtol=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        single = pamr(image[1:], masks[1:], iterations=10, dilations=dilations)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(single, fused[1:])


def test_folder_loader_pins_windows_for_cuda(tmp_path) -> None:
    from PIL import Image

    from talk2dino.cli.batch import prepared_batches

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    config = InferenceConfig(short_side=56, window=28, stride=14)
    (item,) = next(iter(prepared_batches([path], config, batch_size=1, workers=1, pin_memory=True)))
    assert item.image is not None and item.image.guides.is_pinned()
