"""Acceptance test: our outputs equal the reference implementation's on the shared parity set.

Runs all 3 images x 4 cases of ``../shared/parity`` through the public API with the deterministic
real-size weights and the authors' psi, and checks every tolerance of ``../shared/parity/README.md``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REFERENCE_WEIGHTS, SHARED, parity_weights
from PIL import Image

from talk2dino import InferenceConfig, Segmenter, create_model
from talk2dino.ops.cleaning import clean_background
from talk2dino.ops.similarity import sigmoid_cosine

# xdist_group: under pytest-xdist the module runs in one worker, so the real-size model (a module fixture,
# ~0.6 GB) is loaded once.
pytestmark = [pytest.mark.slow, pytest.mark.reference, pytest.mark.xdist_group("parity")]

GOLDEN = SHARED / "parity" / "golden"
PSI = REFERENCE_WEIGHTS / "vitb_mlp_infonce.pth"
TEXT_TOL = 1e-5
LOGIT_TOL = 1e-5
MAP_TOL = 1e-5
STITCH_TOL = 2e-3
TIE_GAP = 1e-4


@pytest.fixture(scope="module")
def manifest() -> dict:
    if not GOLDEN.is_dir() or not PSI.is_file():
        pytest.skip(f"parity set or psi missing under {SHARED}")
    return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    weights = parity_weights()
    return create_model(
        None,
        backbone=f"local-dir:{weights / 'hf' / 'dinov2-vitb14-reg'}",
        text_encoder=f"local-dir:{weights / 'hf' / 'clip-vitb16-text'}",
        projection=str(PSI),
        device="cpu",
        dtype="float32",
    )


def _case_config(case: dict) -> InferenceConfig:
    return InferenceConfig(
        background=case["with_bg"],
        bg_threshold=case["bg_thresh"] or InferenceConfig.bg_threshold,
        bg_clean=case["with_bg_clean"],
        clean_lambda=case["lambda_bg"] or InferenceConfig.clean_lambda,
        pamr=case["pamr"],
        pamr_iterations=case["pamr_iter"] or InferenceConfig.pamr_iterations,
        pamr_dilations=tuple(case["pamr_dilations"] or InferenceConfig.pamr_dilations),
        short_side=case["resize_dim"],
        window=case["test_cfg"]["crop_size"][0],
        stride=case["test_cfg"]["stride"][0],
    )


def test_text_embeddings(model, manifest) -> None:
    golden = np.load(GOLDEN / "text_embeddings.npz")
    segmenter = Segmenter(model, InferenceConfig())
    for name, case in manifest["cases"].items():
        classes = [c for c in case["classes"] if not (case["with_bg"] and c == "background")]
        prompts = [t.format(c) for c in classes for t in case["templates"]]
        raw = model.encode_text(prompts).view(len(classes), len(case["templates"]), -1).mean(1)
        np.testing.assert_allclose(raw.numpy(), golden[f"{name}_clip_mean"], atol=TEXT_TOL, rtol=0)
        unit = segmenter.class_embeddings(classes, case["templates"])
        np.testing.assert_allclose(unit.numpy(), golden[f"{name}_text_embedding"], atol=TEXT_TOL, rtol=0)


@pytest.mark.parametrize("stem", ["astronaut", "chelsea", "coffee"])
def test_image_parity(model, manifest, stem: str) -> None:
    image = Image.open(SHARED / "reference" / "images" / f"{stem}.png")
    segmenter = Segmenter(model, InferenceConfig())
    features = segmenter.set_image(image)
    info = manifest["images"][f"{stem}.png"]
    assert list(features.resized_size) == info["resized_hw"]
    logits = np.load(GOLDEN / stem / "attn_logits.npz")["cls_to_patch_logits"]
    np.testing.assert_allclose(features.output.attn_logits.numpy(), logits, atol=LOGIT_TOL, rtol=0)

    report = []
    for name, case in manifest["cases"].items():
        segmenter.config = _case_config(case)
        classes = [c for c in case["classes"] if not (case["with_bg"] and c == "background")]
        segmenter.set_classes(classes, templates=case["templates"])
        windows = np.load(GOLDEN / stem / f"{name}_windows.npz")
        assert [list(b) for b in features.boxes] == windows["windows_y1y2x1x2"].tolist()

        # Per-window maps on the 32x32 grid, before and after cleaning.
        text = segmenter.class_embeddings(classes, case["templates"])
        out = features.output
        sig = sigmoid_cosine(out.patch_tokens, text)
        np.testing.assert_allclose(sig.view(windows["sigmoid32"].shape).numpy(), windows["sigmoid32"],
                                   atol=MAP_TOL, rtol=0)
        if case["with_bg_clean"]:
            cleaned = clean_background(sig, out.patch_tokens, out.attn_logits, text, lam=case["lambda_bg"])
            np.testing.assert_allclose(cleaned.view(windows["bg_cleaned32"].shape).numpy(), windows["bg_cleaned32"],
                                       atol=MAP_TOL, rtol=0)

        result = segmenter.predict()
        golden_scores = np.load(GOLDEN / stem / f"{name}_scores.npz")["scores"].astype(np.float32)
        np.testing.assert_allclose(result.stitched.numpy(), golden_scores, atol=STITCH_TOL, rtol=0)

        golden_labels = np.array(Image.open(GOLDEN / stem / f"{name}_labels.png"))
        top2 = np.load(GOLDEN / stem / f"{name}_top2.npz")
        ours = result.labels.numpy()
        assert ours.shape == golden_labels.shape
        differ = ours != golden_labels
        near_tie = (top2["gap"].astype(np.float32) < TIE_GAP) & (ours == top2["runner_up"])
        bad = differ & ~near_tie
        report.append((name, int(differ.sum()), int(bad.sum())))
        assert not bad.any(), f"{stem}/{name}: {int(bad.sum())} labels differ beyond near-ties"
    print(stem, report)


def test_reference_path_matches_fast_path(model, manifest) -> None:
    """The plain path (eager attention, one window per call, padded prompts, plain PAMR) agrees."""
    case = manifest["cases"]["C"]
    config = _case_config(case)
    classes = [c for c in case["classes"] if c != "background"]
    image = Image.open(SHARED / "reference" / "images" / "coffee.png")
    results = []
    for reference in (False, True):
        seg = Segmenter(model, config, reference=reference)
        seg.set_classes(classes)
        seg.set_image(image)
        results.append(seg.predict())
    fast, ref = results
    torch.testing.assert_close(fast.stitched, ref.stitched, atol=1e-5, rtol=0)
    assert (fast.labels != ref.labels).float().mean() < 1e-3
