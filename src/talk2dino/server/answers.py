"""The JSON answers: a segmentation's legend, settings and timings, and on request its pictures and masks.

Every picture is drawn with `talk2dino.render` (the code that writes the CLI's files): the label map as a
palette PNG, the overlay, COCO RLE per label, per-label heat maps and per-head attention maps, as base64.
`render_segment` runs on the inference worker's thread (`talk2dino.server.worker`), so encoding is
serialised with the model calls.
"""

from __future__ import annotations

import base64
import functools
import io
import time
from typing import Any

import numpy as np
from PIL import Image

from talk2dino.predictor import Segmenter
from talk2dino.prepare import ImageFeatures
from talk2dino.render import (
    attention_tiles,
    heatmap_tiles,
    label_colors,
    label_png_bytes,
    label_rles,
    overlay,
    png_bytes,
)
from talk2dino.server.worker import SegmentJob

__all__ = ["favicon_ico", "model_info", "render_segment"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def model_info(segmenter: Segmenter) -> dict[str, Any]:
    """The served model as answers show it: name, profile, device, dtype, projection hash, template count."""
    model = segmenter.model
    # Sources may be local paths of the server machine; report names, hashes and dtype only.
    weights = model.weights_info
    return {"name": model.config.name, "profile": model.config.profile, "device": str(model.device),
            "dtype": weights.get("dtype"), "projection_sha256": weights.get("projection", {}).get("sha256"),
            "templates": len(model.config.text.templates)}


def render_segment(segmenter: Segmenter, job: SegmentJob, features: ImageFeatures,
                   timings: dict[str, float]) -> dict[str, Any]:
    """Predict one job from its image's features and build its JSON answer (`SegmentResponse`).

    The request's options go to `Segmenter.predict_features` for this call only: the shared segmenter's
    configuration (the server's defaults) is never changed by a request.

    Args:
        segmenter: the worker's segmenter (this runs on the worker thread).
        job: the request: labels (checked by the handler), options and which outputs to include.
        features: the backbone features of ``job.image`` (``job.image`` is ``[H, W, 3]`` uint8 RGB).
        timings: seconds per stage so far; the text, prediction and encoding stages are added.

    Returns:
        The answer's fields, JSON-ready.
    """
    clock = time.monotonic()
    segmenter.set_classes(job.labels)
    timings["text"] = time.monotonic() - clock
    result = segmenter.predict_features(features, background=job.background, bg_threshold=job.bg_threshold,
                                        bg_clean=job.bg_clean, pamr=job.pamr)
    timings.update(result.timings)
    clock = time.monotonic()
    labels = result.labels.numpy()
    names = result.class_names
    count = len(names)
    colors = label_colors(count, background_index=result.background_index)
    answer: dict[str, Any] = {
        "model": model_info(segmenter),
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "labels": [{**entry, "color": [int(c) for c in colors[entry["index"]]]} for entry in result.shares()],
        "background_index": result.background_index,
        "settings": result.config.effective_dict(),
    }
    options = job.outputs
    if options.label_png:
        answer["label_png"] = _b64(label_png_bytes(labels, count, background_index=result.background_index))
    if options.overlay:
        blended = overlay(job.image, labels, count, alpha=options.alpha, background_index=result.background_index)
        answer["overlay_png"] = _b64(png_bytes(blended))
    if options.rle != "none":
        answer["rle"] = label_rles(labels, names, compressed=options.rle == "compressed")
    if options.heatmaps and result.stitched is not None:
        stitched = result.stitched
        tiles, (low, high) = heatmap_tiles(stitched, names, background_index=result.background_index,
                                           tile_size=max(stitched.shape[-2:]))
        answer["heatmaps"] = [{"index": i, "name": names[i], "png": _b64(png_bytes(tile))} for i, tile in tiles]
        answer["heatmap_range"] = [low, high]
        answer["heatmap_size"] = [int(stitched.shape[-2]), int(stitched.shape[-1])]
    if options.attention:
        maps = features.attention_maps()
        heads = attention_tiles(maps, tile_size=max(maps.shape[-2:]))
        answer["attention"] = [{"head": m, "png": _b64(png_bytes(tile))} for m, tile in enumerate(heads)]
        answer["attention_size"] = [int(maps.shape[-2]), int(maps.shape[-1])]
    timings["encode"] = time.monotonic() - clock
    answer["timings"] = {k: round(v, 6) for k, v in timings.items()}
    return answer


@functools.cache
def favicon_ico() -> bytes:
    """The page's 32x32 icon, drawn once: four label-map quadrants in the first legend colours."""
    colors = label_colors(4)
    icon = np.zeros((32, 32, 3), dtype=np.uint8)
    icon[:16, :16], icon[:16, 16:], icon[16:, :16], icon[16:, 16:] = colors[0], colors[1], colors[2], colors[3]
    buffer = io.BytesIO()
    Image.fromarray(icon).save(buffer, format="ICO", sizes=[(32, 32), (16, 16)])
    return buffer.getvalue()
