"""Backbone, text encoder, psi and the weight resolver on tiny random models saved to disk."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_WEIGHTS, save_tiny_dinov2, save_tiny_projection

from talk2dino.errors import WeightsError
from talk2dino.factory import create_model
from talk2dino.models import DinoV2Backbone, Projection
from talk2dino.models.projection import save_projection
from talk2dino.registry import get_model_config, list_models, save_model_folder
from talk2dino.weights import file_git_blob_sha1, file_sha256, load_state_dict, parse_source, resolve_file


def _load_dino(folder: Path) -> DinoV2Backbone:
    from transformers import AutoModel

    return DinoV2Backbone(AutoModel.from_pretrained(folder, attn_implementation="sdpa"))


@pytest.mark.parametrize("registers", [0, 4])
def test_backbone_fast_path_equals_reference_path(tmp_path: Path, registers: int) -> None:
    backbone = _load_dino(save_tiny_dinov2(tmp_path / "d", registers=registers, heads=4, hidden=32))
    assert backbone.num_heads * backbone.head_dim == backbone.embed_dim
    assert backbone.num_global == 1 + registers
    x = torch.randn(2, 3, 42, 70)  # non-square, interpolated position embeddings
    fast, ref = backbone(x), backbone.forward_reference(x)
    assert fast.grid == (3, 5)
    assert fast.patch_tokens.shape == (2, 15, 32)
    assert fast.attn_logits.shape == (2, 4, 15)
    assert fast.register_tokens.shape == (2, registers, 32)
    torch.testing.assert_close(fast.patch_tokens, ref.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.cls_token, ref.cls_token, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.attn_logits, ref.attn_logits, atol=1e-5, rtol=0)


def test_logits_softmax_equals_model_attention_restricted_to_patches(tmp_path: Path) -> None:
    """softmax over patches of our logits = the model's own CLS attention on patches, renormalised (§2.2)."""
    from transformers import AutoModel

    folder = save_tiny_dinov2(tmp_path / "d", registers=4)
    backbone = _load_dino(folder)
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        attn = eager(x, output_attentions=True).attentions[-1][:, :, 0, 5:]
    expected = attn / attn.sum(-1, keepdim=True)
    torch.testing.assert_close(backbone(x).attn_logits.softmax(-1), expected, atol=1e-6, rtol=1e-5)


def test_backbone_batch_equals_single(tmp_path: Path) -> None:
    backbone = _load_dino(save_tiny_dinov2(tmp_path / "d"))
    x = torch.randn(3, 3, 28, 28)
    batched = backbone(x)
    for i in range(3):
        one = backbone(x[i:i + 1])
        torch.testing.assert_close(batched.attn_logits[i:i + 1], one.attn_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.patch_tokens[i:i + 1], one.patch_tokens, atol=1e-6, rtol=0)


def test_backbone_rejects_sizes_off_the_patch_grid(tmp_path: Path) -> None:
    backbone = _load_dino(save_tiny_dinov2(tmp_path / "d"))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        backbone(torch.zeros(1, 3, 30, 28))


def test_text_encoder_pools_first_end_token_and_padding_is_harmless(tiny_model) -> None:
    enc = tiny_model.text_encoder
    prompts = ["a photo of a cat.", "a bad photo of a very very large dog in a video game."]
    short = enc.encode(prompts, batch_size=8)
    padded = enc.encode(prompts, batch_size=8, pad_to_context=True)
    one_by_one = torch.cat([enc.encode([p], batch_size=1) for p in prompts])
    assert short.shape == (2, 512)
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, one_by_one, atol=1e-5, rtol=0)
    # Independent check: transformers' own pooled projection for the same ids.
    ids, mask = enc.tokenize(prompts, pad_to_context=True)
    with torch.no_grad():
        hf = enc.model(input_ids=ids, attention_mask=mask).text_embeds
    torch.testing.assert_close(padded, hf, atol=1e-5, rtol=0)


def test_text_encoder_truncates_long_prompts_with_warning(tiny_model, caplog: pytest.LogCaptureFixture) -> None:
    enc = tiny_model.text_encoder
    long_prompt = "cat " * 200
    with caplog.at_level(logging.WARNING, logger="talk2dino"):
        ids, _ = enc.tokenize([long_prompt, "dog"])
    assert ids.shape[1] == 77
    assert ids[0, -1] == enc.eot_id
    assert "truncated" in caplog.text
    assert torch.isfinite(enc.encode([long_prompt], batch_size=1)).all()


def test_projection_formula_on_hand_computed_example() -> None:
    psi = Projection(2, 2)
    with torch.no_grad():
        psi.linear_layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        psi.linear_layer.bias.copy_(torch.tensor([0.0, -1.0]))
        psi.hidden_layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 3.0]]))
        psi.hidden_layers[0].bias.copy_(torch.tensor([0.5, 0.0]))
    t = torch.tensor([[1.0, 1.0]])
    h = torch.tanh(torch.tensor([1.0, 1.0]))  # W1 t + b1 = (1, 1)
    expected = torch.tensor([[h[0] + h[1] + 0.5, 3 * h[1]]])
    torch.testing.assert_close(psi(t), expected)


def test_projection_strict_loading_errors(tmp_path: Path) -> None:
    good = load_state_dict(save_tiny_projection(tmp_path / "p.pth", out_dim=8))
    psi = Projection(512, 8)
    psi.load_checked(good, origin="good")
    missing = {k: v for k, v in good.items() if k != "linear_layer.bias"}
    with pytest.raises(WeightsError, match=r"missing=\['linear_layer.bias'\]"):
        psi.load_checked(missing, origin="m")
    extra = dict(good, **{"logit_scale": torch.zeros(())})
    with pytest.raises(WeightsError, match=r"unexpected=\['logit_scale'\]"):
        psi.load_checked(extra, origin="e")
    with pytest.raises(WeightsError, match="another backbone size"):
        Projection(512, 16).load_checked(good, origin="s")


def test_projection_legacy_alias_and_safetensors_round_trip(tmp_path: Path) -> None:
    legacy = load_state_dict(save_tiny_projection(tmp_path / "old.pth", out_dim=8, legacy=True))
    assert "linear_layer2.weight" in legacy
    psi = Projection(512, 8)
    psi.load_checked(legacy, origin="legacy")
    path = save_projection(tmp_path / "run", psi, {"note": "test"})
    state = load_state_dict(path)
    assert set(state) == {"linear_layer.weight", "linear_layer.bias", "hidden_layers.0.weight", "hidden_layers.0.bias"}
    again = Projection(512, 8)
    again.load_checked(state, origin=str(path))
    x = torch.randn(3, 512)
    assert torch.equal(psi(x), again(x))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):  # pragma: no cover - never executed when loading is safe
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"linear_layer.weight": Evil()}))
    with pytest.raises(WeightsError, match="not a loadable checkpoint"):
        load_state_dict(path)


@pytest.mark.reference
def test_authors_checkpoint_loads_strictly_with_expected_statistics() -> None:
    path = REFERENCE_WEIGHTS / "vitb_mlp_infonce.pth"
    if not path.is_file():
        pytest.skip(f"authors' checkpoint not found at {path}")
    resolved, digest = resolve_file(str(path), what="projection",
                                    sha256="5f6efcc520f22916ecf3dfdfb01d6f57e701c1c2e1feda71a80d89e3cd752f0f")
    assert digest.startswith("5f6efcc5")
    psi = Projection(512, 768)
    psi.load_checked(load_state_dict(resolved), origin=str(resolved))
    assert sum(p.numel() for p in psi.parameters()) == 984_576
    w1, w2 = psi.linear_layer.weight, psi.hidden_layers[0].weight
    assert abs(w1.mean().item() - 1.6e-4) < 5e-5 and abs(w1.std().item() - 0.0708) < 5e-4
    assert abs(w2.std().item() - 0.0513) < 5e-4
    assert abs(psi.hidden_layers[0].bias.std().item() - 0.0343) < 5e-4
    with pytest.raises(WeightsError, match="trained for another backbone|another backbone size"):
        Projection(512, 1024).load_checked(load_state_dict(resolved), origin=str(resolved))


def test_parse_source_refuses_ambiguous_strings(tmp_path: Path) -> None:
    assert parse_source("hf-hub:org/repo@v1").revision == "v1"
    assert parse_source("local-dir:/x").kind == "local-dir"
    assert parse_source("https://host/f.pth").kind == "url"
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert parse_source(str(f)).kind == "file"
    for bad in ("facebook/dinov2-base", "hf-hub:noslash", "", "local-dir:", str(tmp_path / "missing.pth")):
        with pytest.raises(WeightsError):
            parse_source(bad)


def test_url_download_is_cached_verified_and_bad_files_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TALK2DINO_OFFLINE", raising=False)
    src = save_tiny_projection(tmp_path / "psi.pth", out_dim=8)
    url = src.resolve().as_uri()
    good = file_sha256(src)
    path, digest = resolve_file(url, what="projection", cache_dir=tmp_path / "cache", sha256=good)
    assert digest == good and path.is_relative_to(tmp_path / "cache")
    # A pin by git blob sha1 works too (method.md §7).
    resolve_file(url, what="projection", cache_dir=tmp_path / "c2", git_blob_sha1=file_git_blob_sha1(src))
    # Wrong pin: the download is reported and not kept.
    with pytest.raises(WeightsError, match="expected 0000"):
        resolve_file(url, what="projection", cache_dir=tmp_path / "c3", sha256="0000" + good[4:])
    assert not any(p.is_file() for p in (tmp_path / "c3").rglob("*"))
    # Corrupt cache entry: deleted and fetched again.
    path.write_bytes(b"corrupt")
    again, _ = resolve_file(url, what="projection", cache_dir=tmp_path / "cache", sha256=good)
    assert file_sha256(again) == good
    # Offline with nothing cached: the error names the file and where to put it.
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"psi.pth is not cached at .* offline mode is on"):
        resolve_file(url, what="projection", cache_dir=tmp_path / "c4", sha256=good)


def test_hub_source_offline_error_names_repo_and_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"facebook/dinov2-with-registers-base.*"
                                           r"`hf download facebook/dinov2-with-registers-base --cache-dir "):
        create_model("talk2dino-vitb14-reg", cache_dir=tmp_path, device="cpu")


def test_registry_names_and_unknown_model() -> None:
    assert {"talk2dino-vitb14-reg", "talk2dino-vitl14-reg"} <= set(list_models())
    assert get_model_config("talk2dino-vitl14-reg").inference.bg_threshold == 0.54
    assert get_model_config("talk2dino-vitb14-reg.2025") == get_model_config("talk2dino-vitb14-reg")
    with pytest.raises(WeightsError, match="unknown model 'nope'.*talk2dino-vitb14-reg"):
        get_model_config("nope")


def test_composed_model_and_model_folder_round_trip(tiny_model, tiny_sources, tmp_path: Path) -> None:
    names = ["cat", "sofa"]
    expected = tiny_model.embed_classes(names)
    assert expected.shape == (2, 32)
    torch.testing.assert_close(expected.norm(dim=-1), torch.ones(2))
    folder = save_model_folder(tmp_path / "model", tiny_model.config, tiny_model.projection)
    loaded = create_model(f"local-dir:{folder}", device="cpu")
    torch.testing.assert_close(loaded.embed_classes(names), expected, atol=0, rtol=0)
    assert loaded.weights_info["projection"]["sha256"] == file_sha256(folder / "projection.safetensors")


def test_projection_for_another_backbone_is_rejected(tiny_sources, tmp_path: Path) -> None:
    wrong = save_tiny_projection(tmp_path / "psi48.pth", out_dim=48)
    with pytest.raises(WeightsError, match=r"48-d, but the backbone is 32-d"):
        create_model(None, device="cpu", backbone=tiny_sources["backbone"], text_encoder=tiny_sources["text_encoder"],
                     projection=str(wrong))


def test_backbone_source_of_wrong_model_type_is_rejected(tiny_sources) -> None:
    with pytest.raises(WeightsError, match="not DINOv2"):
        create_model(None, device="cpu", backbone=tiny_sources["text_encoder"],
                     text_encoder=tiny_sources["text_encoder"], projection=tiny_sources["projection"])


def _populate_hub_cache(cache: Path, repo: str, source_dir: Path, commit: str = "0123456789abcdef") -> None:
    """Lay out `source_dir` as huggingface_hub's cache would after a download of `repo`."""
    import shutil

    base = cache / "hf" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(source_dir, base / "snapshots" / commit)


def test_registry_model_loads_offline_from_a_populated_cache(tiny_sources, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The named model's hub sources resolve through the product's own cache layout with no network."""
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    cache = tmp_path / "cache"
    _populate_hub_cache(cache, "facebook/dinov2-with-registers-base", Path(tiny_sources["backbone"][10:]))
    _populate_hub_cache(cache, "openai/clip-vit-base-patch16", Path(tiny_sources["text_encoder"][10:]))
    model = create_model("talk2dino-vitb14-reg", cache_dir=cache, device="cpu",
                         projection=tiny_sources["projection"])
    assert model.weights_info["backbone"]["revision"] == "0123456789abcdef"
    assert model.weights_info["text"]["source"] == "hf-hub:openai/clip-vit-base-patch16"
    assert model.embed_classes(["cat"]).shape == (1, 32)
