"""Method-math unit tests for talk2dino.ops (method.md §4.3-§4.7), on tiny hand-built tensors."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import native_kernel_or_skip

from talk2dino.ops.cleaning import clean_background
from talk2dino.ops.pamr import pamr, pamr_reference
from talk2dino.ops.similarity import sigmoid_cosine
from talk2dino.ops.sliding import resized_size, softmax_argmax, stitch, window_grid

PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)
WINDOW = 448
STRIDE = 224
SHORT_SIDE = 448
MAX_LONG_SIDE = 2048


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


# --------------------------------------------------------------------------- sigmoid_cosine (§4.4 step 5)


def test_sigmoid_cosine_hand_computed() -> None:
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Norms 5, 2, 0 and 1e-7 (below the 1e-6 floor, so it is divided by 1e-6, not by its own norm).
    patches = torch.tensor([[[3.0, 4.0], [0.0, -2.0], [0.0, 0.0], [1e-7, 0.0]]])
    scores = sigmoid_cosine(patches, classes)
    cosines = [[0.6, 0.0, 0.0, 0.1], [0.8, -1.0, 0.0, 0.0]]
    expected = torch.tensor([[[_sigmoid(c) for c in row] for row in cosines]], dtype=torch.float32)
    assert scores.shape == (1, 2, 4)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


def test_sigmoid_cosine_zero_patch_is_half_not_nan() -> None:
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    patches = torch.zeros(2, 5, 8, dtype=torch.float16)
    scores = sigmoid_cosine(patches, classes)
    assert not torch.isnan(scores).any()
    assert torch.equal(scores, torch.full((2, 3, 5), 0.5))


def test_sigmoid_cosine_rejects_width_mismatch() -> None:
    with pytest.raises(ValueError, match="width mismatch"):
        sigmoid_cosine(torch.randn(1, 4, 8), torch.randn(2, 6))


# --------------------------------------------------------------------------- clean_background (§4.5)


def _clean_numpy(
    scores: np.ndarray, tokens: np.ndarray, logits: np.ndarray, classes: np.ndarray, lam: float, mode: str
) -> np.ndarray:
    """method.md §4.5 for one window, with explicit loops in float64."""
    num_classes, num_patches = scores.shape
    num_heads, width = logits.shape[0], tokens.shape[1]
    heads = np.zeros((num_heads, width))
    for m in range(num_heads):
        if mode == "logits":
            coefficients = [logits[m, p] / num_patches for p in range(num_patches)]
        else:
            exps = [math.exp(logits[m, p]) for p in range(num_patches)]
            coefficients = [e / sum(exps) for e in exps]
        for p in range(num_patches):
            heads[m] += coefficients[p] * tokens[p]
        heads[m] /= math.sqrt(sum(v * v for v in heads[m]))
    attn = np.zeros((num_classes, num_patches))
    for n in range(num_classes):
        exps = [math.exp(sum(classes[n, d] * heads[m, d] for d in range(width))) for m in range(num_heads)]
        weights = [e / sum(exps) for e in exps]
        mixed = [sum(weights[m] * logits[m, p] for m in range(num_heads)) for p in range(num_patches)]
        exps = [math.exp(v) for v in mixed]
        attn[n] = [e / sum(exps) for e in exps]
    a_lo, a_max = attn.min(), attn.max()
    a_hi = max(a_max, a_max - a_lo)
    s_lo, s_hi = scores.min(), scores.max()
    rescaled = (attn - a_lo) / a_hi * (s_hi - s_lo) + s_lo
    return (scores + lam * rescaled) / (1 + lam)


def _tiny_cleaning_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([[[1.0, 2.0], [-0.5, 1.5], [2.0, -1.0]]])  # [1, P=3, D=2]
    logits = torch.tensor([[[0.3, -1.2, 2.0], [1.5, 0.2, -0.7]]])  # [1, M=2, P=3]
    classes = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])  # [N=2, D=2], unit rows
    scores = sigmoid_cosine(tokens, classes)  # [1, N=2, P=3]
    return scores, tokens, logits, classes


@pytest.mark.parametrize("mode", ["logits", "softmax"])
def test_clean_background_hand_computed(mode: Literal["logits", "softmax"]) -> None:
    scores, tokens, logits, classes = _tiny_cleaning_inputs()
    cleaned = clean_background(scores, tokens, logits, classes, lam=0.2, head_embedding=mode)
    expected = _clean_numpy(
        scores[0].double().numpy(),
        tokens[0].double().numpy(),
        logits[0].double().numpy(),
        classes.double().numpy(),
        0.2,
        mode,
    )
    assert cleaned.shape == (1, 2, 3)
    assert cleaned.dtype == torch.float32
    np.testing.assert_allclose(cleaned[0].numpy(), expected, atol=1e-6, rtol=0)


def test_clean_background_modes_differ() -> None:
    scores, tokens, logits, classes = _tiny_cleaning_inputs()
    current = clean_background(scores, tokens, logits, classes, lam=0.2, head_embedding="logits")
    legacy = clean_background(scores, tokens, logits, classes, lam=0.2, head_embedding="softmax")
    assert not torch.allclose(current, legacy)


def test_clean_background_lambda_zero_is_identity() -> None:
    scores, tokens, logits, classes = _tiny_cleaning_inputs()
    cleaned = clean_background(scores, tokens, logits, classes, lam=0.0)
    torch.testing.assert_close(cleaned, scores, atol=0, rtol=0)


def _random_cleaning_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, 16, 8, generator=generator) * 3
    logits = torch.randn(batch, 4, 16, generator=generator) * 2
    classes = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scores = sigmoid_cosine(tokens, classes)
    return scores, tokens, logits, classes


@pytest.mark.parametrize("mode", ["logits", "softmax"])
def test_clean_background_batched_equals_per_sample(mode: Literal["logits", "softmax"]) -> None:
    scores, tokens, logits, classes = _random_cleaning_batch(3)
    batched = clean_background(scores, tokens, logits, classes, lam=0.2, head_embedding=mode)
    for b in range(3):
        single = clean_background(
            scores[b : b + 1], tokens[b : b + 1], logits[b : b + 1], classes, lam=0.2, head_embedding=mode
        )
        torch.testing.assert_close(batched[b : b + 1], single, atol=0, rtol=0)


def test_clean_background_statistics_are_per_sample() -> None:
    scores, tokens, logits, classes = _random_cleaning_batch(3)
    before = clean_background(scores, tokens, logits, classes, lam=0.2)
    changed = scores.clone()
    changed[1] = changed[1] * 0.5 + 0.4  # moves sample 1's min and max
    after = clean_background(changed, tokens, logits, classes, lam=0.2)
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


# --------------------------------------------------------------------------- PAMR (§4.7)


def _pamr_numpy(image: np.ndarray, mask: np.ndarray, iterations: int, dilations: tuple[int, ...]) -> np.ndarray:
    """method.md §4.7 for one image, with explicit per-pixel loops in float64. image [3,H,W], mask [C,H,W]."""
    _, height, width = image.shape

    def at(array: np.ndarray, y: int, x: int) -> np.ndarray:  # replicate border
        return array[:, min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    stencils = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = [offset for offset in stencils if offset != (0, 0)]
    alpha = np.zeros((len(neighbours), height, width))
    for y in range(height):
        for x in range(width):
            values = np.stack([at(image, y + dy, x + dx) for dy, dx in stencils], axis=1)  # [3, 9·len(d)]
            spread = values.std(axis=1, ddof=1)
            kappa = [
                np.mean(-np.abs(image[:, y, x] - at(image, y + dy, x + dx)) / (1e-8 + 0.1 * spread))
                for dy, dx in neighbours
            ]
            exps = np.exp(np.array(kappa) - max(kappa))
            alpha[:, y, x] = exps / exps.sum()
    for _ in range(iterations):
        updated = np.zeros_like(mask)
        for y in range(height):
            for x in range(width):
                for k, (dy, dx) in enumerate(neighbours):
                    updated[:, y, x] += alpha[k, y, x] * at(mask, y + dy, x + dx)
        mask = updated
    return mask


@pytest.fixture(params=[False, True], ids=["torch", "native"])
def cpu_path(request: pytest.FixtureRequest) -> bool:
    """Both CPU implementations of `pamr`: the torch formulation and the native kernel (tests/test_pamr_native.py
    has the kernel's own tests; ``native_kernel_or_skip`` says when it may be skipped)."""
    if request.param:
        native_kernel_or_skip()
    return bool(request.param)


def _random_pamr_inputs(
    batch: int, classes: int, height: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator) * 255
    masks = torch.rand(batch, classes, height, width, generator=generator)
    return image, masks


def test_pamr_matches_reference_odd_size(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(2, 5, 37, 53, seed=1)
    fast = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
    slow = pamr_reference(image, masks, iterations=10, dilations=PAMR_DILATIONS)
    assert fast.shape == masks.shape
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert not torch.allclose(fast, masks, atol=1e-3)  # it actually did something


def test_pamr_matches_reference_image_smaller_than_dilation(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(1, 3, 7, 5, seed=2)
    fast = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
    slow = pamr_reference(image, masks, iterations=10, dilations=PAMR_DILATIONS)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_pamr_hand_computed_one_iteration(cpu_path: bool) -> None:
    image = np.array(
        [
            [[10.0, 200.0, 30.0], [40.0, 50.0, 250.0], [70.0, 80.0, 90.0]],
            [[0.0, 20.0, 40.0], [60.0, 80.0, 100.0], [120.0, 140.0, 160.0]],
            [[255.0, 0.0, 128.0], [64.0, 32.0, 16.0], [8.0, 4.0, 2.0]],
        ]
    )
    mask = np.array(
        [
            [[0.1, 0.9, 0.3], [0.5, 0.2, 0.8], [0.7, 0.4, 0.6]],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    expected = _pamr_numpy(image, mask, iterations=1, dilations=(1,))
    result = pamr(torch.from_numpy(image).float()[None], torch.from_numpy(mask).float()[None], iterations=1,
                  dilations=(1,), native=cpu_path)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-6, rtol=0)


def test_pamr_hand_computed_two_dilations_two_iterations(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(1, 2, 4, 5, seed=3)
    expected = _pamr_numpy(image[0].double().numpy(), masks[0].double().numpy(), iterations=2, dilations=(1, 2))
    result = pamr(image, masks, iterations=2, dilations=(1, 2), native=cpu_path)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-6, rtol=0)


def test_pamr_constant_mask_stays_constant(cpu_path: bool) -> None:
    image, _ = _random_pamr_inputs(1, 1, 20, 17, seed=4)
    masks = torch.full((1, 4, 20, 17), 0.625)
    result = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
    # Each step is a convex combination; only float32 rounding of Σα = 1 and of the sums remains.
    torch.testing.assert_close(result, masks, atol=1e-5, rtol=0)


def test_pamr_constant_image_gives_uniform_affinities(cpu_path: bool) -> None:
    image = torch.full((1, 3, 6, 7), 128.0)
    _, masks = _random_pamr_inputs(1, 2, 6, 7, seed=5)
    result = pamr(image, masks, iterations=1, dilations=(1, 2), native=cpu_path)
    padded = torch.nn.functional.pad(masks, [2] * 4, mode="replicate")
    neighbours = [(dy * d, dx * d) for d in (1, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    expected = sum(padded[..., 2 + dy : 2 + dy + 6, 2 + dx : 2 + dx + 7] for dy, dx in neighbours) / len(neighbours)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)


def test_pamr_batched_equals_per_sample(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(3, 4, 19, 23, seed=6)
    batched = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
    for b in range(3):
        single = pamr(image[b : b + 1], masks[b : b + 1], iterations=10, dilations=PAMR_DILATIONS,
                      native=cpu_path)
        torch.testing.assert_close(batched[b : b + 1], single, atol=0, rtol=0)


def test_pamr_classes_are_independent(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(1, 6, 15, 16, seed=7)
    whole = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
    chunks = torch.cat(
        [pamr(image, masks[:, c : c + 4], iterations=10, dilations=PAMR_DILATIONS, native=cpu_path)
         for c in range(0, 6, 4)], dim=1
    )
    torch.testing.assert_close(whole, chunks, atol=0, rtol=0)


def _pamr_shift_accumulate(image: torch.Tensor, masks: torch.Tensor, iterations: int,
                           dilations: tuple[int, ...]) -> torch.Tensor:
    """The previous fast PAMR, kept as a second independent check: affinities as `[B, K, H, W]` with a
    softmax over dim 1, then per step the 48 weighted padded shifts accumulated into one buffer."""
    from talk2dino.ops.pamr import STD_EPS, STD_SCALE, _stencil_offsets

    height, width = image.shape[-2:]
    pad = max(dilations)

    def shifted(padded: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]

    neighbours = _stencil_offsets(dilations, include_centre=False)
    stencil = _stencil_offsets(dilations, include_centre=True)
    out = []
    for b in range(image.shape[0]):
        guide = image[b : b + 1]
        padded_guide = torch.nn.functional.pad(guide, [pad] * 4, mode="replicate")
        mean = sum(shifted(padded_guide, dy, dx) for dy, dx in stencil) / len(stencil)
        squares = sum((shifted(padded_guide, dy, dx) - mean).square() for dy, dx in stencil)
        denominator = STD_EPS + STD_SCALE * (squares / (len(stencil) - 1)).sqrt()
        kappa = torch.stack([(-(guide - shifted(padded_guide, dy, dx)).abs() / denominator).mean(dim=1)
                             for dy, dx in neighbours], dim=1)
        weights = torch.softmax(kappa, dim=1).unsqueeze(2)  # [1, K, 1, H, W]
        refined = masks[b : b + 1]
        for _ in range(iterations):
            padded = torch.nn.functional.pad(refined, [pad] * 4, mode="replicate")
            accumulated = torch.zeros_like(refined)
            for index, (dy, dx) in enumerate(neighbours):
                accumulated.addcmul_(weights[:, index], shifted(padded, dy, dx))
            refined = accumulated
        out.append(refined)
    return torch.cat(out)


@pytest.mark.parametrize(("classes", "height", "width"), [(21, 64, 80), (1, 9, 31), (17, 50, 3)])
def test_pamr_gather_matches_shift_accumulation(classes: int, height: int, width: int) -> None:
    """The embedding-bag propagation equals the shift-and-accumulate formulation bit for bit: same
    affinity arithmetic, and the K weighted terms summed in the same order (images of up to one band of
    affinity rows, so that the softmax runs over the same extent)."""
    image, masks = _random_pamr_inputs(2, classes, height, width, seed=11)
    fast = pamr(image, masks, iterations=10, dilations=PAMR_DILATIONS, native=False)
    plain = _pamr_shift_accumulate(image, masks, 10, PAMR_DILATIONS)
    # With a single class, addcmul_ takes another (fused multiply-add) kernel: rounding-level differences.
    torch.testing.assert_close(fast, plain, atol=0 if classes > 1 else 1e-6, rtol=0)
    torch.testing.assert_close(fast, pamr_reference(image, masks, iterations=10, dilations=PAMR_DILATIONS),
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pamr_full_window_equals_shift_accumulation() -> None:
    """A full 448×448 window (several bands of affinity rows) is still bit-for-bit the plain formulation."""
    image, masks = _random_pamr_inputs(1, 3, 448, 448, seed=13)
    image = image.round()
    fast = pamr(image, masks, iterations=2, dilations=PAMR_DILATIONS, native=False)
    torch.testing.assert_close(fast, _pamr_shift_accumulate(image, masks, 2, PAMR_DILATIONS), atol=0, rtol=0)


@pytest.mark.parametrize("dim", [0, -1])
def test_in_place_softmax_equals_torch_softmax(dim: int) -> None:
    from talk2dino.ops.pamr import _softmax_

    logits = torch.randn(48, 1000, generator=torch.Generator().manual_seed(14)) * 20
    expected = torch.softmax(logits, dim=dim)
    assert torch.equal(_softmax_(logits.clone(), dim=dim), expected)


def test_pamr_inside_then_outside_inference_mode(cpu_path: bool, monkeypatch) -> None:
    """The reused scratch buffer stays writable whichever mode made it."""
    import talk2dino.ops.pamr as pamr_module

    monkeypatch.setattr(pamr_module._SCRATCH, "buffer", None, raising=False)  # made by the next call
    image, masks = _random_pamr_inputs(1, 2, 23, 45, seed=15)
    with torch.inference_mode():
        inside = pamr(image, masks, iterations=2, dilations=PAMR_DILATIONS, native=cpu_path)
    outside = pamr(image, masks, iterations=2, dilations=PAMR_DILATIONS, native=cpu_path)
    assert torch.equal(inside, outside)


def test_pamr_accepts_non_contiguous_masks(cpu_path: bool) -> None:
    image, masks = _random_pamr_inputs(1, 5, 24, 20, seed=12)
    channels_last = masks.contiguous(memory_format=torch.channels_last)
    transposed = masks.transpose(2, 3).contiguous().transpose(2, 3)
    expected = pamr(image, masks, iterations=3, dilations=PAMR_DILATIONS, native=cpu_path)
    for variant in (channels_last, transposed):
        assert torch.equal(pamr(image, variant, iterations=3, dilations=PAMR_DILATIONS, native=cpu_path), expected)


def test_pamr_neighbour_index_is_replicate_clamped() -> None:
    from talk2dino.ops.pamr import _neighbour_index

    index = _neighbour_index(5, 7, (1, 3), torch.device("cpu"))
    assert index.shape == (35, 16) and index.dtype == torch.int32
    # Pixel (0, 0): offsets of dilation 1 in row-major order, clamped at the top-left corner.
    assert index[0, :8].tolist() == [0, 0, 1, 0, 1, 7, 7, 8]
    # Pixel (4, 6), dilation 3: (1, 3) (1, 6) (1, 6) (4, 3) (4, 6) (4, 3) (4, 6) (4, 6).
    assert index[34, 8:].tolist() == [10, 13, 13, 31, 34, 31, 34, 34]
    assert _neighbour_index(5, 7, (1, 3), torch.device("cpu")) is index  # cached per geometry


def test_pamr_rejects_size_mismatch() -> None:
    with pytest.raises(ValueError, match="must share"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4), iterations=1, dilations=(1,))


def test_pamr_dispatch_to_the_fused_kernels(monkeypatch) -> None:
    """CPU tensors take the torch path unless ``fused=True``; the kernels get float32 inputs and their
    result is returned as is; ``iterations=0`` never launches anything. (The kernels themselves:
    tests/test_pamr_triton.py, in triton's interpreter, and tests/test_gpu.py on CUDA.)"""
    import talk2dino.ops.pamr as pamr_module

    calls: list[tuple[torch.dtype, torch.dtype, int, tuple[int, ...]]] = []
    sentinel = torch.full((1, 2, 6, 7), 7.0)

    def fake_kernel(image: torch.Tensor, masks: torch.Tensor, *, iterations: int,
                    dilations: tuple[int, ...]) -> torch.Tensor:
        calls.append((image.dtype, masks.dtype, iterations, tuple(dilations)))
        return sentinel

    monkeypatch.setattr(pamr_module, "_fused_kernel", lambda: fake_kernel)
    image, masks = _random_pamr_inputs(1, 2, 6, 7, seed=16)
    torch_path = pamr(image, masks, iterations=2, dilations=(1, 2))
    assert not calls and not torch.equal(torch_path, sentinel)
    assert torch.equal(pamr(image, masks, iterations=2, dilations=(1, 2), fused=False), torch_path)
    assert not calls
    assert pamr(image.to(torch.uint8), masks.double(), iterations=2, dilations=(1, 2), fused=True) is sentinel
    assert calls == [(torch.float32, torch.float32, 2, (1, 2))]
    assert torch.equal(pamr(image, masks, iterations=0, dilations=(1,), fused=True), masks)
    assert len(calls) == 1


def test_pamr_fused_without_triton(monkeypatch) -> None:
    import talk2dino.ops.pamr as pamr_module

    monkeypatch.setattr(pamr_module, "_fused_kernel", lambda: None)
    image, masks = _random_pamr_inputs(1, 2, 6, 7, seed=17)
    with pytest.raises(RuntimeError, match="needs triton"):
        pamr(image, masks, iterations=1, dilations=(1,), fused=True)
    assert not pamr_module.fused_pamr_available()
    assert torch.equal(pamr(image, masks, iterations=1, dilations=(1,)), pamr(image, masks, iterations=1,
                                                                               dilations=(1,), fused=False))


def test_importing_talk2dino_never_imports_triton() -> None:
    """The fused kernels are imported on first use with a CUDA tensor (or ``fused=True``), never before: a
    CPU install needs no triton and pays no import time."""
    import subprocess
    import sys

    # Whether torch itself imports triton is torch's business (some CUDA builds may): only talk2dino's own
    # imports are checked.
    script = ("import sys, torch\n"
              "by_torch = 'triton' in sys.modules\n"
              "import talk2dino, talk2dino.predictor, talk2dino.ops.pamr as p\n"
              "p.pamr(torch.rand(1, 3, 5, 6) * 255, torch.rand(1, 2, 5, 6), iterations=1, dilations=(1,))\n"
              "print('talk2dino.ops.pamr_triton' in sys.modules, 'triton' in sys.modules and not by_torch)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False False"


# --------------------------------------------------------------------------- geometry (§4.3)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (375, 500, (448, 597)),  # VOC worked example, 500×375 (w×h)
        (1024, 2048, (448, 896)),  # Cityscapes worked example
        (300, 451, (448, 673)),  # golden parity image chelsea.png
        (448, 10000, (92, 2048)),  # extreme aspect ratio: capped by the long side
        (512, 600, (448, 525)),  # downscale, 600×512 (w×h)
        (448, 448, (448, 448)),
    ],
)
def test_resized_size(height: int, width: int, expected: tuple[int, int]) -> None:
    assert resized_size(height, width, short_side=SHORT_SIDE, max_long_side=MAX_LONG_SIDE) == expected


@pytest.mark.parametrize(("height", "width"), [(0, 10), (10, -1)])
def test_resized_size_rejects_non_positive(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        resized_size(height, width, short_side=SHORT_SIDE, max_long_side=MAX_LONG_SIDE)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (448, 597, [(0, 448, 0, 448), (0, 448, 149, 597)]),
        (448, 896, [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 448, 896)]),
        (448, 673, [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 225, 673)]),  # golden parity boxes
        (448, 448, [(0, 448, 0, 448)]),
        (300, 200, [(0, 300, 0, 200)]),  # smaller than the window: one window covering all
        (92, 2048, [(0, 92, x, x + 448) for x in [*range(0, 1569, 224), 1600]]),
        (672, 449, [(0, 448, 0, 448), (0, 448, 1, 449), (224, 672, 0, 448), (224, 672, 1, 449)]),
    ],
)
def test_window_grid(height: int, width: int, expected: list[tuple[int, int, int, int]]) -> None:
    assert window_grid(height, width, window=WINDOW, stride=STRIDE) == expected


def test_window_grid_covers_every_pixel() -> None:
    for height, width in [(448, 597), (500, 1000), (92, 2048), (449, 450)]:
        boxes = window_grid(height, width, window=WINDOW, stride=STRIDE)
        covered = torch.zeros(height, width, dtype=torch.bool)
        for y1, y2, x1, x2 in boxes:
            assert y2 - y1 == min(WINDOW, height) and x2 - x1 == min(WINDOW, width)
            covered[y1:y2, x1:x2] = True
        assert covered.all()


def test_stitch_hand_computed_overlap() -> None:
    first = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    second = torch.tensor([[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]])
    result = stitch(torch.stack([first, second]), [(0, 2, 0, 3), (0, 2, 1, 4)], 2, 4)
    expected = torch.tensor([[[1.0, 6.0, 11.5, 30.0], [4.0, 22.5, 28.0, 60.0]]])
    assert torch.equal(result, expected)


def test_stitch_uncovered_pixel_raises() -> None:
    with pytest.raises(ValueError, match="covered by no window"):
        stitch(torch.ones(1, 1, 2, 3), [(0, 2, 0, 3)], 2, 4)


def test_stitch_box_block_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="block"):
        stitch(torch.ones(1, 1, 2, 3), [(0, 2, 0, 4)], 2, 4)


# --------------------------------------------------------------------------- softmax_argmax (§4.8 step 4)


def _engineered_near_ties(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random scores in the pipeline's range with many exact ties and 1-, 2-, 3- and k-ulp near-ties
    between the best channel and another (lower or higher) channel."""
    generator = torch.Generator().manual_seed(seed)
    scores = 0.27 + 0.46 * torch.rand(channels, height, width, generator=generator)
    flat = scores.view(channels, -1)
    pixels = flat.shape[1]
    best = flat.argmax(dim=0)
    top = flat.max(dim=0).values
    chosen = torch.randperm(pixels, generator=generator)[: pixels * 3 // 4]
    other = torch.randint(0, channels, (pixels,), generator=generator)
    ulps = torch.randint(-1, 40, (pixels,), generator=generator)  # -1: copy the exact value
    for p in chosen.tolist():
        c, b = int(other[p]), int(best[p])
        if c == b:
            continue
        value = top[p].clone()
        for _ in range(max(int(ulps[p]), 0)):
            value = torch.nextafter(value, torch.tensor(0.0))
        flat[c, p] = value
    # A constant channel like the background threshold, tied with some pixels' best score exactly.
    scores[0, : height // 3] = 0.55
    return scores


@pytest.mark.parametrize(("channels", "height", "width", "seed"),
                         [(21, 97, 131, 0), (2, 70, 64, 1), (5, 200, 33, 2), (1, 10, 10, 3), (60, 17, 300, 4)])
def test_softmax_argmax_equals_softmax_then_argmax(channels: int, height: int, width: int, seed: int) -> None:
    scores = _engineered_near_ties(channels, height, width, seed)
    expected = torch.softmax(scores, dim=0).argmax(dim=0)
    got = softmax_argmax(scores)
    assert got.dtype == torch.int64 and got.shape == (height, width)
    assert torch.equal(got, expected)
    if channels > 1:
        # The test exercises the point: the softmax changes the plain argmax somewhere.
        assert not torch.equal(scores.argmax(dim=0), expected) or channels == 2


def test_softmax_argmax_exact_ties_go_to_lowest_index() -> None:
    scores = torch.tensor([[[0.5, 0.7]], [[0.6, 0.7]], [[0.6, 0.2]]])  # [3, 1, 2]
    assert softmax_argmax(scores).tolist() == [[1, 0]]


def test_softmax_argmax_bilinear_resized_scores() -> None:
    """On resized stitched maps, as in the predictor, including a constant background channel."""
    generator = torch.Generator().manual_seed(5)
    stitched = 0.27 + 0.46 * torch.rand(20, 40, 53, generator=generator)
    stitched = torch.cat([torch.full((1, 40, 53), 0.55), stitched])
    stitched[3] = stitched[7]  # duplicated channel: exact ties everywhere between 3 and 7
    final = torch.nn.functional.interpolate(stitched[None], size=(375, 500), mode="bilinear",
                                            align_corners=False)[0]
    assert torch.equal(softmax_argmax(final), torch.softmax(final, dim=0).argmax(dim=0))


def test_softmax_argmax_nan_and_shape_checks() -> None:
    scores = torch.rand(4, 3, 3)
    scores[:, 1, 1] = float("nan")
    scores[2, 0, 0] = float("nan")
    assert torch.equal(softmax_argmax(scores), torch.softmax(scores, dim=0).argmax(dim=0))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        softmax_argmax(torch.zeros(3, 4))
