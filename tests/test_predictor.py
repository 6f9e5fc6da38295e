"""Segmenter behaviour on a tiny random model: caching, batching, input forms, options, bad labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGES, gradient_image
from PIL import Image

from talk2dino import InferenceConfig, Segmenter
from talk2dino.errors import InvalidInputError


def _image(h: int = 60, w: int = 90, seed: int = 0) -> np.ndarray:
    return gradient_image(h, w, seed, noise=20)


@pytest.fixture()
def segmenter(tiny_model) -> Segmenter:
    # Small geometry keeps the tiny model fast while still producing several windows.
    return Segmenter(tiny_model, InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14,
                                                 pamr_iterations=3))


def test_result_shapes_and_label_ranges(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "sofa", "window"])
    image = _image(60, 90)
    features = segmenter.set_image(image)
    assert features.resized_size == (56, 84)
    assert len(features.boxes) == 3 * 5
    result = segmenter.predict(background=True)
    assert result.labels.shape == (60, 90) and result.labels.dtype == torch.int64
    assert result.scores.shape == (4, 60, 90)
    assert result.class_names == ["background", "cat", "sofa", "window"]
    assert result.background_index == 0
    assert 0 <= int(result.labels.min()) and int(result.labels.max()) < 4
    assert torch.all(result.scores[0] == segmenter.config.bg_threshold)
    assert abs(sum(s["share"] for s in result.shares()) - 1.0) < 1e-5
    assert result.labels.equal(result.scores.softmax(0).argmax(0))


def test_background_threshold_extremes(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "dog"])
    segmenter.set_image(_image())
    # Scores are sigmoids of cosines, inside (0.2689, 0.7311): a threshold above makes all background.
    assert int(segmenter.predict(background=True, bg_threshold=0.99).labels.max()) == 0
    assert int(segmenter.predict(background=True, bg_threshold=0.01).labels.min()) >= 1


def test_image_is_embedded_once_for_many_vocabularies(segmenter: Segmenter, monkeypatch) -> None:
    calls = {"n": 0}
    original = segmenter.model.encode_image

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter.model, "encode_image", counting)
    segmenter.set_image(_image())
    after_embedding = calls["n"]
    assert after_embedding == 2  # 15 windows in chunks of window_batch_size=8
    for names in (["cat"], ["cat", "dog"], ["sky", "road", "tree"]):
        segmenter.set_classes(names)
        segmenter.predict(pamr=False)
        segmenter.predict(pamr=True, bg_clean=True)
    assert calls["n"] == after_embedding


def test_vocabulary_cache_skips_text_encoder(segmenter: Segmenter, monkeypatch) -> None:
    first = segmenter.class_embeddings(["cat", "dog"])
    monkeypatch.setattr(segmenter.model, "encode_text", lambda *a, **k: pytest.fail("text re-encoded"))
    assert segmenter.class_embeddings(["cat", "dog"]) is first


def test_predict_batch_equals_single_image_predictions(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "dog", "sky"])
    images = [_image(60, 90, 0), _image(60, 90, 1), _image(40, 40, 2)]
    batch = segmenter.predict_batch(images, background=True)
    for image, got in zip(images, batch, strict=True):
        segmenter.set_image(image)
        single = segmenter.predict(background=True)
        torch.testing.assert_close(got.scores, single.scores, atol=1e-6, rtol=0)
        assert torch.equal(got.labels, single.labels)


def test_input_forms_agree(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "dog"])
    array = _image()
    results = []
    for form in (array, Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1).contiguous()):
        segmenter.set_image(form)
        results.append(segmenter.predict())
    for other in results[1:]:
        assert torch.equal(results[0].labels, other.labels)


def test_preprocessing_keeps_rgb_order(segmenter: Segmenter) -> None:
    """A pure red image reaches the backbone as red (pitfall P1)."""
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 255
    guides = segmenter.prepare(red).guides
    x = segmenter._backbone_inputs(guides)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.full((28, 28), expected[c]), atol=1e-5, rtol=0)
    assert torch.equal(guides[0, 0], torch.full((28, 28), 255.0))


def test_reference_path_equals_fast_path(tiny_model) -> None:
    config = InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14, background=True,
                             pamr_iterations=3)
    results = []
    for reference in (False, True):
        seg = Segmenter(tiny_model, config, reference=reference)
        seg.set_classes(["cat", "dog", "sky"])
        seg.set_image(_image())
        results.append(seg.predict())
    torch.testing.assert_close(results[0].scores, results[1].scores, atol=1e-5, rtol=0)
    assert (results[0].labels != results[1].labels).float().mean() < 1e-3


def test_small_and_extreme_images_work(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "dog"])
    for h, w in ((2, 2), (5, 300), (300, 5)):
        segmenter.set_image(_image(h, w))
        assert segmenter.predict().labels.shape == (h, w)


@pytest.mark.parametrize("labels, message", [
    ([], "no labels"),
    (["cat", ""], "empty or only whitespace"),
    (["cat", "   "], "empty or only whitespace"),
    (["cat", "cat"], "duplicate label 'cat'"),
    ("cat, dog", "not one string"),
    (["cat", 3], "not a string"),
])
def test_bad_labels_are_rejected(segmenter: Segmenter, labels, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        segmenter.set_classes(labels)


def test_background_label_clashes_with_background_channel(segmenter: Segmenter) -> None:
    segmenter.set_classes(["background", "cat"])  # allowed as a plain label ...
    segmenter.set_image(_image())
    assert segmenter.predict().class_names == ["background", "cat"]
    with pytest.raises(InvalidInputError, match="clashes with the background channel"):
        segmenter.predict(background=True)  # ... but not next to the background channel
    with pytest.raises(InvalidInputError, match="clashes with the background channel"):
        Segmenter.check_labels(["cat", " Background"], background=True)


def test_set_classes_sets_the_vocabulary_only(segmenter: Segmenter) -> None:
    """Options are per call: one call's background or threshold does not leak into the next."""
    before = segmenter.config
    segmenter.set_classes(["cat", "dog"], ["a photo of a {}."])
    segmenter.set_image(_image())
    with_background = segmenter.predict(background=True, bg_threshold=0.99, bg_clean=False, pamr=False)
    assert with_background.background_index == 0 and int(with_background.labels.max()) == 0
    assert with_background.config.bg_threshold == 0.99 and not with_background.config.pamr
    plain = segmenter.predict()
    assert plain.background_index is None and plain.config == before and segmenter.config is before


def test_deprecated_option_spellings_warn_and_still_work(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat", "dog"])
    segmenter.set_image(_image())
    with pytest.warns(DeprecationWarning, match="use bg_") as caught:
        old = segmenter.predict(background=True, threshold=0.99, clean=False)
    assert {warning.filename for warning in caught} == {__file__}  # pointing at the caller
    with pytest.warns(DeprecationWarning, match="bg_clean") as caught:
        segmenter.predict_features(segmenter.set_image(_image()), clean=True)
    assert {warning.filename for warning in caught} == {__file__}
    assert old.config.bg_threshold == 0.99 and old.config.bg_clean is False
    assert torch.equal(old.labels, segmenter.predict(background=True, bg_threshold=0.99, bg_clean=False).labels)
    with pytest.raises(TypeError, match="bg_threshold"):
        segmenter.predict(threshold=0.5, bg_threshold=0.5)
    # set_classes(background=, threshold=): deprecated; they change the segmenter's defaults, as they used to.
    with pytest.warns(DeprecationWarning, match="set_classes"):
        segmenter.set_classes(["cat", "dog"], background=True, threshold=0.99)
    assert segmenter.config.background and segmenter.config.bg_threshold == 0.99
    assert segmenter.predict().background_index == 0
    with pytest.warns(DeprecationWarning), pytest.raises(InvalidInputError, match="clashes"):
        segmenter.set_classes(["background", "cat"], background=True)


def test_a_checked_vocabulary_is_checked_once(segmenter: Segmenter, monkeypatch) -> None:
    import talk2dino.vocabulary as vocabulary

    checked = Segmenter.check_labels(["cat", "background"])
    assert checked == ["cat", "background"] and checked.background_label == 2
    def refuse(name: str) -> str:
        raise RuntimeError("checked twice")

    monkeypatch.setattr(vocabulary, "canonical_label", refuse)
    segmenter.set_classes(checked)
    segmenter.set_image(_image())
    assert segmenter.predict().class_names == ["cat", "background"]
    with pytest.raises(InvalidInputError, match="clashes"):  # one flag, not a second pass over the names
        segmenter.predict(background=True)
    checked.append("dog")  # edited after the check: checked again
    with pytest.raises(RuntimeError, match="checked twice"):
        segmenter.set_classes(checked)


def test_embed_images_can_isolate_a_bad_image(segmenter: Segmenter) -> None:
    good, other = _image(60, 90, 0), _image(40, 40, 1)
    bad = np.zeros((4, 4, 5), np.uint8)  # five channels: not an image
    with pytest.raises(InvalidInputError):
        segmenter.embed_images([good, bad, other])
    calls: list[tuple[int, int]] = []
    got = segmenter.embed_images([good, bad, other], isolate_failures=True,
                                 progress=lambda image, count: calls.append((image, count)))
    assert isinstance(got[1], InvalidInputError)
    alone = [segmenter.embed_images([good])[0], segmenter.embed_images([other])[0]]
    for index, expected in ((0, alone[0]), (2, alone[1])):
        features = got[index]
        assert not isinstance(features, InvalidInputError)
        assert torch.equal(features.output.patch_tokens, expected.output.patch_tokens)
        assert features.embed_seconds > 0
    assert {image for image, _ in calls} == {0, 2}
    assert sum(count for image, count in calls if image == 0) >= len(alone[0].boxes)


def test_predict_without_image_or_labels_says_what_is_missing(segmenter: Segmenter) -> None:
    with pytest.raises(InvalidInputError, match="no image set"):
        segmenter.set_classes(["cat"])
        segmenter.predict()
    fresh = Segmenter(segmenter.model, segmenter.config)
    fresh.set_image(_image())
    with pytest.raises(InvalidInputError, match="no labels set"):
        fresh.predict()


def test_invalid_options_are_rejected(segmenter: Segmenter) -> None:
    segmenter.set_classes(["cat"])
    segmenter.set_image(_image())
    with pytest.raises(ValueError, match="bg_threshold"):
        segmenter.predict(bg_threshold=1.5)
    with pytest.raises(ValueError, match="multiple of the backbone patch size"):
        Segmenter(segmenter.model, InferenceConfig(window=30, stride=15))
    with pytest.raises(InvalidInputError, match="exactly one"):
        segmenter.class_embeddings(["cat"], templates=["no placeholder"])


@pytest.mark.reference
def test_real_photo_end_to_end(segmenter: Segmenter) -> None:
    path = IMAGES / "rocket.jpg"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    segmenter.set_classes(["rocket", "sky", "smoke"])
    segmenter.set_image(Image.open(path))
    result = segmenter.predict(background=True)
    assert result.labels.shape == (427, 640)
    summary = segmenter.summary(result)
    assert summary["settings"]["bg_clean"] is True  # cleaning follows background by default
    assert summary["model"]["weights"]["projection"]["sha256"]


def _plain_prediction(segmenter: Segmenter, features, cfg: InferenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline of method.md §4.4-4.8 written plainly on all windows at once (the code before the
    per-window fast path): stitched scores and labels via the full softmax."""
    import torch.nn.functional as F

    from talk2dino.ops.cleaning import clean_background
    from talk2dino.ops.pamr import pamr
    from talk2dino.ops.similarity import sigmoid_cosine
    from talk2dino.ops.sliding import stitch

    out, text = features.output, segmenter._class_embeddings
    n, num_classes = out.patch_tokens.shape[0], text.shape[0]
    wh, ww = features.guides.shape[-2:]
    scores = sigmoid_cosine(out.patch_tokens, text)
    if cfg.effective_bg_clean:
        scores = clean_background(scores, out.patch_tokens, out.attn_logits, text, lam=cfg.clean_lambda,
                                  head_embedding=cfg.clean_head_embedding)
    scores = F.interpolate(scores.view(n, num_classes, *out.grid), size=(wh, ww), mode="bilinear",
                           align_corners=True)
    if cfg.pamr:
        scores = pamr(features.guides, scores, iterations=cfg.pamr_iterations, dilations=cfg.pamr_dilations)
    if cfg.background:
        scores = torch.cat([torch.full((n, 1, wh, ww), cfg.bg_threshold), scores], dim=1)
    stitched = stitch(scores, features.boxes, *features.resized_size)
    final = F.interpolate(stitched[None], size=features.original_size, mode="bilinear", align_corners=False)[0]
    return stitched, torch.softmax(final, dim=0).argmax(dim=0)


@pytest.mark.parametrize(("background", "pamr"), [(True, True), (False, True), (True, False)])
def test_fast_path_equals_plain_pipeline_bit_for_bit(segmenter: Segmenter, background: bool, pamr: bool) -> None:
    """One window at a time, the background channel added by `stitch`, labels without the full softmax:
    the same numbers as the plain all-windows pipeline."""
    segmenter.set_classes(["cat", "dog", "sky", "road"])
    for seed, (h, w) in enumerate(((60, 90), (41, 37), (90, 30))):
        features = segmenter.set_image(_image(h, w, seed))
        result = segmenter.predict(background=background, pamr=pamr)
        stitched, labels = _plain_prediction(segmenter, features, result.config)
        assert result.stitched is not None and torch.equal(result.stitched, stitched)
        assert torch.equal(result.labels, labels)


def test_scores_are_resized_on_first_access_only(segmenter: Segmenter, monkeypatch) -> None:
    import talk2dino.postprocess as postprocess

    calls = {"n": 0}
    original = postprocess.resize_scores

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(postprocess, "resize_scores", counting)
    segmenter.set_classes(["cat", "dog"])
    segmenter.set_image(_image())
    result = segmenter.predict(background=True)
    assert calls["n"] == 1  # the labels' resize; the scores are not kept
    first = result.scores
    assert calls["n"] == 2 and result.scores is first  # computed once, then cached
    expected = torch.nn.functional.interpolate(result.stitched[None], size=(60, 90), mode="bilinear",
                                               align_corners=False)[0]
    assert torch.equal(first, expected)


def test_segmentation_result_takes_tensors_and_replace_works(segmenter: Segmenter) -> None:
    import dataclasses

    segmenter.set_classes(["cat", "dog"])
    segmenter.set_image(_image())
    result = segmenter.predict()
    copy = dataclasses.replace(result, class_names=["a", "b"])
    assert torch.equal(copy.scores, result.scores) and copy.class_names == ["a", "b"]
    plain = predictor_result = type(result)(result.labels, result.scores.clone(), ["a", "b"], None, result.config)
    assert torch.equal(predictor_result.scores, result.scores) and plain.timings == {}
    plain.scores = torch.zeros(1)
    assert plain.scores.shape == (1,)
