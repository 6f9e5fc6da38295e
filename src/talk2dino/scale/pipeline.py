"""The Ray Data pipeline of `segment_dataset`: listing -> decode tasks -> segmenting actors -> Parquet part files.

Stages (each a ``map_batches`` over Arrow tables):

1. :func:`decode_batch` (CPU tasks): read the file's bytes (local or any pyarrow filesystem), hash them, decode
   them (`talk2dino.data.images.load_image`) and cut the windows (`talk2dino.prepare.prepare_image`). A file that
   cannot be read or decoded becomes a row with an ``error``.
2. :class:`SegmentActor` (an actor pool, ``workers`` actors with ``gpus_per_worker`` GPUs each): one model and one
   vocabulary embedding per actor; `Segmenter.embed_images` (one bad image isolated) and
   `Segmenter.predict_features`; the label map as the label PNG ``talk2dino segment`` writes (its pixels and palette).
3. :func:`write_batch` (CPU tasks): every ``rows_per_file`` rows become one part file, written under a hidden
   temporary name and renamed (local; an object-store upload is atomic by itself), so a reader or a resumed run
   never sees half a file.

Only input errors (an unreadable, corrupt or oversized image) become error rows; anything else (a bug, a broken
installation, the device out of memory) fails the job, as in ``talk2dino segment`` (issue 12).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from talk2dino.config import DEFAULT_MODEL, InferenceConfig
from talk2dino.errors import InternalError, InvalidInputError, one_line
from talk2dino.scale import require_ray
from talk2dino.scale.inputs import InputSpec, done_keys, is_uri, list_inputs, pending
from talk2dino.scale.schema import DECODED_SCHEMA, OUTPUT_SCHEMA, SUMMARY_SCHEMA

logger = logging.getLogger(__name__)

# The settings that decide how an image is cut into windows: the decode tasks and the actors must agree on them.
_WINDOW_FIELDS = ("short_side", "max_long_side", "window", "stride")
DECODE_TASK_MEMORY = 512 << 20
"""Bytes reserved per decode task: its worker process (~300 MiB with torch imported, measured) and a 12-megapixel
photo decoded and cut into windows (~18 bytes a pixel)."""


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address="auto"`` or ``ray://...``) or start a local runtime (None/"local").

    A local runtime declares ``num_cpus`` logical CPUs (default: at least 4): on a small machine an actor pool
    that holds every CPU would starve the decode tasks and the pipeline would wait forever. Nothing is done if
    Ray is already initialised (a user's own session).
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


# ---------------------------------------------------------------------------------------------- stage 1: decode
def _read_bytes(path: str) -> bytes:
    """The file's content: local files through `fileio.open_regular` (no FIFO or device), URIs through pyarrow."""
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return bytes(stream.read())
    from talk2dino.fileio import open_regular

    with open_regular(path.removeprefix("file://"), "image") as handle:
        return handle.read()


def decode_batch(batch: pa.Table, config: InferenceConfig, max_pixels: int | None = None) -> pa.Table:
    """Listing rows -> `DECODED_SCHEMA` rows: bytes read, hashed, decoded and cut into windows (CPU task)."""
    from talk2dino.data.images import load_image
    from talk2dino.prepare import prepare_image

    rows: dict[str, list[Any]] = {f.name: [] for f in DECODED_SCHEMA}
    for path, size, mtime in zip(*(batch.column(c).to_pylist() for c in ("path", "size", "mtime_ns")), strict=True):
        row: dict[str, Any] = dict.fromkeys(rows)
        row.update(path=path, size=size, mtime_ns=mtime)
        try:
            try:
                data = _read_bytes(path)
            except OSError as err:
                raise InvalidInputError(f"{one_line(path, max_chars=1000)}: cannot read "
                                        f"({one_line(err.strerror or err)})") from err
            row["sha256"] = hashlib.sha256(data).hexdigest()
            prepared = prepare_image(load_image(data, name=path, max_pixels=max_pixels), config)
            guides = prepared.guides.numpy()
            row.update(height=prepared.rgb.shape[0], width=prepared.rgb.shape[1], resized=list(prepared.resized_size),
                       boxes=[int(v) for box in prepared.boxes for v in box], windows=list(guides.shape),
                       guides=guides.astype(np.uint8).tobytes())  # exact: the windows are resized uint8 pixels
        except InvalidInputError as err:
            row["error"] = str(err)
        for name in rows:
            rows[name].append(row[name])
    return pa.table(rows, schema=DECODED_SCHEMA)


def _prepared(row: dict[str, Any]) -> Any:
    """A `PreparedImage` from a decoded row. The original pixels are not shipped: only their size is used."""
    import torch

    from talk2dino.prepare import PreparedImage

    guides = torch.from_numpy(np.frombuffer(row["guides"], dtype=np.uint8).reshape(row["windows"]).copy())
    boxes = [tuple(row["boxes"][i:i + 4]) for i in range(0, len(row["boxes"]), 4)]
    rgb = np.broadcast_to(np.zeros(1, np.uint8), (row["height"], row["width"], 3))  # size only, no memory
    return PreparedImage(rgb=rgb, resized_size=tuple(row["resized"]), boxes=boxes, guides=guides.float())


# ------------------------------------------------------------------------------------------- stage 2: segment
class SegmentActor:
    """One model and one vocabulary embedding per actor; ``__call__`` segments a batch of decoded rows."""

    def __init__(self, model: dict[str, Any], overrides: dict[str, Any], labels: Sequence[str],
                 templates: Sequence[str] | None, window_config: dict[str, Any],
                 compile_backbone: bool = False) -> None:
        from talk2dino.fileio import json_default
        from talk2dino.predictor import Segmenter
        from talk2dino.results import describe_model

        if model.get("offline"):
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TALK2DINO_OFFLINE"] = "1"
        self.segmenter = Segmenter.from_pretrained(
            model["name"], device=model.get("device"), dtype=model.get("dtype"), cache_dir=model.get("cache_dir"),
            backbone=model.get("backbone"), text_encoder=model.get("text_encoder"),
            projection=model.get("projection"), **overrides)
        mine = {k: getattr(self.segmenter.config, k) for k in _WINDOW_FIELDS}
        if mine != window_config:
            raise InternalError(f"the model's window settings {mine} differ from the decode tasks' {window_config}")
        if compile_backbone:
            self.segmenter.model.backbone.compile_fast_path(
                backend=os.environ.get("TALK2DINO_COMPILE_BACKEND", "inductor"))
        self.segmenter.set_classes(list(labels), templates)
        info = describe_model(self.segmenter.model)
        self.model_name = str(info.get("name"))
        self.model_info = json.dumps(info, default=json_default, sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """`DECODED_SCHEMA` rows -> `OUTPUT_SCHEMA` rows (an image that fails keeps its row, with the error)."""
        from talk2dino.fileio import json_default
        from talk2dino.render import label_png_bytes

        decoded = batch.to_pylist()
        out: list[dict[str, Any]] = []
        todo = [i for i, row in enumerate(decoded) if row["error"] is None]
        started = time.perf_counter()
        features = self.segmenter.embed_images([_prepared(decoded[i]) for i in todo], isolate_failures=True)
        embedded = dict(zip(todo, features, strict=True))
        for index, row in enumerate(decoded):
            record = {name: row.get(name) for name in ("path", "size", "mtime_ns", "sha256", "width", "height",
                                                       "error")}
            record.update(model=self.model_name, model_info=self.model_info)
            feats = embedded.get(index)
            if isinstance(feats, InvalidInputError):
                record["error"] = f"{one_line(row['path'], max_chars=1000)}: {feats}"
            elif feats is not None:
                t0 = time.perf_counter()
                try:
                    result = self.segmenter.predict_features(feats)
                except InvalidInputError as err:
                    record["error"] = f"{one_line(row['path'], max_chars=1000)}: {err}"
                else:
                    shares = result.shares()
                    record.update(
                        class_names=list(result.class_names), pixel_counts=[s["pixels"] for s in shares],
                        pixel_shares=[s["share"] for s in shares], background_index=result.background_index,
                        labels_png=label_png_bytes(result.labels.numpy(), len(result.class_names),
                                                   background_index=result.background_index),
                        settings=json.dumps(result.config.effective_dict(), default=json_default, sort_keys=True),
                        seconds=feats.embed_seconds + time.perf_counter() - t0)
            out.append(record)
        logger.debug("segmented %d images in %.2f s", len(todo), time.perf_counter() - started)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


# --------------------------------------------------------------------------------------------- stage 3: write
def write_batch(batch: pa.Table, out: str) -> pa.Table:
    """Write `batch` as one new part file of the dataset `out`, atomically; returns one `SUMMARY_SCHEMA` row."""
    import pyarrow.parquet as pq

    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    if is_uri(out):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(out)
        target = f"{inner.rstrip('/')}/{name}"
        pq.write_table(batch, target, filesystem=filesystem)  # an object-store upload appears whole or not at all
        written = f"{out.rstrip('/')}/{name}"
    else:
        from talk2dino.fileio import atomic_path

        written = os.path.join(out, name)
        # A hidden temporary (pyarrow's dataset reader skips names starting with '.') renamed when complete.
        with atomic_path(written, durable=True) as temporary:
            pq.write_table(batch, temporary)
    failures = sum(1 for e in batch.column("error").to_pylist() if e is not None)
    return pa.table({"file": [written], "rows": [batch.num_rows], "failures": [failures]}, schema=SUMMARY_SCHEMA)


# ------------------------------------------------------------------------------------------------- the driver
@dataclass
class RunSummary:
    """What a `run_segment_dataset` call did."""

    listed: int  # images in the inputs
    skipped: int  # already in the output (same size and mtime), not redone
    images: int  # segmented (or failed) by this run
    failures: int  # rows with an error
    files: list[str]  # part files written
    seconds: float  # wall time of the pipeline, Ray start-up and listing excluded

    @property
    def images_per_second(self) -> float:
        """Throughput of this run (0 when nothing was to be done)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _window_config(model: dict[str, Any], overrides: dict[str, Any]) -> InferenceConfig:
    """The inference settings the decode tasks cut windows with: the model's defaults (read without loading any
    weights) with the overrides; the actors check that their loaded model agrees."""
    base = InferenceConfig()
    if model["name"] is not None:
        from talk2dino.registry import get_model_config

        base = get_model_config(model["name"], cache_dir=model.get("cache_dir")).inference
    try:
        config = dataclasses.replace(base, **overrides)
        config.validate()
    except TypeError as err:
        raise InvalidInputError(f"unknown inference setting: {one_line(err)}") from err
    return config


def segment_dataset(inputs: InputSpec, labels: Sequence[str], out: str | os.PathLike[str] | None = None, *,
                    model: str | None = DEFAULT_MODEL, backbone: str | None = None, text_encoder: str | None = None,
                    projection: str | None = None, device: str | None = None, dtype: str | None = None,
                    cache_dir: str | None = None, offline: bool = False, templates: Sequence[str] | None = None,
                    workers: int = 1, gpus_per_worker: float = 0, cpus_per_worker: float = 1, batch_size: int = 4,
                    rows_per_file: int = 64, path_column: str = "path", resume: bool = True,
                    retry_errors: bool = False, max_pixels: int | None = None, compile_backbone: bool = False,
                    write: bool = True, **inference: Any) -> Any:
    """Segment every image of `inputs` with `labels` on Ray Data; one `OUTPUT_SCHEMA` row per image.

    Args:
        inputs: a folder, glob, list file, Parquet/CSV table (`path_column`) or URI, or a list of them.
        labels: the vocabulary (checked before anything starts).
        out: the output Parquet dataset (a folder; local or a URI). Needed when `write`; with `resume`, images
            already there with the same size and mtime are left out of the returned dataset; with `retry_errors`
            only those without an error (a failed image is tried again, its new row added).
        model, backbone, text_encoder, projection, device, dtype, cache_dir, offline: the model, as
            `Segmenter.from_pretrained` / the CLI's "Model" flags (``model=None``: composed from the three parts).
        templates: prompt templates (None: the model's).
        workers: segmenting actors; gpus_per_worker, cpus_per_worker: resources of each (fractions allowed).
        batch_size: images per actor call (their windows share backbone batches).
        rows_per_file: rows per Parquet part file (a killed run loses at most the in-flight batches and fewer
            than this many finished rows per write task).
        write: True: run to the end and return ``ray.data.read_parquet(out)`` (every run's rows); False:
            return the lazy dataset of this run's rows, written nowhere (chain it into your own pipeline).
        inference: `InferenceConfig` overrides (``background=True``, ``bg_threshold=0.5``, ``pamr=False`` ...).

    Raises:
        InvalidInputError: bad labels, settings or inputs (before any Ray work); ImportError: no Ray installed.
    """
    if write:
        if out is None:
            raise InvalidInputError("segment_dataset(write=True) needs out=, the output Parquet folder")
        run_segment_dataset(inputs, labels, out, model=model, backbone=backbone, text_encoder=text_encoder,
                            projection=projection, device=device, dtype=dtype, cache_dir=cache_dir, offline=offline,
                            templates=templates, workers=workers, gpus_per_worker=gpus_per_worker,
                            cpus_per_worker=cpus_per_worker, batch_size=batch_size, rows_per_file=rows_per_file,
                            path_column=path_column, resume=resume, retry_errors=retry_errors,
                            max_pixels=max_pixels, compile_backbone=compile_backbone, **inference)
        return require_ray().data.read_parquet(os.fspath(out))
    dataset, _listed, _skipped = _build(
        inputs, labels, None if out is None else os.fspath(out), dict(
            name=model, backbone=backbone, text_encoder=text_encoder, projection=projection, device=device,
            dtype=dtype, cache_dir=cache_dir, offline=offline), inference, templates=templates, workers=workers,
        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
        path_column=path_column, resume=resume, retry_errors=retry_errors, max_pixels=max_pixels,
        compile_backbone=compile_backbone)
    return dataset


def _build(inputs: InputSpec, labels: Sequence[str], out: str | None, model: dict[str, Any],
           overrides: dict[str, Any], *, templates: Sequence[str] | None, workers: int, gpus_per_worker: float,
           cpus_per_worker: float, batch_size: int, path_column: str, resume: bool, retry_errors: bool,
           max_pixels: int | None, compile_backbone: bool) -> tuple[Any, int, int]:
    """The lazy dataset of output rows, the number of images listed and the number skipped as done."""
    from talk2dino.vocabulary import check_labels

    if workers < 1:
        raise InvalidInputError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if gpus_per_worker < 0 or cpus_per_worker < 0:
        raise InvalidInputError("gpus_per_worker and cpus_per_worker must be >= 0")
    config = _window_config(model, overrides)
    check_labels(list(labels), background=config.background)
    listing = list_inputs(inputs, path_column=path_column)
    todo = pending(listing, done_keys(out, retry_errors=retry_errors)) if resume and out is not None else listing
    skipped = listing.num_rows - todo.num_rows
    if skipped:
        logger.info("skipping %d of %d images already in %s", skipped, listing.num_rows, out)
    ray = require_ray()
    # Blocks of a few batches: decode work spreads over the tasks and streams to the actors as it is done.
    step = max(1, 2 * batch_size)
    blocks = [todo.slice(i, step) for i in range(0, todo.num_rows, step)] or [todo]
    window = {k: getattr(config, k) for k in _WINDOW_FIELDS}
    dataset = ray.data.from_arrow(blocks).map_batches(
        decode_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"config": config, "max_pixels": max_pixels},
        # A memory reservation per decode task (an image decoded and cut into windows) keeps the scheduler from
        # running more at once than a node holds; it also keeps Ray from fusing the decode tasks into the actors,
        # so decoding stays in CPU tasks that scale apart from the (GPU) actors, busy with the model.
        num_cpus=1, memory=DECODE_TASK_MEMORY,
    ).map_batches(
        SegmentActor, batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker, num_cpus=cpus_per_worker, fn_constructor_kwargs={
            "model": model, "overrides": overrides, "labels": list(labels), "templates": templates,
            "window_config": window, "compile_backbone": compile_backbone},
    )
    return dataset, listing.num_rows, skipped


def run_segment_dataset(inputs: InputSpec, labels: Sequence[str], out: str | os.PathLike[str], *,
                        model: str | None = DEFAULT_MODEL, backbone: str | None = None,
                        text_encoder: str | None = None, projection: str | None = None, device: str | None = None,
                        dtype: str | None = None, cache_dir: str | None = None, offline: bool = False,
                        templates: Sequence[str] | None = None, workers: int = 1, gpus_per_worker: float = 0,
                        cpus_per_worker: float = 1, batch_size: int = 4, rows_per_file: int = 64,
                        path_column: str = "path", resume: bool = True, retry_errors: bool = False,
                        max_pixels: int | None = None, compile_backbone: bool = False,
                        **inference: Any) -> RunSummary:
    """`segment_dataset` run to the end, writing new part files into `out`; returns what it did."""
    out = os.fspath(out)
    if rows_per_file < 1:
        raise InvalidInputError(f"rows_per_file must be >= 1, got {rows_per_file}")
    dataset, listed, skipped = _build(
        inputs, labels, out, dict(name=model, backbone=backbone, text_encoder=text_encoder, projection=projection,
                                  device=device, dtype=dtype, cache_dir=cache_dir, offline=offline),
        inference, templates=templates, workers=workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, batch_size=batch_size, path_column=path_column, resume=resume,
        retry_errors=retry_errors, max_pixels=max_pixels, compile_backbone=compile_backbone)
    if listed == skipped:
        return RunSummary(listed=listed, skipped=skipped, images=0, failures=0, files=[], seconds=0.0)
    if not is_uri(out):
        os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    written = dataset.map_batches(write_batch, batch_format="pyarrow", batch_size=rows_per_file,
                                  fn_kwargs={"out": out})
    files: list[str] = []
    images = failures = 0
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        files.extend(batch.column("file").to_pylist())
        images += sum(batch.column("rows").to_pylist())
        failures += sum(batch.column("failures").to_pylist())
    return RunSummary(listed=listed, skipped=skipped, images=images, failures=failures, files=files,
                      seconds=time.perf_counter() - started)
