"""The HTTP service: a FastAPI app over one `Segmenter` (house-style §2: a client of the public API).

Endpoints (the OpenAPI schema at ``/openapi.json`` documents every field):

- ``POST /v1/segment``: multipart image (or ``image_url`` when enabled) + comma-separated labels + options ->
  legend (colour, pixels, share per label), settings, timings; on request the label map as a palette PNG or
  COCO RLE, the overlay, per-label heat maps and per-head attention maps (PNG, base64).
- ``POST /v1/embed-text``: JSON ``{"labels": [...]}`` -> unit class embeddings (cached by the segmenter).
- ``GET /healthz``, ``GET /v1/models``, ``GET /v1/models/{name}``.
- ``GET /``: the web page (``static/``: plain HTML, CSS and JavaScript, no build step).

Why FastAPI + uvicorn: a standard ASGI stack with multipart parsing, request validation and an OpenAPI schema
generated from the handler signatures, so the documented API and the code cannot drift apart.

Errors are JSON ``{"error": "<one line>"}``: 400 bad input (unreadable image, empty or duplicate label), 403
``image_url`` disabled, 404 unknown model or route, 408 body not received within ``--body-timeout``, 413 body,
image or score volume over its limit, 422 wrong field type or a count/length limit, 429 overloaded (queue
full, or the work ahead would not finish in time; with ``Retry-After``), 500 an internal failure that is no
input's fault (a bug, an unsupported torch/transformers version, the device out of memory: one line naming the
exception and the installed versions; the traceback is in the server log), 503 timeout or shutdown (with
``Retry-After``).

`serve` runs the app with uvicorn and a graceful stop: on SIGTERM/SIGINT the port closes, requests in
flight get ``--shutdown-grace`` seconds to finish (then 503), and the process exits with code 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talk2dino import Segmenter, __version__
from talk2dino.config import check_template
from talk2dino.data.images import load_image
from talk2dino.errors import InternalError, InvalidInputError, error_reason, one_line
from talk2dino.labels import split_labels
from talk2dino.outputs import (
    DEFAULT_OVERLAY_ALPHA,
    attention_tiles,
    heatmap_tiles,
    label_colors,
    label_png_bytes,
    label_rles,
    overlay,
    png_bytes,
)
from talk2dino.predictor import ImageFeatures
from talk2dino.server.config import ServerConfig
from talk2dino.server.fetch import FetchTooLargeError, fetch_image_url
from talk2dino.server.formtext import Utf8FormMiddleware
from talk2dino.server.worker import (
    EmbedTextJob,
    InferenceWorker,
    OutputOptions,
    QueueFullError,
    RleFormat,
    SegmentJob,
    ServiceUnavailableError,
)

__all__ = ["create_app", "parse_labels"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decoding runs off the event loop; two at a time is enough to overlap with the network on 2 cores without
# letting a burst of large uploads decode (and hold pixels) all at once.
_DECODE_CONCURRENCY = 2
_MAX_TEMPLATES = 64
_COPY_CHUNK = 1 << 20
_PEEK_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide state
# Admit a request only if the work ahead is estimated to finish within this share of --request-timeout: the
# estimate is an average of recent batches, and under a burst the next ones run slower (the 32-client load
# check measured +35 % per image against the warm-up), so the margin keeps admitted requests clear of the
# timeout (503).
_ADMISSION_SHARE = 0.7
# After the grace period, how long the last batch may still run (rendering is skipped, the backbone pass
# cannot be interrupted) before the worker thread is left behind.
_STOP_BACKSTOP_S = 120.0
# How often a waiting handler checks whether a shutdown began: the signal handler cannot wake asyncio waiters.
_DRAIN_POLL_S = 0.2
# Answers that leave part of the body unread must close the connection, or a client could keep trickling
# bytes into it.
_CLOSE = {"Connection": "close"}
# Endpoints whose body is a form; anything else sent to them is answered 415 (see `validation_error`).
_FORM_PATHS = frozenset({"/v1/segment"})
_FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


class PayloadTooLargeError(StarletteHTTPException):
    """413: the body, the image or the work it implies is over a configured limit."""

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=413, detail=detail, headers=headers)


class BodyTimeoutError(StarletteHTTPException):
    """408: the body did not arrive within ``--body-timeout`` (a slow or stalled upload)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers=_CLOSE)


class Drain:
    """Shutdown state shared by `serve` (which starts it on a signal) and the request handlers.

    Plain attributes only: `begin` runs inside a signal handler, where asyncio objects must not be touched.
    """

    def __init__(self) -> None:
        self.started: float | None = None  # time.monotonic() of the signal
        self.deadline: float | None = None  # time.monotonic() after which in-flight requests get 503

    def begin(self, grace_s: float) -> None:
        """Start draining: refuse requests arriving from now on, answer in-flight ones 503 after `grace_s` s."""
        if self.deadline is None:
            now = time.monotonic()
            self.started, self.deadline = now, now + grace_s

    def refuses(self, arrived: float) -> bool:
        """Whether a request whose headers arrived at `arrived` came after the shutdown began."""
        return self.started is not None and arrived >= self.started


# ---------------------------------------------------------------------------------------------- schema models
class LabelInfo(BaseModel):
    """One channel of the answer: legend colour, pixel count and share of the image."""

    index: int = Field(description="value of this label in the label map (0 is background when requested)")
    name: str
    color: list[int] = Field(description="RGB legend, overlay and label_png palette colour (outputs.label_colors)")
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


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "bad input"), (403, "image_url disabled"), (404, "unknown model"),
                       (408, "body not received within --body-timeout"), (413, "over a size limit"),
                       (422, "wrong type or over a count/length limit"),
                       (429, "overloaded: queue full or the work ahead would not finish in time; see Retry-After"),
                       (500, "internal failure, not the input's fault (bug, library version, out of memory)"),
                       (503, "timed out or shutting down; see Retry-After"))
}


# ---------------------------------------------------------------------------------------------- body limit
class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 (by Content-Length up front, else while they stream in), and
    bodies not fully received `timeout_s` after the headers with 408.

    Starlette's multipart parser would otherwise spool a body of any size to disk before the handler runs,
    and uvicorn has no body-read timeout: a client sending a few bytes a second would hold its connection
    (and the parser's buffers) for as long as it likes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message = f"request body is larger than this server's limit of {limit:,} bytes (--max-upload-bytes)"
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"error": "invalid Content-Length header"})
                    return
                if declared > limit:
                    await _send_json(send, 413, {"error": message})
                    return
        received = 0
        started = False
        body_done = False
        arrived = time.monotonic()
        # Handlers read it as request.state.arrived: a request still uploading when SIGTERM comes is in flight.
        scope.setdefault("state", {})["arrived"] = arrived
        deadline = arrived + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: waiting for a disconnect is not bounded here
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    msg = await receive()
            except TimeoutError:
                logger.info("closing a request whose body took longer than %g s (%d bytes received)",
                            self.timeout_s, received)
                raise BodyTimeoutError(f"the request body was not received within {self.timeout_s:g} s "
                                       f"({received:,} bytes arrived; --body-timeout)") from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(message, headers=_CLOSE)
                body_done = not msg.get("more_body", False)
            else:
                body_done = True
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (PayloadTooLargeError, BodyTimeoutError) as err:
            if started:
                raise
            await _send_json(send, err.status_code, {"error": str(err.detail)})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------- inputs
def parse_labels(text: str, *, max_json_chars: int | None = None) -> list[str]:
    """Labels from a form field: a JSON list of strings (``["a, b", "c"]``) or a comma-separated string.

    Comma-separated entries are trimmed, and ``"..."`` quotes one that holds commas; an empty entry is an
    error, as in ``talk2dino segment --labels`` (`talk2dino.labels.split_labels`).
    A JSON list longer than `max_json_chars` is refused before parsing (the server passes a bound from its
    label limits), and deep nesting or huge numbers are refused, never raised as RecursionError/ValueError.

    Raises:
        InvalidInputError: malformed, oversized or too deeply nested JSON, a non-string entry, or an empty entry.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        if max_json_chars is not None and len(stripped) > max_json_chars:
            raise InvalidInputError(f"labels: a JSON list of {len(stripped):,} characters is longer than this "
                                    f"server accepts ({max_json_chars:,}, from --max-labels and --max-label-length)")
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"labels look like a JSON list but do not parse ({err.msg})") from err
        except RecursionError:
            raise InvalidInputError("labels: JSON list is nested too deeply; send a flat list of strings") from None
        except ValueError as err:  # e.g. an integer past Python's digit limit
            raise InvalidInputError(f"labels: JSON list does not parse ({one_line(str(err))[:120]})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInputError("labels as JSON must be a list of strings")
        return value
    # As `talk2dino segment --labels`: '"cat, dog", bird' is two labels, not '"cat' and 'dog"'.
    return split_labels(text, what="labels")


def _max_json_labels_chars(config: ServerConfig) -> int:
    """The longest JSON label list that can hold `max_labels` labels of `max_label_length` characters, each
    character escaped (``\\uXXXX``, 6 characters) and separated by ``", "`` (a generous bound, not a limit)."""
    return 2 + config.max_labels * (6 * config.max_label_length + 8)


def _check_url_text(url: str) -> None:
    """Refuse an image_url that no HTTP request line can carry (whitespace, control characters) before fetching."""
    if len(url) > 8192 or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidInputError(f"image_url must be a URL without spaces or control characters; got "
                                f"{one_line(url, 100)!r} (percent-encode them, e.g. %20 for a space)")


def _check_label_limits(names: list[str], config: ServerConfig, what: str = "labels") -> None:
    if len(names) > config.max_labels:
        raise StarletteHTTPException(422, f"{len(names)} {what} given; this server accepts at most "
                                          f"{config.max_labels} (--max-labels)")
    for name in names:
        if len(name) > config.max_label_length:
            raise StarletteHTTPException(422, f"a {what[:-1]} of {len(name)} characters ({name[:40]!r}...) is "
                                              f"longer than this server's limit of {config.max_label_length} "
                                              "(--max-label-length)")


def _peek_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header without decoding; None when Pillow cannot read it (load_image says why)."""
    with _PEEK_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.size
        except Image.DecompressionBombError as err:
            raise PayloadTooLargeError(f"image refused as a possible decompression bomb ({err})") from err
        except Exception:  # noqa: BLE001 - any unreadable header is reported by load_image with its reason
            return None


def _load_upload(path: Path, display: str, *, config: ServerConfig, channels: int) -> np.ndarray:
    """Decode an uploaded file with the library's guarded loader, after the server's size checks."""
    size = _peek_size(path)
    if size is not None:
        width, height = size
        pixels = width * height
        if pixels > config.max_pixels:
            raise PayloadTooLargeError(
                f"{display}: image is {width}x{height} ({pixels:,} pixels), above this server's limit of "
                f"{config.max_pixels:,} (--max-pixels); send a smaller image")
        if pixels * channels > config.max_score_values:
            raise PayloadTooLargeError(
                f"{display}: a {width}x{height} image with {channels} score channels needs {pixels * channels:,} "
                f"score values, above this server's limit of {config.max_score_values:,} (--max-score-values); "
                "send a smaller image or fewer labels")
    try:
        return load_image(path, max_pixels=config.max_pixels)
    except InvalidInputError as err:
        raise InvalidInputError(str(err).replace(str(path), display)) from None


async def _fetch_image_url(request: Request, url: str, config: ServerConfig, started: float) -> bytes:
    """Fetch an ``image_url`` (server/fetch.py: public addresses only, one deadline, a byte cap) off the loop.

    It runs before admission, so a slow or stalled URL never holds a queue slot that uploads need; fetches have
    their own bound (`ServerConfig.url_fetch_limit`), and when all are busy the answer is 429 at once rather
    than a wait. The deadline is the request's (``--request-timeout`` counts from arrival, so it includes the
    fetch) and at most ``--url-timeout`` for the fetch itself.

    Raises:
        QueueFullError: `url_fetch_limit` fetches are in progress (429).
        FetchError: the one generic 400 of every fetch failure (the reason is logged).
        PayloadTooLargeError: the content is over ``--max-upload-bytes`` (413).
    """
    state = request.app.state
    limiter: anyio.CapacityLimiter | None = getattr(state, "url_fetch_limiter", None)
    if limiter is None:  # made on first use, on the event loop thread (no await in between: no race)
        limiter = state.url_fetch_limiter = anyio.CapacityLimiter(config.url_fetch_limit)
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        raise QueueFullError(f"the server is busy: {config.url_fetch_limit} image_url fetches are already in "
                             "progress; retry after the Retry-After seconds, or upload the image as 'image'") from None
    deadline = min(started + config.request_timeout_s, time.monotonic() + config.url_timeout_s)
    drain: Drain | None = getattr(state, "drain", None)
    if drain is not None and drain.deadline is not None:  # shutting down: no fetch outlives the grace period
        deadline = min(deadline, drain.deadline)
    try:
        return await anyio.to_thread.run_sync(functools.partial(
            fetch_image_url, url, max_bytes=config.max_upload_bytes, deadline=deadline,
            allowed_networks=config.url_allow_networks))
    except FetchTooLargeError as err:
        raise PayloadTooLargeError(str(err)) from None
    finally:
        limiter.release()


def _sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes: the feature cache's key for an upload."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _favicon_ico() -> bytes:
    """A 32x32 icon drawn once: four label-map quadrants in the first legend colours."""
    colors = label_colors(4)
    icon = np.zeros((32, 32, 3), dtype=np.uint8)
    icon[:16, :16], icon[:16, 16:], icon[16:, :16], icon[16:, 16:] = colors[0], colors[1], colors[2], colors[3]
    buffer = io.BytesIO()
    Image.fromarray(icon).save(buffer, format="ICO", sizes=[(32, 32), (16, 16)])
    return buffer.getvalue()


def _write_temp(suffix: str, source: Any | bytes) -> Path:
    with tempfile.NamedTemporaryFile(prefix="talk2dino-upload-", suffix=suffix, delete=False) as handle:
        if isinstance(source, bytes):
            handle.write(source)
        else:
            source.seek(0)
            shutil.copyfileobj(source, handle, _COPY_CHUNK)
        return Path(handle.name)


# ---------------------------------------------------------------------------------------------- answers
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _model_info(segmenter: Segmenter) -> dict[str, Any]:
    model = segmenter.model
    # Sources may be local paths of the server machine; report names, hashes and dtype only.
    weights = model.weights_info
    return {"name": model.config.name, "profile": model.config.profile, "device": str(model.device),
            "dtype": weights.get("dtype"), "projection_sha256": weights.get("projection", {}).get("sha256"),
            "templates": len(model.config.text.templates)}


def _make_renderer(base_threshold: float) -> Callable[[Segmenter, SegmentJob, ImageFeatures, dict[str, float]],
                                                      dict[str, Any]]:
    def render(segmenter: Segmenter, job: SegmentJob, features: ImageFeatures,
               timings: dict[str, float]) -> dict[str, Any]:
        """Predict one job on the worker thread and build its JSON answer."""
        clock = time.monotonic()
        # Explicit every time: set_classes keeps background/threshold between calls otherwise.
        threshold = job.threshold if job.threshold is not None else base_threshold
        segmenter.set_classes(job.labels, background=job.background, threshold=threshold)
        timings["text"] = time.monotonic() - clock
        result = segmenter.predict_features(features, pamr=job.pamr, clean=job.clean)
        timings.update(result.timings)
        clock = time.monotonic()
        labels = result.labels.numpy()
        names = result.class_names
        count = len(names)
        colors = label_colors(count, background_index=result.background_index)
        answer: dict[str, Any] = {
            "model": _model_info(segmenter),
            "size": [int(labels.shape[0]), int(labels.shape[1])],
            "labels": [{**entry, "color": [int(c) for c in colors[entry["index"]]]} for entry in result.shares()],
            "background_index": result.background_index,
            "settings": result.config.effective_dict(),
        }
        options = job.outputs
        if options.label_png:
            answer["label_png"] = _b64(label_png_bytes(labels, count, background_index=result.background_index))
        if options.overlay:
            blended = overlay(job.image, labels, count, alpha=options.alpha,
                              background_index=result.background_index)
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

    return render


# ---------------------------------------------------------------------------------------------- the app
def create_app(segmenter: Segmenter | Callable[[], Segmenter], config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app serving `segmenter` with the limits of `config`.

    Args:
        segmenter: a ready `Segmenter`, or a factory called once at startup (the model loads once).
        config: limits and batching; `ServerConfig()` defaults when None.

    Returns:
        The ASGI app; run it with uvicorn (``talk2dino serve`` does). The worker thread starts and stops with
        the app's lifespan.
    """
    cfg = config if config is not None else ServerConfig()
    cfg.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ready = segmenter if isinstance(segmenter, Segmenter) else await anyio.to_thread.run_sync(segmenter)
        worker = InferenceWorker(ready, _make_renderer(ready.config.bg_threshold), queue_size=cfg.queue_size,
                                 max_batch=cfg.max_batch, max_wait_s=_ADMISSION_SHARE * cfg.request_timeout_s,
                                 feature_cache_size=cfg.feature_cache_size)
        worker.start()
        app.state.worker = worker
        # set_classes changes the segmenter's background/threshold per request; the defaults are these.
        app.state.defaults = ready.config
        app.state.decode_limiter = anyio.CapacityLimiter(_DECODE_CONCURRENCY)
        logger.info("serving model %s", ready.model.config.name)
        try:
            yield
        finally:
            # By now every handler has answered (uvicorn waits for them); only a batch nobody waits for is left.
            await anyio.to_thread.run_sync(lambda: worker.stop(timeout=cfg.shutdown_grace_s + _STOP_BACKSTOP_S))

    app = FastAPI(
        title="talk2dino",
        version=__version__,
        description="Open-vocabulary semantic segmentation with Talk2DINO. Send an image and free-form labels; "
                    "get the label map, a legend with each label's colour and pixel share, and optionally "
                    "heat maps and DINOv2 attention maps. Errors are `{\"error\": \"...\"}`.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: offline (the usual case here) they are blank
        # pages. The schema itself is served at /openapi.json; /docs says so (see `docs_moved` below).
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = cfg
    _tidy_openapi(app)
    drain = Drain()
    app.state.drain = drain
    # Form text fields in UTF-8 or a 400 (not Starlette's silent Latin-1 reading); added first, so the body
    # limit stays the outermost check.
    app.add_middleware(Utf8FormMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes, timeout_s=cfg.body_timeout_s)
    _add_error_handlers(app, cfg)

    def worker_of(request: Request) -> InferenceWorker:
        worker = getattr(request.app.state, "worker", None)
        if worker is None:
            raise ServiceUnavailableError("the server is starting; the model is not loaded yet")
        return worker

    def admit(request: Request, worker: InferenceWorker) -> None:
        if drain.refuses(getattr(request.state, "arrived", time.monotonic())):
            worker.count_shutdown()
            raise ServiceUnavailableError("the server is shutting down; retry against a running instance")
        worker.reserve()

    def check_model(request: Request, name: str | None) -> Segmenter:
        served: Segmenter = worker_of(request).segmenter
        if name is not None and name != served.model.config.name:
            raise StarletteHTTPException(404, f"model {name!r} is not served here; this server serves "
                                              f"{served.model.config.name!r}")
        return served

    async def wait(job: SegmentJob | EmbedTextJob, worker: InferenceWorker) -> dict[str, Any]:
        worker.submit(job)
        future = asyncio.wrap_future(job.future)
        while True:
            now = time.monotonic()
            stop = drain.deadline
            limit = job.deadline if stop is None else min(job.deadline, stop)
            if now >= limit:
                break
            done, _ = await asyncio.wait({future}, timeout=min(limit - now, _DRAIN_POLL_S))
            if done:
                return future.result()
        # Cancelling the wrapper cancels the job's future: if still queued, the worker skips it; if running,
        # its answer is dropped.
        future.cancel()
        if stop is not None and stop < job.deadline:
            worker.count_shutdown()
            raise ServiceUnavailableError(
                f"the server is shutting down and could not finish this request within its grace period of "
                f"{cfg.shutdown_grace_s:g} s (--shutdown-grace); retry against a running instance")
        worker.count_timeout()
        raise ServiceUnavailableError(
            f"the request took longer than this server's limit of {cfg.request_timeout_s:g} s "
            "(--request-timeout); the server is busy, try again later")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(_favicon_ico(), media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    async def docs_moved() -> None:
        raise StarletteHTTPException(404, "no interactive API docs here (Swagger UI needs a CDN, which an offline "
                                          "server cannot reach); the OpenAPI schema is at /openapi.json")

    @app.get("/healthz", summary="liveness and queue state")
    async def healthz(request: Request) -> JSONResponse:
        worker = getattr(request.app.state, "worker", None)
        if worker is None or not worker.alive:
            return JSONResponse({"status": "unavailable", "worker_alive": False}, status_code=503)
        return JSONResponse({"status": "ok", "model": worker.segmenter.model.config.name, "worker_alive": True,
                             "queue": worker.snapshot(), "version": __version__})

    @app.get("/v1/models", summary="the served model, its defaults and the server's limits; the registry")
    async def models(request: Request) -> dict[str, Any]:
        from talk2dino.registry import describe_models

        served = check_model(request, None)
        return {
            "loaded": {**_model_info(served), "defaults": request.app.state.defaults.effective_dict()},
            "limits": {k: getattr(cfg, k) for k in (
                "max_upload_bytes", "max_pixels", "max_score_values", "max_labels", "max_label_length",
                "queue_size", "request_timeout_s", "max_batch", "allow_image_url")},
            "available": [{"name": n, "description": d} for n, d in describe_models().items()],
        }

    @app.get("/v1/models/{name}", summary="one model: the served one, or a registry entry",
             responses={404: _ERRORS[404]})
    async def model(request: Request, name: str) -> dict[str, Any]:
        from talk2dino.registry import describe_models

        served = check_model(request, None)
        if name == served.model.config.name:
            return {**_model_info(served), "loaded": True, "defaults": request.app.state.defaults.effective_dict()}
        known = describe_models()
        if name in known:
            return {"name": name, "loaded": False, "description": known[name]}
        raise StarletteHTTPException(404, f"unknown model {name!r}; this server serves "
                                          f"{served.model.config.name!r} (registry: {', '.join(known)})")

    @app.post("/v1/segment", response_model=SegmentResponse, response_model_exclude_unset=True,
              summary="segment an image with free-form labels",
              responses={**_ERRORS, 415: {"model": ErrorResponse, "description": "not multipart/form-data"}})
    async def segment(
        request: Request,
        labels: Annotated[str, Form(description='comma-separated ("cat, sofa") or a JSON list of strings')],
        image: Annotated[UploadFile | None, File(description="the image file (JPEG, PNG, WebP, ...)")] = None,
        image_url: Annotated[str | None, Form(description="http(s) URL instead of a file (off by default)")] = None,
        model: Annotated[str | None, Form(description="must name the served model when given")] = None,
        background: Annotated[bool | None, Form(description="add the background class (default: model's)")] = None,
        threshold: Annotated[float | None, Form(gt=0, lt=1, description="background threshold")] = None,
        clean: Annotated[bool | None, Form(description="background cleaning (default: with background)")] = None,
        pamr: Annotated[bool | None, Form(description="PAMR refinement (default: model's)")] = None,
        label_png: Annotated[bool, Form(description="return the label map as a palette PNG")] = False,
        overlay: Annotated[bool, Form(description="return the colour overlay PNG")] = False,
        alpha: Annotated[float, Form(ge=0, le=1, description="overlay opacity")] = DEFAULT_OVERLAY_ALPHA,
        rle: Annotated[RleFormat, Form(description="return COCO RLE per label")] = "none",
        heatmaps: Annotated[bool, Form(description="return per-label score heat maps")] = False,
        attention: Annotated[bool, Form(description="return per-head CLS attention maps")] = False,
    ) -> dict[str, Any]:
        started = time.monotonic()
        worker = worker_of(request)
        check_model(request, model)
        if (image is None) == (image_url is None):
            raise InvalidInputError("send exactly one of an 'image' file or an 'image_url'")
        if image_url is not None and not cfg.allow_image_url:
            raise StarletteHTTPException(403, "image_url is disabled on this server (start it with "
                                              "--allow-image-url); upload the file as 'image' instead")
        if image_url is not None:
            _check_url_text(image_url)
        names = parse_labels(labels, max_json_chars=_max_json_labels_chars(cfg))
        _check_label_limits(names, cfg)
        use_background = request.app.state.defaults.background if background is None else background
        names = Segmenter.check_labels(names, background=use_background)
        channels = len(names) + int(use_background)

        fetched: bytes | None = None
        if image_url is not None:
            # Before admit(): a slow URL holds one of the fetch slots (429 when all are busy), never a queue slot.
            fetched = await _fetch_image_url(request, image_url, cfg, started)
        admit(request, worker)
        submitted = False
        temp: Path | None = None
        try:
            if image is not None:
                display = Path(image.filename or "upload").name
                temp = await anyio.to_thread.run_sync(_write_temp, Path(display).suffix[:10], image.file)
            else:
                assert fetched is not None
                display = "image_url"
                temp = await anyio.to_thread.run_sync(_write_temp, "", fetched)
            path = temp
            rgb, digest = await anyio.to_thread.run_sync(
                lambda: (_load_upload(path, display, config=cfg, channels=channels), _sha256(path)),
                limiter=request.app.state.decode_limiter)
            job = SegmentJob(
                image=rgb, labels=names, background=use_background, threshold=threshold, clean=clean, pamr=pamr,
                outputs=OutputOptions(label_png=label_png, overlay=overlay, alpha=alpha, rle=rle,
                                      heatmaps=heatmaps, attention=attention),
                deadline=started + cfg.request_timeout_s, admitted=started, image_sha256=digest)
            submitted = True
            answer = await wait(job, worker)
        finally:
            if not submitted:
                worker.release()
            if temp is not None:
                temp.unlink(missing_ok=True)
        answer["timings"]["total"] = round(time.monotonic() - started, 6)
        return answer

    @app.post("/v1/embed-text", response_model=EmbedTextResponse, summary="class embeddings of labels (cached)",
              responses=_ERRORS)
    async def embed_text(request: Request, body: EmbedTextRequest) -> dict[str, Any]:
        started = time.monotonic()
        worker = worker_of(request)
        served = check_model(request, body.model)
        _check_label_limits(body.labels, cfg)
        if body.templates is not None:
            if len(body.templates) > _MAX_TEMPLATES:
                raise StarletteHTTPException(422, f"{len(body.templates)} templates given; at most {_MAX_TEMPLATES}")
            _check_label_limits(body.templates, cfg, what="templates")
            for template in body.templates:
                check_template(template)
        admit(request, worker)
        job = EmbedTextJob(labels=list(body.labels), templates=body.templates, deadline=started + cfg.request_timeout_s,
                           admitted=started)
        answer = await wait(job, worker)
        return {"model": served.model.config.name, **answer}

    return app


def _tidy_openapi(app: FastAPI) -> None:
    """Make the multipart form schemas say what a client can actually send.

    FastAPI documents an optional form field as ``anyOf: [X, null]``, but a multipart field cannot be null
    (it is present or absent), and documents a file in only one of the two OpenAPI dialects, so generated clients
    (schemathesis found this) send ``null`` text or the image as a plain text field, and get 422.
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
            for field in form.get("properties", {}).values():
                branches = [b for b in field.get("anyOf", []) if b.get("type") != "null"]
                if len(branches) == 1 and len(field.get("anyOf", [])) == 2:
                    del field["anyOf"]
                    field.update(branches[0])
                # A file in both dialects: 3.1's contentMediaType (FastAPI >= 0.112 writes only this) and
                # 3.0's format: binary (older FastAPI writes only this); clients read one or the other.
                if field.get("contentMediaType") == "application/octet-stream" or field.get("format") == "binary":
                    field["format"] = "binary"
                    field["contentMediaType"] = "application/octet-stream"
        # FastAPI's generator cached this same dict in app.openapi_schema, so the edits above are kept.
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI, cfg: ServerConfig) -> None:
    """Every error becomes ``{"error": "<one line>"}`` with the right status."""

    def error(status: int, message: str, headers: dict[str, str] | None = None,
              details: list[dict[str, Any]] | None = None) -> JSONResponse:
        body: dict[str, Any] = {"error": message}
        if details:
            body["details"] = details
        return JSONResponse(body, status_code=status, headers=headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's generic text for a body its parser rejected (older Starlette versions say nothing
            # more): name the expected format and the parser's own reason.
            kind = request.headers.get("content-type", "none").split(";")[0].strip() or "none"
            reason = f": {error_reason(exc.__cause__)}" if exc.__cause__ is not None else ""
            # The JSON endpoints (/v1/embed-text) want UTF-8 JSON, not a form: name what this path takes.
            expected = "multipart/form-data" if request.url.path in _FORM_PATHS else "a UTF-8 JSON body"
            message = f"cannot parse the {one_line(kind)} body; send {expected}{reason}"
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.url.path in _FORM_PATHS and kind not in _FORM_TYPES:
            # Not a form at all (JSON, XML, a bare image, nothing): say what to send, not which field is missing.
            got = one_line(kind)[:100] if kind else "no Content-Type"
            return error(415, f"{request.url.path} takes multipart/form-data, not {got}: send multipart/form-data "
                              "with an 'image' file and a 'labels' field (curl -F image=@photo.jpg "
                              "-F labels='cat, sofa')")
        # Only location and message: the offending input may be a whole file.
        details = [{"loc": [str(p) for p in e.get("loc", ()) if p != "body"], "msg": str(e.get("msg", ""))}
                   for e in exc.errors()]
        line = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in details)
        return error(422, line or "invalid request", details=details)

    async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
        return error(400, str(exc).splitlines()[0] if str(exc) else "invalid input")

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return error(503, str(exc), headers={"Retry-After": str(cfg.retry_after_s)})

    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueFullError)
        # The worker's estimate of when a slot frees, never below the configured floor.
        estimate = exc.retry_after_s if exc.retry_after_s is not None else 0.0
        retry = max(cfg.retry_after_s, math.ceil(estimate))
        return error(429, str(exc), headers={"Retry-After": str(retry)})

    async def internal_failure(request: Request, exc: Exception) -> JSONResponse:
        # The inference worker already logged it with its traceback; the one line says what and which versions.
        return error(500, str(exc))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal server error; see the server log")

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        StarletteHTTPException: http_error,
        RequestValidationError: validation_error,
        InvalidInputError: invalid_input,
        ServiceUnavailableError: unavailable,
        QueueFullError: overloaded,
        InternalError: internal_failure,
        Exception: internal,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


# ---------------------------------------------------------------------------------------------- running it
def serve(app: FastAPI, *, log_level: str = "info", sockets: list[Any] | None = None) -> None:
    """Run `app` (from `create_app`) with uvicorn until SIGTERM/SIGINT, then stop gracefully.

    On the first signal the listening socket closes, idle connections close, new requests get 503, and
    requests in flight get ``shutdown_grace_s`` to finish before they are answered 503; then the worker
    stops and this function returns (the caller exits with code 0). A second SIGINT forces the exit.

    Args:
        app: the app; its ``state.config`` gives the address and limits.
        log_level: uvicorn's log level.
        sockets: already bound sockets to serve on instead of ``config.host:config.port`` (tests).
    """
    cfg: ServerConfig = app.state.config
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, workers=1, limit_concurrency=cfg.max_connections, log_level=log_level,
        log_config=None,
        # A backstop only: handlers answer by the grace deadline themselves; this bounds anything else.
        timeout_graceful_shutdown=math.ceil(cfg.shutdown_grace_s) + 5,
        # Idle keep-alive connections are closed after this long, so they cannot pile up to max_connections.
        timeout_keep_alive=5,
    )
    _GracefulServer(config, app.state.drain, cfg.shutdown_grace_s).run(sockets=sockets)


class _GracefulServer(uvicorn.Server):
    """A `uvicorn.Server` that starts the app's `Drain` on a signal and does not re-raise the signal.

    uvicorn re-raises SIGTERM after its graceful shutdown, which ends the process with -SIGTERM instead of
    exit code 0; `capture_signals` installs the same handlers without that step.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("received %s: refusing new requests, finishing the ones in flight (up to %g s)",
                        signal.Signals(sig).name, self.grace_s)
        self.drain.begin(self.grace_s)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only; whoever runs a server in a thread stops it
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
