"""The fused Triton PAMR kernels (ops/pamr_triton.py) against ``pamr_reference``, in triton's interpreter.

Triton decides at ``@triton.jit`` time (when ``talk2dino.ops.pamr_triton`` is first imported) whether a kernel
is compiled for a GPU or interpreted on CPU tensors, from ``TRITON_INTERPRET`` in the environment. So this
module runs only in a process started with it, and sets nothing itself: an in-process switch would leave
interpreted kernels (and the variable) behind for every later test of the run, CUDA ones included. CI runs
``TRITON_INTERPRET=1 python -m pytest tests/test_pamr_triton.py -q`` as its own step (.ci/run); in the
default suite the module is skipped. On a GPU the compiled kernels are checked by tests/test_gpu.py.

Tolerance: 1e-5 absolute on scores in [0, 1] (issue 16), the bound the CPU fast path meets too; both are
float32 with different summation orders (the reference's ``sum`` over a stacked dimension).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the fused PAMR kernels are checked under TRITON_INTERPRET=1, set before triton is imported "
                "(TRITON_INTERPRET=1 python -m pytest tests/test_pamr_triton.py); on CUDA: tests/test_gpu.py",
                allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from talk2dino.ops import pamr_triton  # noqa: E402
from talk2dino.ops.pamr import pamr, pamr_reference  # noqa: E402

DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)
ATOL = 1e-5


def _inputs(batch: int, classes: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator) * 255
    masks = torch.rand(batch, classes, height, width, generator=generator)
    return image, masks


def test_kernels_are_interpreted() -> None:
    """The checks below exercise the kernels themselves, on CPU tensors, not some fallback."""
    assert isinstance(pamr_triton._affinity_kernel, InterpretedFunction)
    assert isinstance(pamr_triton._propagate_kernel, InterpretedFunction)


@pytest.mark.parametrize("dilations", [DEFAULT_DILATIONS, (1, 3)])
@pytest.mark.parametrize("iterations", [1, 10])
def test_fused_equals_reference(dilations: tuple[int, ...], iterations: int) -> None:
    image, masks = _inputs(2, 3, 20, 24, seed=len(dilations) * 100 + iterations)
    fused = pamr(image, masks, iterations=iterations, dilations=dilations, fused=True)
    reference = pamr_reference(image, masks, iterations=iterations, dilations=dilations)
    assert fused.shape == reference.shape and fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, atol=ATOL, rtol=0)
    # A real refinement happened (the comparison above is not between two copies of the input).
    assert (fused - masks).abs().max() > 0.05


def test_fused_several_tiles_and_class_blocks() -> None:
    """10 classes (3 blocks of 4, the last ragged) over 23×31 = 713 pixels (2 tiles of 512, the last ragged)."""
    assert pamr_triton._class_block(10) == 4 and pamr_triton._TILE_VALUES // 4 == 512
    image, masks = _inputs(1, 10, 23, 31, seed=1)
    fused = pamr(image, masks, iterations=2, dilations=DEFAULT_DILATIONS, fused=True)
    torch.testing.assert_close(fused, pamr_reference(image, masks, iterations=2, dilations=DEFAULT_DILATIONS),
                               atol=ATOL, rtol=0)


def test_fused_image_smaller_than_dilation_and_many_offsets() -> None:
    """Borders clamp as replicate padding when d exceeds the image; 9 dilations: K = 72, S = 81 (padded to 128)."""
    image, masks = _inputs(1, 3, 7, 5, seed=2)
    torch.testing.assert_close(pamr(image, masks, iterations=3, dilations=DEFAULT_DILATIONS, fused=True),
                               pamr_reference(image, masks, iterations=3, dilations=DEFAULT_DILATIONS),
                               atol=ATOL, rtol=0)
    many = tuple(range(1, 10))
    image, masks = _inputs(1, 2, 12, 13, seed=3)
    torch.testing.assert_close(pamr(image, masks, iterations=2, dilations=many, fused=True),
                               pamr_reference(image, masks, iterations=2, dilations=many), atol=ATOL, rtol=0)


def test_fused_batched_equals_per_window_and_groups(monkeypatch) -> None:
    """Windows are independent: a batch equals per-window calls bit for bit, and so does a batch cut into
    launch groups by the affinity budget."""
    image, masks = _inputs(3, 2, 11, 14, seed=4)
    batched = pamr(image, masks, iterations=3, dilations=(1, 2), fused=True)
    singles = torch.cat([pamr(image[b : b + 1], masks[b : b + 1], iterations=3, dilations=(1, 2), fused=True)
                         for b in range(3)])
    assert torch.equal(batched, singles)
    monkeypatch.setattr(pamr_triton, "_ALPHA_BUDGET_BYTES", 1)  # one window per group
    assert torch.equal(pamr(image, masks, iterations=3, dilations=(1, 2), fused=True), batched)


def test_fused_casts_inputs_and_leaves_them_alone() -> None:
    image, masks = _inputs(1, 2, 9, 10, seed=5)
    image_u8 = image.round().to(torch.uint8)
    masks_t = masks.double().transpose(2, 3).contiguous().transpose(2, 3)  # float64, non-contiguous
    before = masks_t.clone()
    fused = pamr(image_u8, masks_t, iterations=2, dilations=(1, 2), fused=True)
    torch.testing.assert_close(fused, pamr_reference(image_u8, masks, iterations=2, dilations=(1, 2)),
                               atol=ATOL, rtol=0)
    assert torch.equal(masks_t, before)


def test_fused_constant_maps() -> None:
    """A constant score map stays constant; a flat guide (σ = 0, κ = 0) gives uniform weights."""
    image, _ = _inputs(1, 1, 10, 12, seed=6)
    constant = torch.full((1, 2, 10, 12), 0.25)
    torch.testing.assert_close(pamr(image, constant, iterations=4, dilations=(1, 2), fused=True), constant,
                               atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 10, 12), 80.0)
    _, masks = _inputs(1, 2, 10, 12, seed=7)
    torch.testing.assert_close(pamr(flat, masks, iterations=2, dilations=(1, 2), fused=True),
                               pamr_reference(flat, masks, iterations=2, dilations=(1, 2)), atol=ATOL, rtol=0)


# Run in a child without TRITON_INTERPRET: in an interpreting process triton's code generator is set up for
# the interpreter and fails on valid kernels. The child compiles with a private cache, so it really compiles.
_COMPILE_SCRIPT = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from talk2dino.ops import pamr_triton as m

def build(kernel, signature, constants, capability):
    # triton < 3.3 names the constexpr values `constants` (3.2 is what torch 2.6's CUDA wheels bring).
    keyword = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters else "constants"
    source = ASTSource(fn=kernel, signature=signature, **{keyword: constants})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 0

ptrs = dict.fromkeys(("nb_dy_ptr", "nb_dx_ptr"), "*i32")
block_c = m._class_block(21)  # VOC-21
for capability in (80, 90):
    build(m._affinity_kernel,
          {"image_ptr": "*fp32", **ptrs, "st_dy_ptr": "*i32", "st_dx_ptr": "*i32", "alpha_ptr": "*fp32",
           "height": "i32", "width": "i32", "std_eps": "fp32", "std_scale": "fp32", "K": "constexpr",
           "K_PAD": "constexpr", "S": "constexpr", "S_PAD": "constexpr", "BLOCK": "constexpr"},
          {"K": 48, "K_PAD": 64, "S": 54, "S_PAD": 64, "BLOCK": m._TILE_VALUES // 64}, capability)
    build(m._propagate_kernel,
          {"source_ptr": "*fp32", "alpha_ptr": "*fp32", **ptrs, "target_ptr": "*fp32", "classes": "i32",
           "height": "i32", "width": "i32", "K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"},
          {"K": 48, "BLOCK_C": block_c, "BLOCK_P": m._TILE_VALUES // block_c}, capability)
print("compiled")
"""


def test_kernels_compile_for_gpus(tmp_path) -> None:
    """The interpreter never runs triton's compiler: build both kernels, as launched for VOC-21 with the
    default dilations, for A100 (sm_80) and H100/H200 (sm_90) down to a cubin with the ptxas triton ships,
    no GPU needed. Catches what only the compiler sees (types, layouts, unsupported constructs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-3000:]


def test_cpu_tensors_take_the_torch_path_by_default(monkeypatch) -> None:
    """Even with interpreted kernels importable, ``pamr`` on CPU tensors stays the torch formulation."""
    from talk2dino.ops import pamr as pamr_module

    def fail() -> None:
        raise AssertionError("the fused kernels were looked up for CPU tensors")

    image, masks = _inputs(1, 2, 8, 9, seed=8)
    expected = pamr(image, masks, iterations=2, dilations=(1, 2), fused=False)
    monkeypatch.setattr(pamr_module, "_fused_kernel", fail)
    assert torch.equal(pamr(image, masks, iterations=2, dilations=(1, 2)), expected)
