"""The HTTP API's documented shapes: answer models, error codes and the OpenAPI schema's corrections.

FastAPI generates the schema at ``/openapi.json`` from these models and from the handler signatures in
`talk2dino.server.app`, so the documented API and the code cannot drift apart. `tidy_openapi` corrects what
FastAPI gets wrong for multipart forms, and marks the deprecated form field names.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

__all__ = [
    "DEPRECATED_FORM_FIELDS",
    "ERRORS",
    "AttentionHead",
    "EmbedTextRequest",
    "EmbedTextResponse",
    "ErrorResponse",
    "HeatMap",
    "LabelInfo",
    "RleMask",
    "SegmentResponse",
    "tidy_openapi",
]

DEPRECATED_FORM_FIELDS: dict[str, str] = {"threshold": "bg_threshold", "clean": "bg_clean"}
"""Form field names of ``POST /v1/segment`` kept for one release, and the name each one became (the names of
the CLI flags and of `InferenceConfig`). A request using one is served, and the server logs a warning."""


class LabelInfo(BaseModel):
    """One channel of the answer: legend colour, pixel count and share of the image."""

    index: int = Field(description="value of this label in the label map (0 is background when requested)")
    name: str
    color: list[int] = Field(description="RGB legend, overlay and label_png palette colour (render label_colors)")
    pixels: int
    share: float = Field(description="fraction of the image's pixels; shares sum to 1")


class RleMask(BaseModel):
    """COCO RLE of one label's mask (column-major, as pycocotools)."""

    index: int
    name: str
    size: list[int] = Field(description="[H, W]")
    counts: str | list[int] = Field(description="compressed string, or run lengths starting with zeros")


class HeatMap(BaseModel):
    """One label's score map, colour-mapped on the answer's shared `heatmap_range`."""

    index: int
    name: str
    png: str = Field(description="base64 RGB PNG at `heatmap_size`")


class AttentionHead(BaseModel):
    """One head's CLS->patch attention, colour-mapped on its own range."""

    head: int
    png: str = Field(description="base64 RGB PNG at `attention_size`")


class SegmentResponse(BaseModel):
    """The answer of `POST /v1/segment`."""

    model: dict[str, Any]
    size: list[int] = Field(description="[H, W] of the image and the label map")
    labels: list[LabelInfo]
    background_index: int | None
    settings: dict[str, Any] = Field(description="the effective inference settings")
    timings: dict[str, float] = Field(description="seconds per stage; batch_size = requests that shared the backbone")
    label_png: str | None = Field(None, description="base64 palette PNG; pixel values are label indices")
    overlay_png: str | None = Field(None, description="base64 RGB PNG of the colours blended over the image")
    rle: list[RleMask] | None = None
    heatmaps: list[HeatMap] | None = None
    heatmap_range: list[float] | None = Field(None, description="[vmin, vmax] of the heat-map colour scale")
    heatmap_size: list[int] | None = Field(None, description="[H', W'] processing size of the heat maps")
    attention: list[AttentionHead] | None = None
    attention_size: list[int] | None = None


class EmbedTextRequest(BaseModel):
    """The body of `POST /v1/embed-text`."""

    labels: list[str] = Field(min_length=1, description="class names, used verbatim")
    templates: list[str] | None = Field(None, description="prompt templates with one '{}' (default: the model's)")
    model: str | None = Field(None, description="must name the served model when given")


class EmbedTextResponse(BaseModel):
    """Unit class embeddings in the backbone's patch space, one per label (method.md §4.2)."""

    model: str
    labels: list[str]
    dim: int
    templates: int
    embeddings: list[list[float]]
    timings: dict[str, float]


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str
    details: list[dict[str, Any]] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "bad input"), (403, "image_url disabled"), (404, "unknown model"),
                       (408, "body not received within --body-timeout"), (413, "over a size limit"),
                       (422, "wrong type or over a count/length limit"),
                       (429, "overloaded: queue full or the work ahead would not finish in time; see Retry-After"),
                       (500, "internal failure, not the input's fault (bug, library version, out of memory)"),
                       (503, "timed out or shutting down; see Retry-After"))
}
"""The error answers every endpoint documents (``responses=`` of the routes)."""


def tidy_openapi(app: FastAPI) -> None:
    """Make the multipart form schemas say what a client can actually send.

    FastAPI documents an optional form field as ``anyOf: [X, null]``, but a multipart field cannot be null
    (it is present or absent), and documents a file in only one of the two OpenAPI dialects, so generated clients
    (schemathesis found this) send ``null`` text or the image as a plain text field, and get 422. The old names
    of `DEPRECATED_FORM_FIELDS` get ``deprecated: true`` (on every FastAPI version, whether or not its ``Form``
    takes ``deprecated=``).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.get("components", {}).get("schemas", {})
        for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
            content = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = content.get("schema", {}).get("$ref", "")
            form = components.get(ref.rsplit("/", 1)[-1], {})
            for name, field in form.get("properties", {}).items():
                branches = [b for b in field.get("anyOf", []) if b.get("type") != "null"]
                if len(branches) == 1 and len(field.get("anyOf", [])) == 2:
                    del field["anyOf"]
                    field.update(branches[0])
                # A file in both dialects: 3.1's contentMediaType (FastAPI >= 0.112 writes only this) and
                # 3.0's format: binary (older FastAPI writes only this); clients read one or the other.
                if field.get("contentMediaType") == "application/octet-stream" or field.get("format") == "binary":
                    field["format"] = "binary"
                    field["contentMediaType"] = "application/octet-stream"
                if name in DEPRECATED_FORM_FIELDS:
                    field["deprecated"] = True
        # FastAPI's generator cached this same dict in app.openapi_schema, so the edits above are kept.
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
