"""One thread owns the `Segmenter`; requests reach it through a bounded queue and are batched.

Why one thread: on a CPU machine two forward passes at once only fight over the same cores (and double the
peak memory), and `Segmenter` keeps per-call state (the vocabulary). So every model call (backbone, text
encoder, scoring, PAMR) runs on this thread, one batch at a time, and HTTP handlers only wait for futures.

Admission is counted from the moment a handler reserves a slot (before it decodes the image) until the
worker takes the job, so decoding work is never started for a request that the queue cannot hold.

Overload policy: a request is admitted only if the queue has a free slot *and* the work ahead of it,
estimated from the measured seconds per request, would let it finish within `max_wait_s` (a share of
``--request-timeout``). Otherwise it is refused at once with `QueueFullError` (HTTP 429 + Retry-After, a
client error that well-behaved clients retry later) instead of being admitted only to time out with a 503.

Failures: an input error (`InvalidInputError`, e.g. an image the model cannot take) fails that request alone
(HTTP 400) and the batch's other requests go on. Anything else (a bug, an unsupported torch/transformers
version, the device out of memory) is no request's fault: it ends the batch, every request of that batch
still waiting gets one `InternalError` line (HTTP 500), it is logged with its traceback, and the worker goes
on with the next batch (issue 12).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from talk2dino.errors import InternalError, InvalidInputError, internal_error_message
from talk2dino.predictor import Segmenter
from talk2dino.prepare import ImageFeatures
from talk2dino.render import DEFAULT_OVERLAY_ALPHA

__all__ = [
    "EmbedTextJob",
    "FeatureCache",
    "InferenceWorker",
    "OutputOptions",
    "QueueFullError",
    "RequestTimeoutError",
    "SegmentJob",
    "ServiceUnavailableError",
]

logger = logging.getLogger(__name__)

RleFormat = Literal["none", "compressed", "uncompressed"]

# What an internal-error line suggests: the server's own batching options, and where the traceback went.
MEMORY_HINT = "try a smaller --max-batch (TALK2DINO_SERVE_MAX_BATCH) or --window-batch-size"
TRACEBACK_HINT = "the traceback is in the server log"


class ServiceUnavailableError(Exception):
    """The request cannot be served now (HTTP 503); the message says why."""


class QueueFullError(Exception):
    """Admission refused: the queue is full, or the work ahead would not finish in time (HTTP 429).

    Args:
        message: one line for the client.
        retry_after_s: when a retry has a fair chance, in seconds; None lets the server use its default.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ServiceUnavailableError):
    """The request waited longer than `request_timeout_s`."""


@dataclass(frozen=True)
class OutputOptions:
    """What a segmentation answer carries besides the legend, settings and timings."""

    label_png: bool = False  # palette PNG of the label map, base64
    overlay: bool = False  # RGB overlay PNG (render.overlay), base64
    alpha: float = DEFAULT_OVERLAY_ALPHA  # overlay opacity of the class colours
    rle: RleFormat = "none"  # COCO RLE per label
    heatmaps: bool = False  # per-label score map PNGs, base64
    attention: bool = False  # per-head CLS attention map PNGs, base64


@dataclass
class SegmentJob:
    """One `/v1/segment` request, decoded and validated, waiting for the worker."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    labels: list[str]  # checked by the handler (a `CheckedLabels`: set_classes does not check it again)
    background: bool  # this request's options, passed to predict_features for this call only
    bg_threshold: float | None  # None: the served segmenter's default
    bg_clean: bool | None
    pamr: bool | None
    outputs: OutputOptions
    deadline: float  # time.monotonic() after which the answer is useless
    admitted: float = field(default_factory=time.monotonic)
    future: Future[dict[str, Any]] = field(default_factory=Future)
    image_sha256: str | None = None  # of the uploaded bytes: the feature cache's key (None: never cached)


class FeatureCache:
    """The backbone features of the last `capacity` images, least recently used first out; thread-safe.

    Keys are the sha256 of the uploaded bytes together with the settings the features depend on (model,
    weights, dtype, device, resize and window geometry; see `InferenceWorker.feature_key`), so a request that
    changes only the labels, threshold, PAMR or outputs reuses them and skips the backbone. Memory is bounded
    by `capacity` images (each as large as one backbone pass over its windows keeps).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageFeatures | None:
        """The features stored under `key` (now the most recently used), or None."""
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: ImageFeatures) -> None:
        """Store `features`, dropping the least recently used entries beyond `capacity`."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = features
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass
class EmbedTextJob:
    """One `/v1/embed-text` request."""

    labels: list[str]
    templates: list[str] | None
    deadline: float
    admitted: float = field(default_factory=time.monotonic)
    future: Future[dict[str, Any]] = field(default_factory=Future)


Job = SegmentJob | EmbedTextJob
# (segmenter, job, features, timings) -> JSON-ready answer; runs on the worker thread.
SegmentRenderer = Callable[[Segmenter, SegmentJob, ImageFeatures, dict[str, float]], dict[str, Any]]


class InferenceWorker:
    """The thread that owns the segmenter, fed by a bounded queue.

    Args:
        segmenter: used by this thread only, from `start` on.
        render: turns a prediction into the JSON answer (on this thread, so encoding also stays serialised).
        queue_size: requests admitted but not yet taken by the worker.
        max_batch: segmentation requests whose images share one `Segmenter.embed_images` call.
        max_wait_s: admit a request only if the estimated work ahead of it and its own fits in this many
            seconds (None: admit up to `queue_size` whatever the wait).
        feature_cache_size: images whose backbone features are kept for requests that send the same image
            again (`FeatureCache`); 0 turns the cache off.
    """

    def __init__(self, segmenter: Segmenter, render: SegmentRenderer, *, queue_size: int, max_batch: int,
                 max_wait_s: float | None = None, feature_cache_size: int = 0) -> None:
        self.segmenter = segmenter
        self.features = FeatureCache(feature_cache_size)
        self._render = render
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._service_s: float | None = None  # moving average of seconds per segmentation request
        self._in_batch = 0  # requests in the batch being computed (0: the worker is idle)
        self._jobs: deque[Job] = deque()
        self._reserved = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats: dict[str, int] = {
            "completed": 0, "failed": 0, "timed_out": 0, "rejected_queue_full": 0, "rejected_overloaded": 0,
            "shutdown_refused": 0, "skipped_cancelled": 0, "batches": 0, "largest_batch": 0,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (daemon: a stuck forward pass must not keep the process alive)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="talk2dino-inference", daemon=True)
        self._thread.start()
        logger.info("inference worker started (queue %d, batch %d)", self.queue_size, self.max_batch)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail queued jobs with 503, and wait up to `timeout` s for the current batch.

        The wait matters: a daemon thread still inside a forward pass when the interpreter exits can abort
        the process (SIGABRT from the native thread pools) instead of letting it exit with code 0.
        """
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._reserved = 0
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceUnavailableError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("inference worker still busy after %.0f s; leaving it behind", timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """Queue state and counters, for /healthz."""
        with self._cond:
            service = round(self._service_s, 3) if self._service_s is not None else None
            return {"waiting": self._reserved, "capacity": self.queue_size, "busy": self._in_batch > 0,
                    "max_batch": self.max_batch, "seconds_per_request": service,
                    "feature_cache": {"size": len(self.features), "capacity": self.features.capacity,
                                      "hits": self.features.hits, "misses": self.features.misses},
                    **self.stats}

    # ------------------------------------------------------------------ admission
    def reserve(self) -> None:
        """Hold one queue slot for a request about to be decoded.

        Raises:
            QueueFullError: `queue_size` requests are waiting already, or the estimated wait is over `max_wait_s`.
            ServiceUnavailableError: the worker is stopping or not running.
        """
        with self._cond:
            if self._stopping or not self.alive:
                raise ServiceUnavailableError("the inference worker is not running")
            service = self._service_s
            if self._reserved >= self.queue_size:
                self.stats["rejected_queue_full"] += 1
                retry = service * (self._in_batch or 1) if service is not None else None
                raise QueueFullError(f"the server is busy: {self.queue_size} requests are already waiting; "
                                     "retry after the Retry-After seconds", retry)
            ahead = self._reserved + self._in_batch
            # An idle worker always admits: the average may come from heavier requests than this one, and a
            # refused request would never refresh it.
            if self.max_wait_s is not None and service is not None and ahead > 0:
                # Everything queued and the batch being computed, then this request's own batch, which
                # requests queued after it may fill up to max_batch (its answer comes when the batch ends).
                # On a CPU a batch costs about the sum of its images, so a per-request average predicts it.
                expected = (ahead + self.max_batch) * service
                if expected > self.max_wait_s:
                    self.stats["rejected_overloaded"] += 1
                    raise QueueFullError(
                        f"the server is busy: about {expected:.0f} s of work is ahead, more than it can finish "
                        f"within {self.max_wait_s:.0f} s; retry after the Retry-After seconds",
                        expected - self.max_wait_s + service)
            self._reserved += 1

    def release(self) -> None:
        """Give back a slot from `reserve` whose request was never submitted (e.g. a bad image)."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, job: Job) -> None:
        """Queue a job for which `reserve` succeeded."""
        with self._cond:
            if self._stopping:
                self._reserved = max(0, self._reserved - 1)
                raise ServiceUnavailableError("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()

    def count_timeout(self) -> None:
        """Record a request that its handler gave up on."""
        with self._cond:
            self.stats["timed_out"] += 1

    def count_shutdown(self) -> None:
        """Record a request answered 503 because the server is shutting down."""
        with self._cond:
            self.stats["shutdown_refused"] += 1

    # ------------------------------------------------------------------ the thread
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch: list[Job] = [self._jobs.popleft()]
            if isinstance(batch[0], SegmentJob):
                while self._jobs and isinstance(self._jobs[0], SegmentJob) and len(batch) < self.max_batch:
                    batch.append(self._jobs.popleft())
            self._reserved = max(0, self._reserved - len(batch))
            self._in_batch = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                live = self._start_jobs(batch)
                if live and isinstance(live[0], SegmentJob):
                    started = time.monotonic()
                    ran_backbone = self._segment([job for job in live if isinstance(job, SegmentJob)])
                    if ran_backbone:
                        # Only batches that ran the backbone: cache hits would make the admission estimate
                        # (and the page's progress estimate) far too optimistic for a new image.
                        self._observe((time.monotonic() - started) / len(live))
                elif live and isinstance(live[0], EmbedTextJob):
                    self._embed_text(live[0])
            except BaseException as err:  # noqa: BLE001 - the worker must survive anything one batch does
                # Not an input error (those are answered per request below): no request's fault, so the
                # batch ends and each request still waiting gets the same one line (HTTP 500).
                message = internal_error_message(err, memory_hint=MEMORY_HINT, traceback_hint=TRACEBACK_HINT)
                logger.error("inference batch of %d request(s) failed: %s", len(batch), message, exc_info=err)
                failure = InternalError(message)
                for job in batch:
                    if not job.future.done():
                        self.stats["failed"] += 1
                        job.future.set_exception(failure)
            finally:
                with self._cond:
                    self._in_batch = 0

    def _observe(self, seconds: float) -> None:
        """Update the seconds-per-request average used by admission (recent batches weigh more)."""
        with self._cond:
            previous = self._service_s
            self._service_s = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def _start_jobs(self, batch: Sequence[Job]) -> list[Job]:
        """Mark jobs running; skip the ones whose handler gave up (cancelled) or whose deadline passed."""
        live: list[Job] = []
        now = time.monotonic()
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                self.stats["skipped_cancelled"] += 1
            elif now > job.deadline:
                job.future.set_exception(RequestTimeoutError("the request timed out while queued"))
            else:
                live.append(job)
        return live

    def _finish(self, job: Job, make: Callable[[], dict[str, Any]]) -> None:
        if self._stopping:
            # Shutting down: the handler has answered (or will answer) 503; end the batch as soon as possible.
            job.future.set_exception(ServiceUnavailableError("the server is shutting down"))
            return
        if time.monotonic() > job.deadline:
            # Nobody waits for the answer any more: skip the rest of the work.
            job.future.set_exception(RequestTimeoutError("the request timed out"))
            return
        try:
            job.future.set_result(make())
            self.stats["completed"] += 1
        except InvalidInputError as err:  # this request's fault only; anything else ends the batch in _run
            job.future.set_exception(err)

    def feature_key(self, image_sha256: str) -> str:
        """The cache key of an image: its bytes' hash and every setting its backbone features depend on."""
        model = self.segmenter.model
        config = self.segmenter.config
        settings = {"model": model.config.name, "weights": model.weights_info, "device": str(model.device),
                    "reference": self.segmenter.reference, "short_side": config.short_side,
                    "max_long_side": config.max_long_side, "window": config.window, "stride": config.stride,
                    "window_batch_size": config.window_batch_size}
        return image_sha256 + "|" + json.dumps(settings, sort_keys=True, default=str)

    def _embed(self, jobs: list[SegmentJob]) -> list[ImageFeatures | None]:
        """Backbone features of each job's image (None: that image's input error, already set on its future)."""
        # The throughput path: all windows of all images in shared backbone batches; an input error is one
        # image's fault and fails that request alone (anything else: see _run).
        features: list[ImageFeatures | None] = []
        for job, feats in zip(jobs, self.segmenter.embed_images([job.image for job in jobs], isolate_failures=True),
                              strict=True):
            if isinstance(feats, InvalidInputError):
                job.future.set_exception(feats)
                features.append(None)
            else:
                features.append(feats)
        return features

    def _segment(self, jobs: list[SegmentJob]) -> bool:
        """Answer a batch; whether the backbone ran (False: every image's features came from the cache)."""
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        started = time.monotonic()
        keys = [self.feature_key(job.image_sha256) if job.image_sha256 is not None and self.features.capacity > 0
                else None for job in jobs]
        features: list[ImageFeatures | None] = [self.features.get(key) if key is not None else None for key in keys]
        cached = [feats is not None for feats in features]
        # The same new image twice in one batch is embedded once.
        missing: dict[str, list[int]] = {}
        for i, (key, hit) in enumerate(zip(keys, cached, strict=True)):
            if not hit:
                missing.setdefault(key if key is not None else f"\x00{i}", []).append(i)
        if missing:
            firsts = [indices[0] for indices in missing.values()]
            for indices, feats in zip(missing.values(), self._embed([jobs[i] for i in firsts]), strict=True):
                for i in indices[1:]:
                    if feats is None:  # the same image's input error as the first copy's
                        jobs[i].future.set_exception(jobs[indices[0]].future.exception() or InvalidInputError(
                            "the image cannot be embedded"))
                    features[i] = feats
                features[indices[0]] = feats
                if feats is not None and keys[indices[0]] is not None:
                    self.features.put(keys[indices[0]], feats)  # type: ignore[arg-type]
        embed_s = (time.monotonic() - started) / max(len(missing), 1)
        for job, feats, hit in zip(jobs, features, cached, strict=True):
            if feats is None:
                continue
            timings = {"queue": started - job.admitted, "embed_image": 0.0 if hit else embed_s,
                       "batch_size": float(len(jobs)), "cached_features": float(hit)}
            self._finish(job, functools.partial(self._render, self.segmenter, job, feats, timings))
            job.image = np.empty((0, 0, 3), dtype=np.uint8)  # drop the pixels as soon as they are used
        return bool(missing)

    def _embed_text(self, job: EmbedTextJob) -> None:
        started = time.monotonic()

        def make() -> dict[str, Any]:
            names = self.segmenter.check_labels(job.labels, background=False)
            embeddings = self.segmenter.class_embeddings(names, job.templates)
            return {"labels": names, "dim": int(embeddings.shape[1]),
                    "templates": len(job.templates) if job.templates is not None
                    else len(self.segmenter.model.config.text.templates),
                    "embeddings": embeddings.float().cpu().tolist(),
                    "timings": {"queue": round(started - job.admitted, 6),
                                "text": round(time.monotonic() - started, 6)}}

        self._finish(job, make)
