"""The HTTP plumbing around the routes: body limits, error answers, and running with a graceful stop.

- `BodyLimitMiddleware`: 413 for a body over ``--max-upload-bytes`` (by Content-Length, or while it streams
  in) and 408 for one not received within ``--body-timeout``. (`talk2dino.server.formtext` holds the other
  middleware: form text fields must be UTF-8.)
- `add_error_handlers`: every error becomes ``{"error": "<one line>"}`` with its status (see
  `talk2dino.server.app` for the list).
- `serve` and `Drain`: uvicorn with a graceful stop. On SIGTERM/SIGINT the port closes, requests in flight
  get ``--shutdown-grace`` seconds to finish (then 503), and the process exits with code 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talk2dino.errors import InternalError, InvalidInputError, error_reason, one_line
from talk2dino.server.config import ServerConfig
from talk2dino.server.worker import QueueFullError, ServiceUnavailableError

__all__ = [
    "CLOSE",
    "FORM_PATHS",
    "BodyLimitMiddleware",
    "BodyTimeoutError",
    "Drain",
    "PayloadTooLargeError",
    "add_error_handlers",
    "serve",
]

logger = logging.getLogger(__name__)

CLOSE = {"Connection": "close"}
"""Headers of an answer that leaves part of the body unread: the connection must close, or a client could keep
trickling bytes into it."""
# Endpoints whose body is a form; anything else sent to them is answered 415 (see `validation_error`).
FORM_PATHS = frozenset({"/v1/segment"})
_FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


class PayloadTooLargeError(StarletteHTTPException):
    """413: the body, the image or the work it implies is over a configured limit."""

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=413, detail=detail, headers=headers)


class BodyTimeoutError(StarletteHTTPException):
    """408: the body did not arrive within ``--body-timeout`` (a slow or stalled upload)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers=CLOSE)


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
                    await send_json(send, 400, {"error": "invalid Content-Length header"})
                    return
                if declared > limit:
                    await send_json(send, 413, {"error": message})
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
                    raise PayloadTooLargeError(message, headers=CLOSE)
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
            await send_json(send, err.status_code, {"error": str(err.detail)})


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    """Answer `body` as JSON with `status` at the ASGI level (outside the app) and close the connection."""
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------- error answers
def add_error_handlers(app: FastAPI, cfg: ServerConfig) -> None:
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
            expected = "multipart/form-data" if request.url.path in FORM_PATHS else "a UTF-8 JSON body"
            message = f"cannot parse the {one_line(kind)} body; send {expected}{reason}"
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.url.path in FORM_PATHS and kind not in _FORM_TYPES:
            # Not a form at all (JSON, XML, a bare image, nothing): say what to send, not which field is missing.
            # A body in another format is 415; no Content-Type at all is a request without its required fields,
            # 422 as the OpenAPI schema says (schemathesis' negative mode checks that).
            got = one_line(kind)[:100] if kind else "no Content-Type"
            return error(415 if kind else 422,
                         f"{request.url.path} takes multipart/form-data, not {got}: send multipart/form-data "
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
