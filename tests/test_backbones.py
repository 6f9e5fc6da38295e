"""Backbone families behind one interface (issue 7): DINOv3 (RoPE, registers), DINO v1 ViT, DINOv2 SwiGLU.

Tiny random models of each family are built from configs, saved with ``save_pretrained`` and loaded
through the resolver (``create_model(None, backbone="local-dir:...")``). For each family the fast path
equals the plain eager path, and the fast-path logits equal the model's own pre-softmax attention
scores, captured inside the model's attention call (so for DINOv3 after the model's own RoPE).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    HAS_DINOV3,
    REFERENCE_WEIGHTS,
    TRANSFORMERS_VERSION,
    needs_dinov3,
    save_tiny_dino_vit,
    save_tiny_dinov2,
    save_tiny_dinov3,
    save_tiny_projection,
)

from talk2dino import InferenceConfig, Segmenter
from talk2dino.errors import Talk2DinoError, WeightsError
from talk2dino.factory import create_model
from talk2dino.models import DinoV1Backbone, DinoV2Backbone, DinoV3Backbone, Projection, Talk2DINO, VisionBackbone
from talk2dino.models.backbones.layouts import attention_projections, block_list
from talk2dino.registry import BACKBONES, get_model_config, list_models
from talk2dino.weights import load_state_dict, resolve_file

HIDDEN = 32
# family id -> (builder writing a tiny model folder, expected wrapper class, expected G, an input off-square)
# Every family in whatever attention layout the installed transformers ships (models/backbones/layouts.py):
# CI runs this file at the floor (4.48: query/key/value everywhere), at 5.17 (ViT q_proj, DINOv2 query) and
# at the newest release (q_proj everywhere), so each layout is held to the plain eager computation.
FAMILIES: dict[str, tuple[Callable[[Path], Path], type[VisionBackbone], int, tuple[int, int]]] = {
    "dino-vit": (lambda f: save_tiny_dino_vit(f, hidden=HIDDEN, patch=8), DinoV1Backbone, 1, (40, 24)),
    "dinov2-swiglu-noreg": (lambda f: save_tiny_dinov2(f, registers=0, hidden=HIDDEN, swiglu=True, rough=True),
                            DinoV2Backbone, 1, (42, 70)),
    "dinov2-reg": (lambda f: save_tiny_dinov2(f, registers=4, hidden=HIDDEN, rough=True, seed=2),
                   DinoV2Backbone, 5, (56, 28)),
}
if HAS_DINOV3:
    FAMILIES["dinov3"] = (lambda f: save_tiny_dinov3(f, registers=4, hidden=HIDDEN), DinoV3Backbone, 5, (48, 80))
    FAMILIES["dinov3-gated-noreg"] = (
        lambda f: save_tiny_dinov3(f, registers=0, hidden=HIDDEN, patch=8, gated_mlp=True, seed=1),
        DinoV3Backbone, 1, (24, 40))
RECORDER = "t2d_test_score_recorder"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, str]) -> dict[str, Path]:
    """Tiny model folders of every family, plus a psi matching their width (the CLIP is the session's)."""
    root = tmp_path_factory.mktemp("families")
    out = {name: build(root / name) for name, (build, *_rest) in FAMILIES.items()}
    out["psi"] = save_tiny_projection(root / "psi.pth", out_dim=HIDDEN, seed=3)
    return out


@pytest.fixture(scope="module")
def models(folders: dict[str, Path], tiny_sources: dict[str, str]) -> dict[str, Talk2DINO]:
    """Each family composed through the resolver with the session's tiny CLIP and a matching psi."""
    return {name: create_model(None, device="cpu", backbone=f"local-dir:{folders[name]}",
                               text_encoder=tiny_sources["text_encoder"], projection=str(folders["psi"]))
            for name in FAMILIES}


@pytest.fixture()
def score_recorder() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Registers an attention function that records the model's own pre-softmax scores, then runs eager.

    Each call appends ``(q·kᵀ·scaling [B, M, T, T], eager probabilities [B, M, T, T])``, computed from
    the query and key the model passes to its attention function (after RoPE for DINOv3).
    """
    from transformers import AttentionInterface

    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own eager
        out, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        records.append(((query @ key.transpose(2, 3)) * scale, probs))
        return out, probs

    AttentionInterface.register(RECORDER, record)
    yield records


def _model_scores(backbone: VisionBackbone, x: torch.Tensor,
                  records: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's (pre-softmax scores, eager probabilities), from the model's own forward."""
    model = backbone.model
    records.clear()
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDER)
    try:
        with torch.no_grad():
            kwargs = {"interpolate_pos_encoding": True} if isinstance(backbone, DinoV1Backbone) else {}
            model(x, **kwargs)
    finally:
        model.set_attn_implementation(previous)
    assert len(records) == model.config.num_hidden_layers  # one record per block
    return records[-1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_through_resolver_with_geometry_from_config(family: str, models: dict[str, Talk2DINO]) -> None:
    from transformers import AutoConfig

    _, cls, g, _ = FAMILIES[family]
    model = models[family]
    backbone = model.backbone
    config = AutoConfig.from_pretrained(model.weights_info["backbone"]["path"])
    assert type(backbone) is cls
    assert backbone.num_heads == config.num_attention_heads
    assert backbone.num_heads * backbone.head_dim == backbone.embed_dim == config.hidden_size  # pitfall P2
    assert backbone.num_global == g == 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    assert backbone.patch_size == config.patch_size
    assert model.weights_info["backbone"]["model_type"] == config.model_type
    assert ("logits_rope" in model.weights_info["backbone"]) == (cls is DinoV3Backbone)
    assert model.embed_classes(["cat", "sofa"]).shape == (2, HIDDEN)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_equals_reference_path(family: str, models: dict[str, Talk2DINO]) -> None:
    *_, g, (h, w) = FAMILIES[family]
    backbone = models[family].backbone
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    fast, ref = backbone(x), backbone.forward_reference(x)
    grid = (h // backbone.patch_size, w // backbone.patch_size)
    p = grid[0] * grid[1]
    assert fast.grid == ref.grid == grid
    assert fast.patch_tokens.shape == (2, p, HIDDEN)
    assert fast.register_tokens.shape == (2, g - 1, HIDDEN)
    assert fast.attn_logits.shape == (2, backbone.num_heads, p) and fast.attn_logits.dtype == torch.float32
    assert fast.attn_logits.abs().max() > 0.5  # O(1) logits, so the comparison below means something
    for name in ("patch_tokens", "cls_token", "register_tokens", "attn_logits"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_matches_the_models_own_eager_forward(family: str, folders: dict[str, Path],
                                                        models: dict[str, Talk2DINO]) -> None:
    """Any transformers layout: our tokens equal the model's own eager forward, and softmax of our logits is
    the CLS row of the attention probabilities that forward returns (``output_attentions``), renormalised
    over the patches; the logits themselves differ from log-probabilities by one constant per head."""
    from transformers import AutoModel, ViTModel

    *_, (h, w) = FAMILIES[family]
    backbone = models[family].backbone
    g = backbone.num_global
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(6))
    cls = ViTModel if isinstance(backbone, DinoV1Backbone) else AutoModel
    extra: dict[str, Any] = {"add_pooling_layer": False} if cls is ViTModel else {}
    eager = cls.from_pretrained(folders[family], attn_implementation="eager", **extra).eval()
    with torch.no_grad():
        kwargs = {"interpolate_pos_encoding": True} if cls is ViTModel else {}
        out = eager(x, output_attentions=True, **kwargs)
    ours = backbone(x)
    torch.testing.assert_close(torch.cat([ours.cls_token[:, None], ours.register_tokens, ours.patch_tokens], 1),
                               out.last_hidden_state, atol=1e-5, rtol=0)
    probs = out.attentions[-1][:, :, 0, g:]  # [B, M, P]
    assert ours.attn_logits.abs().max() > 0.5  # O(1) logits: the comparison means something
    torch.testing.assert_close(ours.attn_logits.softmax(-1), probs / probs.sum(-1, keepdim=True), atol=1e-6,
                               rtol=1e-5)
    offset = ours.attn_logits - probs.log()
    torch.testing.assert_close(offset, offset[..., :1].expand_as(offset), atol=1e-4, rtol=0)


def test_layout_accessors_find_this_transformers_modules(models: dict[str, Talk2DINO]) -> None:
    """The accessors return the very Linear modules the model's own attention uses, in this release's layout."""
    for name, model in models.items():
        blocks = block_list(model.backbone.model)
        assert len(blocks) == model.backbone.model.config.num_hidden_layers, name
        q, k, v = attention_projections(blocks[-1].attention)
        assert all(isinstance(m, torch.nn.Linear) for m in (q, k, v)), name
        assert q.weight.shape == (model.backbone.embed_dim, model.backbone.embed_dim), name
        new_layout = hasattr(blocks[-1].attention, "q_proj")
        assert new_layout == (q is getattr(blocks[-1].attention, "q_proj", None)), name


def test_unknown_layout_is_one_line_naming_the_version() -> None:
    """A future transformers with yet another layout fails with a WeightsError, not an AttributeError."""
    with pytest.raises(WeightsError, match=r"unknown attention projection layout.*transformers \d"):
        attention_projections(torch.nn.Linear(2, 2))
    with pytest.raises(WeightsError, match="unknown block list layout"):
        block_list(torch.nn.Linear(2, 2))


@pytest.mark.skipif(HAS_DINOV3, reason="this transformers has DINOv3; the refusal is for older ones")
def test_dinov3_folder_is_refused_in_one_line_on_old_transformers(tmp_path: Path,
                                                                  tiny_sources: dict[str, str]) -> None:
    folder = tmp_path / "dinov3"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "dinov3_vit", "hidden_size": 32}')
    with pytest.raises(Talk2DinoError, match=r"needs transformers>=4\.56\.0 \(installed: 4\."):
        create_model(None, device="cpu", backbone=f"local-dir:{folder}", text_encoder=tiny_sources["text_encoder"],
                     projection=tiny_sources["projection"])


def test_model_type_newer_than_transformers_is_refused(tmp_path: Path, tiny_sources: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever transformers is installed: a backbone whose model type needs a newer release is refused
    before transformers reads its config, naming the needed and installed versions."""
    import talk2dino.compat as compat

    folder = tmp_path / "reg"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "dinov2_with_registers"}')
    compat.installed_version.cache_clear()
    monkeypatch.setattr(compat, "installed_version", lambda name: "4.47.1" if name == "transformers" else None)
    with pytest.raises(Talk2DinoError, match=r"needs transformers>=4\.48\.0 \(installed: 4\.47\.1\); upgrade"):
        create_model(None, device="cpu", backbone=f"local-dir:{folder}", text_encoder=tiny_sources["text_encoder"],
                     projection=tiny_sources["projection"])


@pytest.mark.skipif(TRANSFORMERS_VERSION < (4, 56), reason="AttentionInterface and set_attn_implementation: 4.56+")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_logits_equal_the_models_own_attention_scores(
        family: str, models: dict[str, Talk2DINO], score_recorder: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Our CLS->patch logits are the model's own pre-softmax scores (after its RoPE for DINOv3)."""
    *_, (h, w) = FAMILIES[family]
    backbone = models[family].backbone
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    scores, probs = _model_scores(backbone, x, score_recorder)
    g = backbone.num_global
    ours = backbone(x).attn_logits
    torch.testing.assert_close(ours, scores[:, :, 0, g:], atol=1e-5, rtol=0)
    # The recorded scores are what the model's eager attention turned into probabilities...
    torch.testing.assert_close(scores.softmax(-1), probs, atol=1e-6, rtol=1e-5)
    # ...so softmax over patches of our logits is the model's CLS attention on patches, renormalised (§2.2).
    restricted = probs[:, :, 0, g:]
    torch.testing.assert_close(ours.softmax(-1), restricted / restricted.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@needs_dinov3
def test_dinov3_logits_without_rope_are_the_plain_projections(
        folders: dict[str, Path], score_recorder: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``logits_rope="none"`` (the reference's DINOv3 targets, method.md §2.4) = q·k/sqrt(d_h) before RoPE."""
    true = DinoV3Backbone.from_pretrained(folders["dinov3"], dtype=torch.float32)
    plain = DinoV3Backbone.from_pretrained(folders["dinov3"], dtype=torch.float32, logits_rope="none")
    assert plain.settings() == {"logits_rope": "none"}
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    with_rope, without = true(x), plain(x)
    # The network is the same; only the returned logits change.
    torch.testing.assert_close(with_rope.patch_tokens, without.patch_tokens, atol=0, rtol=0)
    assert (with_rope.attn_logits - without.attn_logits).abs().max() > 0.1
    torch.testing.assert_close(without.attn_logits, plain.forward_reference(x).attn_logits, atol=1e-5, rtol=0)
    # Independent recomputation from the model's own last-block input, no rotation anywhere.
    with torch.no_grad():
        hidden = plain.model(x, output_hidden_states=True).hidden_states[-2]
        layer = block_list(plain.model)[-1]
        normed = layer.norm1(hidden)
        b, t, _ = normed.shape
        m, dh, g = plain.num_heads, plain.head_dim, plain.num_global
        q = layer.attention.q_proj(normed).view(b, t, m, dh).transpose(1, 2)
        k = layer.attention.k_proj(normed).view(b, t, m, dh).transpose(1, 2)
    expected = (q[:, :, 0:1] @ k[:, :, g:].transpose(-1, -2)).squeeze(2) / dh**0.5
    torch.testing.assert_close(without.attn_logits, expected, atol=1e-5, rtol=0)
    # And the default is the model's own RoPE-applied score.
    scores, _ = _model_scores(true, x, score_recorder)
    torch.testing.assert_close(with_rope.attn_logits, scores[:, :, 0, g:], atol=1e-5, rtol=0)


@needs_dinov3
def test_dinov3_rejects_unknown_logits_option(folders: dict[str, Path]) -> None:
    from transformers import DINOv3ViTModel

    with pytest.raises(ValueError, match="logits_rope"):
        DinoV3Backbone(DINOv3ViTModel.from_pretrained(folders["dinov3"]), logits_rope="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_low_precision_keeps_a_float32_residual_stream(family: str, folders: dict[str, Path],
                                                       models: dict[str, Talk2DINO],
                                                       tiny_sources: dict[str, str]) -> None:
    """bf16 weights: the fast path keeps the residual stream and norms in float32 (issue 6, target 3), so
    its tokens are float32 and closer to the fp32 model than the model's own all-bf16 forward."""
    *_, (h, w) = FAMILIES[family]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(5))
    exact = models[family].backbone(x)
    low = create_model(None, device="cpu", dtype="bfloat16", backbone=f"local-dir:{folders[family]}",
                       text_encoder=tiny_sources["text_encoder"],
                       projection=str(folders["psi"])).backbone
    mixed, plain = low(x), low.forward_reference(x)
    assert mixed.patch_tokens.dtype == torch.float32 and plain.patch_tokens.dtype == torch.bfloat16
    err_mixed = (mixed.patch_tokens - exact.patch_tokens).abs().mean()
    err_plain = (plain.patch_tokens.float() - exact.patch_tokens).abs().mean()
    # The margin is 0.9, not more: before transformers 4.56 the plain path cannot switch to eager attention
    # and runs the model's SDPA, whose float32 softmax makes the all-bf16 forward itself more accurate.
    assert err_mixed < 0.9 * err_plain, (float(err_mixed), float(err_plain))
    torch.testing.assert_close(mixed.attn_logits, exact.attn_logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", ["dinov3" if HAS_DINOV3 else "dinov2-reg", "dino-vit"])
def test_batch_equals_single(family: str, models: dict[str, Talk2DINO]) -> None:
    *_, (h, w) = FAMILIES[family]
    backbone = models[family].backbone
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(4))
    batched = backbone(x)
    for i in range(3):
        one = backbone(x[i:i + 1])
        torch.testing.assert_close(batched.attn_logits[i:i + 1], one.attn_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.patch_tokens[i:i + 1], one.patch_tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_segmenter_runs_end_to_end(family: str, models: dict[str, Talk2DINO]) -> None:
    model = models[family]
    patch = model.backbone.patch_size
    segmenter = Segmenter(model, InferenceConfig(short_side=4 * patch, max_long_side=8 * patch, window=2 * patch,
                                                 stride=patch, pamr_iterations=2))
    segmenter.set_classes(["cat", "sofa"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    segmenter.set_image(image)
    result = segmenter.predict(background=True)
    assert result.labels.shape == (30, 45)
    assert result.scores.shape == (3, 30, 45)
    assert torch.isfinite(result.scores).all()


def test_unsupported_model_type_lists_the_supported_ones(tiny_sources: dict[str, str]) -> None:
    with pytest.raises(WeightsError, match="supported model types: dinov2, dinov2_with_registers, dinov3_vit, vit"):
        create_model(None, device="cpu", backbone=tiny_sources["text_encoder"],
                     text_encoder=tiny_sources["text_encoder"], projection=tiny_sources["projection"])


def test_registry_names_for_the_new_families() -> None:
    for name in ("dino-vits8", "dino-vits16", "dino-vitb8", "dino-vitb16"):
        assert BACKBONES[name] == f"hf-hub:facebook/{name}"
    for arch in ("vits16", "vitb16", "vitl16", "vith16plus"):
        assert BACKBONES[f"dinov3-{arch}"] == f"hf-hub:facebook/dinov3-{arch}-pretrain-lvd1689m"
    for size in ("s", "g"):
        assert BACKBONES[f"dinov2-vit{size}14"].startswith("hf-hub:facebook/dinov2-")
        assert "with-registers" in BACKBONES[f"dinov2-vit{size}14-reg"]
    assert {"talk2dinov3-vitb16", "talk2dinov3-vitl16"} <= set(list_models())
    b16, l16 = get_model_config("talk2dinov3-vitb16"), get_model_config("talk2dinov3-vitl16")
    assert b16.backbone.source == BACKBONES["dinov3-vitb16"] and l16.backbone.source == BACKBONES["dinov3-vitl16"]
    assert b16.backbone.logits_rope == l16.backbone.logits_rope == "none"  # as the authors' psi was trained
    assert b16.projection.sha256 == "6fc5ce7a05d8f1c829c174d87b861da05399cf0bfe50de3711ac940115d85fcc"
    assert b16.projection.source is not None and b16.projection.source.endswith("/weights/dinov3_vitb_mlp_infonce.pth")
    assert l16.projection.git_blob_sha1 == "51dfe9926175877b5deecaba07c398e46e9d61fe"
    assert get_model_config("talk2dino-vitb14-reg").backbone.logits_rope == "model"


@needs_dinov3
def test_named_dinov3_model_plumbs_logits_rope_offline(folders: dict[str, Path], tiny_sources: dict[str, str],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``talk2dinov3-vitb16`` resolves through the hub cache with no network and uses RoPE-free logits."""
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    cache = tmp_path / "cache"
    for repo, source in (("facebook/dinov3-vitb16-pretrain-lvd1689m", folders["dinov3"]),
                         ("openai/clip-vit-base-patch16", Path(tiny_sources["text_encoder"][len("local-dir:"):]))):
        base = cache / "hf" / f"models--{repo.replace('/', '--')}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text("0123456789abcdef")
        shutil.copytree(source, base / "snapshots" / "0123456789abcdef")
    model = create_model("talk2dinov3-vitb16", cache_dir=cache, device="cpu", projection=str(folders["psi"]))
    assert isinstance(model.backbone, DinoV3Backbone) and model.backbone.logits_rope == "none"
    assert model.weights_info["backbone"]["logits_rope"] == "none"
    assert model.config.backbone.logits_rope == "none"


@pytest.mark.reference
@needs_dinov3
def test_authors_dinov3_psi_loads_strictly_for_a_vitb_sized_dinov3() -> None:
    from transformers import DINOv3ViTConfig

    path = REFERENCE_WEIGHTS / "dinov3_vitb_mlp_infonce.pth"
    if not path.is_file():
        pytest.skip(f"authors' DINOv3 checkpoint not found at {path}")
    resolved, digest = resolve_file(str(path), what="projection",
                                    sha256=get_model_config("talk2dinov3-vitb16").projection.sha256)
    # DINOv3 ViT-B/16 geometry (the hub config of facebook/dinov3-vitb16-pretrain-lvd1689m), no model built.
    config = DINOv3ViTConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12,
                             num_register_tokens=4, patch_size=16)
    psi = Projection(512, config.hidden_size)
    psi.load_checked(load_state_dict(resolved), origin=str(resolved))
    assert sum(p.numel() for p in psi.parameters()) == 984_576
    assert config.hidden_size // config.num_attention_heads == 64
    with pytest.raises(WeightsError, match="another backbone"):
        Projection(512, 1024).load_checked(load_state_dict(resolved), origin=str(resolved))
