"""Shared fixtures: locations of ../shared, tiny random models saved to disk, parity weights."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from talk2dino.compat import installed_version, version_tuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TALK2DINO_SHARED", ROOT.parent / "shared")).resolve()
REFERENCE_WEIGHTS = Path(
    os.environ.get("TALK2DINO_REFERENCE_WEIGHTS", SHARED / "reference" / "talk2dino-weights")
).resolve()
BPE = SHARED / "reference" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
IMAGES = SHARED / "reference" / "images"

# The suite runs at both ends of the declared transformers range (.ci/run); DINOv3 exists from 4.56 on.
TRANSFORMERS_VERSION = version_tuple(installed_version("transformers") or "0")
HAS_DINOV3 = TRANSFORMERS_VERSION >= (4, 56)
needs_dinov3 = pytest.mark.skipif(not HAS_DINOV3, reason="DINOv3 needs transformers>=4.56 (the refusal is tested)")

# Under pytest-xdist (`pytest -n 2`, as .ci/run runs the suite) each worker is one of several processes sharing
# the cores: one intra-op thread each, so that two workers do not run four torch threads on two cores. Tests
# that need more threads set them and restore this count. A plain `pytest` keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Declare pytest-xdist's ``xdist_group`` mark when xdist is not installed (a plain `pytest` then ignores it).

    Modules whose module fixtures are costly (a Ray runtime, an ONNX export, the real-size model) carry one, so
    that ``pytest -n 2 --dist loadgroup`` runs each of them in a single worker.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run these tests in one pytest-xdist worker")


def parity_weights() -> Path:
    """Folder with the deterministic real-size parity weights, generated on first use (~5 s, 574 MB)."""
    cache = Path(os.environ.get("T2D_PARITY_CACHE", Path.home() / ".cache" / "t2d-parity"))
    info = cache / "weights_info.json"
    script = SHARED / "parity" / "make_weights.py"
    if not info.is_file():
        if not script.is_file():
            pytest.skip(f"parity generator missing: {script}")
        subprocess.run([sys.executable, str(script), str(cache)], check=True, stdout=subprocess.DEVNULL)
    return cache


def write_clip_tokenizer(folder: Path) -> None:
    """Write a real CLIP tokenizer (vocab.json, merges.txt, configs) into `folder`."""
    from talk2dino.testing.clip_vocab import write_clip_tokenizer as write

    write(BPE, folder)


def tiny_model_args(tiny_sources: dict[str, str]) -> list[str]:
    """CLI flags composing the session's tiny random parts (see `tiny_sources`) on the CPU."""
    return ["--backbone", tiny_sources["backbone"], "--text-encoder", tiny_sources["text_encoder"],
            "--projection", tiny_sources["projection"], "--device", "cpu"]


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`, e.g. blocked on a FIFO read.

    Without ``signal.setitimer`` (not POSIX) the body runs unguarded.
    """
    if not hasattr(signal, "setitimer"):
        yield
        return

    def _expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for over {seconds} s: a FIFO was read")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_noise_image(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> Path:
    """An ``h x w`` RGB image of uniform noise saved at `path` (format from the suffix)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def gradient_image(h: int, w: int, seed: int, noise: float) -> np.ndarray:
    """An ``h x w`` RGB uint8 array: colour ramps along x, y and the diagonal plus Gaussian noise of std `noise`
    (structure that PAMR and the windows act on, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def save_tiny_dinov2(folder: Path, *, registers: int = 4, hidden: int = 32, heads: int = 4, layers: int = 2,
                     seed: int = 0, swiglu: bool = False, rough: bool = False) -> Path:
    """A tiny random DINOv2 (with or without registers), saved with save_pretrained.

    `swiglu` gives the ViT-g feed-forward; `rough` replaces transformers' near-zero init by O(1) weights.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                  image_size=56, patch_size=14, layerscale_value=0.5, use_swiglu_ffn=swiglu)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    with torch.no_grad():  # make the final norm non-trivial so normalisation bugs show
        model.layernorm.bias.normal_(0, 0.5)
    if rough:
        _roughen(model, seed)
    model.save_pretrained(folder)
    return folder


def _roughen(model: torch.nn.Module, seed: int) -> None:
    """Give every weight and bias O(1/sqrt(fan-in)) random values, so attention logits are O(1) and
    bias or normalisation bugs show (transformers' default init makes them nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim in (2, 4):  # linear and conv weights
                std = p[0].numel() ** -0.5
            else:  # token / position embeddings (3-d) and vectors
                std = 1.0 if p.ndim == 3 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and "weight" in name else 0.0))


def save_tiny_dinov3(folder: Path, *, registers: int = 4, hidden: int = 32, heads: int = 4, layers: int = 2,
                     patch: int = 16, gated_mlp: bool = False, seed: int = 0) -> Path:
    """A tiny random DINOv3 ViT (registers, RoPE; gated MLP as ViT-H+), saved with save_pretrained."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=2 * hidden, patch_size=patch, image_size=4 * patch,
                             num_register_tokens=registers, layerscale_value=0.5, use_gated_mlp=gated_mlp)
    model = DINOv3ViTModel(config)
    _roughen(model, seed)
    model.save_pretrained(folder)
    return folder


def save_tiny_dino_vit(folder: Path, *, hidden: int = 32, heads: int = 4, layers: int = 2, patch: int = 8,
                       seed: int = 0) -> Path:
    """A tiny random DINO v1-style ViT (transformers ViTModel, no pooler, no registers), saved with save_pretrained."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, patch_size=patch, image_size=4 * patch, layer_norm_eps=1e-6)
    model = ViTModel(config, add_pooling_layer=False)
    _roughen(model, seed)
    model.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, *, hidden: int = 32, projection: int = 512, seed: int = 0) -> Path:
    """A tiny random CLIP text tower with projection and the real CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                            projection_dim=projection, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def save_tiny_projection(path: Path, *, out_dim: int = 32, in_dim: int = 512, seed: int = 0,
                         legacy: bool = False) -> Path:
    """A random psi in the authors' .pth layout (keys linear_layer.*, hidden_layers.0.*)."""
    g = torch.Generator().manual_seed(seed)
    second = "linear_layer2" if legacy else "hidden_layers.0"
    state = {
        "linear_layer.weight": torch.randn(out_dim, in_dim, generator=g) * 0.1,
        "linear_layer.bias": torch.randn(out_dim, generator=g) * 0.1,
        f"{second}.weight": torch.randn(out_dim, out_dim, generator=g) * 0.1,
        f"{second}.bias": torch.randn(out_dim, generator=g) * 0.1,
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Source strings of a tiny DINOv2-reg, a tiny CLIP text tower and a matching psi on disk."""
    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary missing: {BPE}")
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_dinov2(root / "dino")
    save_tiny_clip(root / "clip")
    save_tiny_projection(root / "psi.pth")
    return {"backbone": f"local-dir:{root / 'dino'}", "text_encoder": f"local-dir:{root / 'clip'}",
            "projection": str(root / "psi.pth")}


@pytest.fixture(scope="session")
def tiny_model(tiny_sources: dict[str, str]):
    from talk2dino import create_model

    return create_model(None, device="cpu", **tiny_sources)


def native_kernel_or_skip() -> object:
    """The native PAMR kernel (``ops/pamr_native.c``), built on first use; skips where no C compiler can build
    it, except when ``$TALK2DINO_REQUIRE_NATIVE_PAMR`` is set (.ci/run sets it: CI has a compiler, so the
    kernel's tests can never be skipped there)."""
    from talk2dino.ops.pamr_native import native_pamr

    try:
        return native_pamr(require=True)
    except RuntimeError as error:
        if os.environ.get("TALK2DINO_REQUIRE_NATIVE_PAMR"):
            raise
        pytest.skip(f"the native PAMR kernel cannot be built here: {error}")
