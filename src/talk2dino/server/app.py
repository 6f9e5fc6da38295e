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

This module holds `create_app` and the routes. The rest of the package: `schemas` (answer models, OpenAPI),
`http` (body limits, error answers, `serve` with its graceful stop), `formtext` (UTF-8 form fields),
`uploads` (reading the image, labels and options), `worker` (the thread that owns the segmenter and batches
requests), `answers` (building the JSON answer), `fetch` (``image_url``), `config` (`ServerConfig`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import anyio
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from talk2dino import Segmenter, __version__
from talk2dino.errors import InvalidInputError
from talk2dino.render import DEFAULT_OVERLAY_ALPHA
from talk2dino.server.answers import favicon_ico, model_info, render_segment
from talk2dino.server.config import ServerConfig
from talk2dino.server.formtext import Utf8FormMiddleware
from talk2dino.server.http import BodyLimitMiddleware, Drain, add_error_handlers
from talk2dino.server.schemas import (
    ERRORS,
    EmbedTextRequest,
    EmbedTextResponse,
    ErrorResponse,
    SegmentResponse,
    tidy_openapi,
)
from talk2dino.server.uploads import (
    DECODE_CONCURRENCY,
    check_label_limits,
    check_templates,
    check_url_text,
    decode_image,
    fetch_url,
    max_json_labels_chars,
    parse_labels,
    renamed_option,
)
from talk2dino.server.worker import (
    EmbedTextJob,
    InferenceWorker,
    OutputOptions,
    RleFormat,
    SegmentJob,
    ServiceUnavailableError,
)

__all__ = ["STATIC_DIR", "create_app"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
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

router = APIRouter()


def create_app(segmenter: Segmenter | Callable[[], Segmenter], config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app serving `segmenter` with the limits of `config`.

    The segmenter's `config` holds the server's inference defaults; requests override them per call and
    never change them.

    Args:
        segmenter: a ready `Segmenter`, or a factory called once at startup (the model loads once).
        config: limits and batching; `ServerConfig()` defaults when None.

    Returns:
        The ASGI app; run it with uvicorn (``talk2dino serve`` runs it with `talk2dino.server.serve`). The
        worker thread starts and stops with the app's lifespan.
    """
    cfg = config if config is not None else ServerConfig()
    cfg.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ready = segmenter if isinstance(segmenter, Segmenter) else await anyio.to_thread.run_sync(segmenter)
        worker = InferenceWorker(ready, render_segment, queue_size=cfg.queue_size, max_batch=cfg.max_batch,
                                 max_wait_s=_ADMISSION_SHARE * cfg.request_timeout_s,
                                 feature_cache_size=cfg.feature_cache_size)
        worker.start()
        app.state.worker = worker
        app.state.decode_limiter = anyio.CapacityLimiter(DECODE_CONCURRENCY)
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
    app.state.drain = Drain()
    app.state.deprecations_warned = set()  # deprecated form field names already logged (once each)
    tidy_openapi(app)
    # Form text fields in UTF-8 or a 400 (not Starlette's silent Latin-1 reading); added first, so the body
    # limit stays the outermost check.
    app.add_middleware(Utf8FormMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes, timeout_s=cfg.body_timeout_s)
    add_error_handlers(app, cfg)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------------- request helpers
def _config(request: Request) -> ServerConfig:
    config: ServerConfig = request.app.state.config
    return config


def _worker(request: Request) -> InferenceWorker:
    worker: InferenceWorker | None = getattr(request.app.state, "worker", None)
    if worker is None:
        raise ServiceUnavailableError("the server is starting; the model is not loaded yet")
    return worker


def _admit(request: Request, worker: InferenceWorker) -> None:
    drain: Drain = request.app.state.drain
    if drain.refuses(getattr(request.state, "arrived", time.monotonic())):
        worker.count_shutdown()
        raise ServiceUnavailableError("the server is shutting down; retry against a running instance")
    worker.reserve()


def _served(request: Request, name: str | None) -> Segmenter:
    served: Segmenter = _worker(request).segmenter
    if name is not None and name != served.model.config.name:
        raise StarletteHTTPException(404, f"model {name!r} is not served here; this server serves "
                                          f"{served.model.config.name!r}")
    return served


async def _wait(request: Request, job: SegmentJob | EmbedTextJob, worker: InferenceWorker) -> dict[str, Any]:
    """Submit `job` and wait for its answer until its deadline or the shutdown's, whichever comes first."""
    cfg, drain = _config(request), request.app.state.drain
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


# ---------------------------------------------------------------------------------------------- routes
@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(favicon_ico(), media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


@router.get("/docs", include_in_schema=False)
@router.get("/redoc", include_in_schema=False)
async def docs_moved() -> None:
    raise StarletteHTTPException(404, "no interactive API docs here (Swagger UI needs a CDN, which an offline "
                                      "server cannot reach); the OpenAPI schema is at /openapi.json")


@router.get("/healthz", summary="liveness and queue state")
async def healthz(request: Request) -> JSONResponse:
    worker = getattr(request.app.state, "worker", None)
    if worker is None or not worker.alive:
        return JSONResponse({"status": "unavailable", "worker_alive": False}, status_code=503)
    return JSONResponse({"status": "ok", "model": worker.segmenter.model.config.name, "worker_alive": True,
                         "queue": worker.snapshot(), "version": __version__})


@router.get("/v1/models", summary="the served model, its defaults and the server's limits; the registry")
async def models(request: Request) -> dict[str, Any]:
    from talk2dino.registry import describe_models

    cfg = _config(request)
    served = _served(request, None)
    return {
        "loaded": {**model_info(served), "defaults": served.config.effective_dict()},
        "limits": {k: getattr(cfg, k) for k in (
            "max_upload_bytes", "max_pixels", "max_score_values", "max_labels", "max_label_length",
            "queue_size", "request_timeout_s", "max_batch", "allow_image_url")},
        "available": [{"name": n, "description": d} for n, d in describe_models().items()],
    }


@router.get("/v1/models/{name}", summary="one model: the served one, or a registry entry",
            responses={404: ERRORS[404]})
async def model(request: Request, name: str) -> dict[str, Any]:
    from talk2dino.registry import describe_models

    served = _served(request, None)
    if name == served.model.config.name:
        return {**model_info(served), "loaded": True, "defaults": served.config.effective_dict()}
    known = describe_models()
    if name in known:
        return {"name": name, "loaded": False, "description": known[name]}
    raise StarletteHTTPException(404, f"unknown model {name!r}; this server serves "
                                      f"{served.model.config.name!r} (registry: {', '.join(known)})")


@router.post("/v1/segment", response_model=SegmentResponse, response_model_exclude_unset=True,
             summary="segment an image with free-form labels",
             responses={**ERRORS, 415: {"model": ErrorResponse, "description": "not multipart/form-data"}})
async def segment(
    request: Request,
    labels: Annotated[str, Form(description='comma-separated ("cat, sofa") or a JSON list of strings')],
    image: Annotated[UploadFile | None, File(description="the image file (JPEG, PNG, WebP, ...)")] = None,
    image_url: Annotated[str | None, Form(description="http(s) URL instead of a file (off by default)")] = None,
    model: Annotated[str | None, Form(description="must name the served model when given")] = None,
    background: Annotated[bool | None, Form(description="add the background class (default: model's)")] = None,
    bg_threshold: Annotated[float | None, Form(gt=0, lt=1, description="background threshold θ")] = None,
    bg_clean: Annotated[bool | None, Form(description="background cleaning (default: with background)")] = None,
    pamr: Annotated[bool | None, Form(description="PAMR refinement (default: model's)")] = None,
    label_png: Annotated[bool, Form(description="return the label map as a palette PNG")] = False,
    overlay: Annotated[bool, Form(description="return the colour overlay PNG")] = False,
    alpha: Annotated[float, Form(ge=0, le=1, description="overlay opacity")] = DEFAULT_OVERLAY_ALPHA,
    rle: Annotated[RleFormat, Form(description="return COCO RLE per label")] = "none",
    heatmaps: Annotated[bool, Form(description="return per-label score heat maps")] = False,
    attention: Annotated[bool, Form(description="return per-head CLS attention maps")] = False,
    threshold: Annotated[float | None, Form(gt=0, lt=1, description="deprecated: bg_threshold")] = None,
    clean: Annotated[bool | None, Form(description="deprecated: bg_clean")] = None,
) -> dict[str, Any]:
    started = time.monotonic()
    cfg = _config(request)
    worker = _worker(request)
    served = _served(request, model)
    if (image is None) == (image_url is None):
        raise InvalidInputError("send exactly one of an 'image' file or an 'image_url'")
    if image_url is not None and not cfg.allow_image_url:
        raise StarletteHTTPException(403, "image_url is disabled on this server (start it with "
                                          "--allow-image-url); upload the file as 'image' instead")
    if image_url is not None:
        check_url_text(image_url)
    warned: set[str] = request.app.state.deprecations_warned
    bg_threshold = renamed_option("bg_threshold", bg_threshold, threshold, warned=warned)
    bg_clean = renamed_option("bg_clean", bg_clean, clean, warned=warned)
    names = parse_labels(labels, max_json_chars=max_json_labels_chars(cfg))
    check_label_limits(names, cfg)
    use_background = served.config.background if background is None else background
    checked = Segmenter.check_labels(names, background=use_background)
    channels = len(checked) + int(use_background)

    fetched: bytes | None = None
    if image_url is not None:
        # Before admission: a slow URL holds one of the fetch slots (429 when all are busy), never a queue slot.
        fetched = await fetch_url(request, image_url, cfg, started)
    _admit(request, worker)
    submitted = False
    try:
        # From memory: the fetched bytes, or the upload's file object as the framework spooled it.
        source: bytes | BinaryIO
        if fetched is not None:
            source, display = fetched, "image_url"
        else:
            assert image is not None
            source, display = image.file, Path(image.filename or "upload").name
        rgb, digest = await anyio.to_thread.run_sync(
            lambda: decode_image(source, display, config=cfg, channels=channels),
            limiter=request.app.state.decode_limiter)
        job = SegmentJob(
            image=rgb, labels=checked, background=use_background, bg_threshold=bg_threshold, bg_clean=bg_clean,
            pamr=pamr, outputs=OutputOptions(label_png=label_png, overlay=overlay, alpha=alpha, rle=rle,
                                             heatmaps=heatmaps, attention=attention),
            deadline=started + cfg.request_timeout_s, admitted=started, image_sha256=digest)
        submitted = True
        answer = await _wait(request, job, worker)
    finally:
        if not submitted:
            worker.release()
    answer["timings"]["total"] = round(time.monotonic() - started, 6)
    return answer


@router.post("/v1/embed-text", response_model=EmbedTextResponse, summary="class embeddings of labels (cached)",
             responses=ERRORS)
async def embed_text(request: Request, body: EmbedTextRequest) -> dict[str, Any]:
    started = time.monotonic()
    cfg = _config(request)
    worker = _worker(request)
    served = _served(request, body.model)
    check_label_limits(body.labels, cfg)
    if body.templates is not None:
        check_templates(body.templates, cfg)
    _admit(request, worker)
    job = EmbedTextJob(labels=list(body.labels), templates=body.templates, deadline=started + cfg.request_timeout_s,
                       admitted=started)
    answer = await _wait(request, job, worker)
    return {"model": served.model.config.name, **answer}
