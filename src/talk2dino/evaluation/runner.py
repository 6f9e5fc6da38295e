"""Benchmark runner: one command from a dataset folder to the paper's table (method.md §5, §6).

For each benchmark the runner builds the benchmark protocol (class names verbatim, background channel
and cleaning as published, the model's θ), embeds every image once, and for every combination of the
swept options (θ, λ; geometry changes re-embed) accumulates a confusion matrix. Per-image confusion
counts are appended to a cache as they are computed, so a killed run continues where it stopped;
under ``torchrun`` each rank takes every world-th image and the matrices are summed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talk2dino.config import EvalConfig, InferenceConfig
from talk2dino.data.benchmarks import (
    BENCHMARKS,
    FOLDER_LAYOUT_HELP,
    BenchmarkSpec,
    Sample,
    dataset_root,
    folder_benchmark,
    get_benchmark,
)
from talk2dino.data.samples import list_samples, load_sample
from talk2dino.distributed import init_process_group, torchrun_env
from talk2dino.errors import InvalidInputError, internal_error_guard
from talk2dino.evaluation.metric import ConfusionMatrix
from talk2dino.evaluation.report import SUITE_ORDER, BenchmarkResult, markdown_table, write_results
from talk2dino.fileio import FAULT_ENV, fault_point, temp_target, write_json
from talk2dino.predictor import Segmenter
from talk2dino.prepare import ImageFeatures, PreparedImage, prepare_image

logger = logging.getLogger(__name__)

# The EvalConfig sweep fields, each named after the InferenceConfig field it sets.
_SWEEP_FIELDS = ("bg_threshold", "clean_lambda", "short_side", "window", "stride")
_GEOMETRY = ("short_side", "window", "stride")
# Evaluation embeds one image at a time; what is left to shrink is the backbone's precision.
_EVAL_MEMORY_HINT = "try --dtype bfloat16, or a device with more free memory"


def _dist() -> tuple[int, int]:
    """(rank, world size) of this process; joins the gloo process group of a torchrun run."""
    env = torchrun_env()
    init_process_group(env)
    return env.rank, env.world_size


def benchmarks_for(config: EvalConfig) -> list[BenchmarkSpec]:
    """The benchmarks a config asks for.

    Raises:
        InvalidInputError: neither or both of dataset and suite, or a folder dataset without classes.
    """
    if (config.dataset is None) == (config.suite is None):
        raise InvalidInputError("give exactly one of --dataset NAME or --suite all|background|no-background")
    if config.suite is not None:
        names = [n for n in SUITE_ORDER
                 if config.suite == "all" or (BENCHMARKS[n].background == (config.suite == "background"))]
        return [BENCHMARKS[n] for n in names]
    if config.dataset == "folder":
        if not config.root or not config.classes_file:
            raise InvalidInputError(f"the folder dataset needs --root and --classes-file; {FOLDER_LAYOUT_HELP}")
        return [folder_benchmark(config.root, config.classes_file, background=config.folder_background)]
    if config.dataset not in BENCHMARKS:
        raise InvalidInputError(f"unknown --dataset {config.dataset!r}; choose one of {', '.join(dataset_names())}")
    return [get_benchmark(str(config.dataset))]


def dataset_names() -> list[str]:
    """Every valid ``--dataset`` value: the eight benchmarks, then ``folder`` (the user's own data)."""
    return [*BENCHMARKS, "folder"]


def _root_of(spec: BenchmarkSpec, config: EvalConfig) -> Path:
    if spec.name == "folder" or (config.root and config.dataset is not None):
        return Path(str(config.root))
    if not config.data_root:
        raise InvalidInputError(f"{spec.name}: give --root (its folder) or --data-root (the folder of all datasets)")
    return dataset_root(spec, config.data_root)


def option_grid(config: EvalConfig) -> list[dict[str, Any]]:
    """Every combination of the swept options (an empty list means the default for that option)."""
    axes = {name: list(getattr(config, name)) for name in _SWEEP_FIELDS if getattr(config, name)}
    if not axes:
        return [{}]
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def inference_config(base: InferenceConfig, spec: BenchmarkSpec, config: EvalConfig,
                     options: dict[str, Any]) -> InferenceConfig:
    """The benchmark protocol (method.md §5.1) on top of the model's defaults, plus swept options.

    The protocol's changes are `EvalConfig.protocol_changes` (background and cleaning from the benchmark, PAMR and
    other settings from ``config.inference``); `options` (one `option_grid` entry) come last.
    """
    changes = config.protocol_changes(background=spec.background, bg_clean=spec.bg_clean)
    changes.update(options)
    result = dataclasses.replace(base, **changes)
    result.validate()
    return result


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ProgressCache:
    """Append-only per-image confusion counts (sparse), so that a killed run resumes.

    One JSON line per image: ``{"name", "counts": [[gt, pred, n], ...]}`` or ``{"name", "skipped": reason}``.
    A torn last line (a kill mid-write) is cut off when the cache is opened and that image recomputed;
    cutting it (rather than only skipping it) keeps the next line from being appended onto the torn one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]  # b"" when no line is complete
            if len(complete) != len(data):
                logger.info("%s: dropping a torn last line left by an interrupted run", path)
                with open(path, "r+b") as handle:
                    handle.truncate(len(complete))
            for line in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("name"), str) and (
                        "counts" in entry or "skipped" in entry):
                    self.done[entry["name"]] = entry
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run

    def add(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry) + "\n"
        if os.environ.get(FAULT_ENV):  # crash test: a kill can land with half of the line written
            self._handle.write(line[: len(line) // 2])
            self._handle.flush()
            fault_point("eval-torn-line")
            line = line[len(line) // 2:]
        self._handle.write(line)
        self._handle.flush()
        self.done[entry["name"]] = entry

    def close(self) -> None:
        self._handle.close()


def _remove_stale_temps(folder: Path) -> None:
    """Delete the `atomic_path` temp files a killed run left in `folder` (their names are ours alone)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and temp_target(path.name) is not None:
            logger.info("%s: deleting temp file %s of an interrupted run", folder, path.name)
            path.unlink(missing_ok=True)


def _sparse_counts(counts: torch.Tensor) -> list[list[int]]:
    """``[C, C]`` host counts -> ``[[gt, pred, n], ...]`` over the non-zero cells, row-major (the cache format)."""
    array = counts.numpy()
    rows, cols = np.nonzero(array)
    return [[int(g), int(p), int(array[g, p])] for g, p in zip(rows, cols, strict=True)]


def _apply(matrix: ConfusionMatrix, counts: list[list[int]]) -> None:
    for g, p, n in counts:
        matrix.state[g, p] += n


@dataclasses.dataclass
class LoadedSample:
    """One sample as a loader worker hands it over: its label map and its image prepared for each geometry of
    the run, or the input error that makes it unreadable (skipped with ``--skip-bad``)."""

    sample: Sample
    label: torch.Tensor | None  # [H, W] int64 ground truth
    prepared: dict[tuple[Any, ...], PreparedImage | InvalidInputError]  # per (short_side, window, stride)
    error: InvalidInputError | None = None

    def pin_memory(self) -> LoadedSample:
        """Page-lock the label and the windows (DataLoader ``pin_memory`` calls this on each item)."""
        if self.label is None:
            return self
        prepared = {key: value if isinstance(value, InvalidInputError) else value.pin_memory()
                    for key, value in self.prepared.items()}
        return LoadedSample(self.sample, self.label.pin_memory(), prepared)


class _Samples(torch.utils.data.Dataset[LoadedSample]):
    """Samples -> `LoadedSample` (decode the image and label, resize, cut windows), in a worker or in-process."""

    def __init__(self, samples: list[Sample], spec: BenchmarkSpec, geometries: dict[tuple[Any, ...], InferenceConfig]
                 ) -> None:
        self.samples, self.spec, self.geometries = samples, spec, geometries

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedSample:
        sample = self.samples[index]
        try:
            image, label = load_sample(sample, self.spec)
        except InvalidInputError as err:
            return LoadedSample(sample, None, {}, err)
        prepared: dict[tuple[Any, ...], PreparedImage | InvalidInputError] = {}
        for key, cfg in self.geometries.items():
            try:  # not the sample's fault to skip: raised in the main process, as embedding it would
                prepared[key] = prepare_image(image, cfg)
            except InvalidInputError as err:
                prepared[key] = err
        return LoadedSample(sample, torch.from_numpy(label), prepared)


def _labels(segmenter: Segmenter, features: list[ImageFeatures]) -> list[torch.Tensor]:
    """Label maps of embedded images with the segmenter's config, all windows of the batch together on a GPU
    (`Segmenter.predict_features_batch`)."""
    if len(features) > 1:
        return [result.labels for result in segmenter.predict_features_batch(features)]
    return [segmenter.predict_features(feats).labels for feats in features]


def default_eval_pipeline(device: torch.device) -> tuple[int, int]:
    """(images per batch, loader workers) for `device`: (1, 0) on a CPU, as before batching (the backbone uses
    every core, and memory stays that of one image); (16, `default_workers`) on a GPU."""
    from talk2dino.data.loading import default_workers

    return (1, 0) if device.type == "cpu" else (16, default_workers(device))


def evaluate_benchmark(segmenter: Segmenter, spec: BenchmarkSpec, config: EvalConfig, *, progress: bool = True,
                       batch_size: int | None = None, workers: int | None = None) -> list[BenchmarkResult]:
    """Evaluate one benchmark for every option combination; returns one result per combination.

    Images are decoded and prepared by `workers` DataLoader processes (the pipeline of ``segment``,
    `talk2dino.data.loading.loader_options`), embedded `batch_size` at a time once per geometry, and counted into
    confusion matrices that stay on the model's device until the end (`ConfusionMatrix.image_counts`); only each
    image's sparse counts come back to the host, for the resume cache. Defaults: `default_eval_pipeline`.
    """
    from tqdm import tqdm

    from talk2dino.data.loading import loader_options

    rank, world = _dist()
    root = _root_of(spec, config)
    samples: list[Sample] = list_samples(spec, root)
    split_images = len(samples)
    if config.limit is not None:
        samples = samples[:config.limit]
    mine = samples[rank::world]
    model = segmenter.model
    device = model.device
    auto_batch, auto_workers = default_eval_pipeline(device)
    batch_size = max(1, batch_size or auto_batch)
    workers = auto_workers if workers is None else workers
    base = model.config.inference
    combos = []
    for options in option_grid(config):
        cfg = inference_config(base, spec, config, options)
        settings = {"inference": cfg.effective_dict(), "model": model.config.name, "profile": model.config.profile,
                    "weights": model.weights_info, "benchmark": spec.name, "limit": config.limit}
        folder = Path(config.out) / f"{spec.name}-{_settings_key(settings)}"
        cache = ProgressCache(folder / f"progress.rank{rank}.jsonl")
        combos.append((options, cfg, settings, folder, cache,
                       ConfusionMatrix(spec.num_classes, ignore_index=spec.ignore_index, device=device)))
        if rank == 0:  # one writer: ranks renaming over each other's temp files could race
            write_json(folder / "settings.json", settings, default=str)
    geometries = {tuple(getattr(c[1], g) for g in _GEOMETRY): c[1] for c in combos}
    # Cached images first (their counts on the host, added at the end); `skipped` keeps the split's order.
    resumed = [ConfusionMatrix(spec.num_classes, ignore_index=spec.ignore_index) for _ in combos]
    skipped: list[list[tuple[int, dict[str, str]]]] = [[] for _ in combos]
    position = {sample.name: k for k, sample in enumerate(mine)}
    todo = []
    for sample in mine:
        for i, c in enumerate(combos):
            entry = c[4].done.get(sample.name)
            if entry is not None and "counts" in entry:
                _apply(resumed[i], entry["counts"])
            elif entry is not None:
                skipped[i].append((position[sample.name], {"name": sample.name, "reason": entry["skipped"]}))
        if any(sample.name not in c[4].done for c in combos):
            todo.append(sample)
    segmenter.set_classes(list(spec.vocabulary))
    loader = torch.utils.data.DataLoader(_Samples(todo, spec, geometries), batch_size=batch_size, shuffle=False,
                                         **loader_options(workers, pin_memory=device.type == "cuda"))
    start = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=spec.tag, unit="img", disable=not progress)
    for batch in loader:
        ready = []
        for item in batch:
            pending = [i for i, c in enumerate(combos) if item.sample.name not in c[4].done]
            if item.error is None:
                ready.append((item, pending))
                continue
            if not config.skip_bad:
                raise item.error
            for i in pending:
                combos[i][4].add({"name": item.sample.name, "skipped": str(item.error)})
                skipped[i].append((position[item.sample.name], {"name": item.sample.name, "reason": str(item.error)}))
        for geometry in geometries:  # embed once per geometry, for every combination that uses it
            users = [i for i, c in enumerate(combos) if tuple(getattr(c[1], g) for g in _GEOMETRY) == geometry]
            images = [(item, pending) for item, pending in ready if set(pending) & set(users)]
            if not images:
                continue
            prepared = []
            for item, _ in images:
                value = item.prepared[geometry]
                if isinstance(value, InvalidInputError):
                    raise value
                prepared.append(value)
            # Only an unreadable sample is skipped (above, with skip_bad); a failure of the model is no sample's
            # fault and stops the run as one InternalError line (issue 12).
            segmenter.config = geometries[geometry]  # the window size the backbone input is resized to
            with internal_error_guard(memory_hint=_EVAL_MEMORY_HINT):
                features = segmenter.embed_images(prepared)
            for i in users:
                _, cfg, _, folder, cache, matrix = combos[i]
                chosen = [k for k, (_, pending) in enumerate(images) if i in pending]
                segmenter.config = cfg
                with internal_error_guard(memory_hint=_EVAL_MEMORY_HINT):
                    preds = _labels(segmenter, [features[k] for k in chosen])
                targets = [label for k in chosen if (label := images[k][0].label) is not None]  # all: ready
                counts = matrix.image_counts(preds, targets)
                matrix.add(counts)
                host = counts.cpu()
                for row, k in enumerate(chosen):
                    name = images[k][0].sample.name
                    if config.save_predictions:  # before the cache line: a resume never revisits a cached image
                        from talk2dino.render import save_label_png

                        out = folder / "predictions" / f"{name}.png"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        save_label_png(out, preds[row].cpu().numpy(), spec.num_classes,
                                       background_index=0 if spec.background else None)
                    cache.add({"name": name, "counts": _sparse_counts(host[row])})
            del features
        for _ in batch:
            fault_point("eval-image")
        bar.update(len(batch))
        if progress:
            bar.set_postfix(mIoU=f"{combos[0][5].results()['mIoU']:.1f}")
    bar.close()
    seconds = time.perf_counter() - start
    results = []
    for i, (options, _cfg, settings, folder, cache, matrix) in enumerate(combos):
        cache.close()
        matrix.to("cpu").merge(resumed[i])  # on the host for gloo, which reduces CPU tensors
        matrix.all_reduce()  # also the point after which no rank writes into `folder` any more
        if rank == 0:  # temp files of a killed earlier run (ours by name); nobody is writing one now
            _remove_stale_temps(folder)
            _remove_stale_temps(folder / "predictions")
        all_skipped = _gather([entry for _, entry in sorted(skipped[i], key=lambda x: x[0])], world)
        results.append(BenchmarkResult(spec, options, settings, matrix, images=len(samples) - len(all_skipped),
                                       skipped=all_skipped, seconds=seconds, split_images=split_images))
    return results


def _gather(items: list[dict[str, str]], world: int) -> list[dict[str, str]]:
    """Concatenate a per-rank list over all ranks (identity in one process)."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return sorted((x for part in parts for x in part), key=lambda x: x["name"])


def describe_weights(config: EvalConfig, model_config: Any) -> str:
    """The model for the log: its name, or, when --backbone/--text-encoder/--projection override parts of it,
    the weights actually used."""
    overrides = [(what, given) for what, given in (("backbone", config.backbone), ("text encoder", config.text_encoder),
                                                  ("psi", config.projection)) if given]
    if not overrides:
        return str(model_config.name)
    effective = {"backbone": model_config.backbone.source, "text encoder": model_config.text.source,
                 "psi": model_config.projection.source}
    parts = ", ".join(f"{what} {effective[what] or given}" for what, given in overrides)
    return f"{parts} (other parts from {model_config.name})" if len(overrides) < 3 else parts


def run_eval(config: EvalConfig, *, progress: bool = True, batch_size: int | None = None,
             workers: int | None = None) -> dict[str, Any]:
    """Evaluate, write ``results.json`` + ``results.md`` (+ sweep plots) under ``config.out``.

    `batch_size` and `workers`: see `evaluate_benchmark` (None: `default_eval_pipeline`).

    Returns:
        ``{"records": [...], "markdown": str}``.

    Raises:
        Talk2DinoError: bad dataset folders, labels or model sources (one line, naming the file).
    """
    from talk2dino.factory import create_model

    config.validate()
    specs = benchmarks_for(config)
    model = create_model(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir,
                         backbone=config.backbone, text_encoder=config.text_encoder, projection=config.projection)
    segmenter = Segmenter(model)
    logger.info("evaluating %s on %s (pamr=%s)", describe_weights(config, model.config), [s.name for s in specs],
                config.inference.pamr)
    all_results: list[BenchmarkResult] = []
    # Log lines go through tqdm.write while a bar is shown, so neither overwrites the other.
    with contextlib.ExitStack() as stack:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())
        for spec in specs:
            all_results.extend(evaluate_benchmark(segmenter, spec, config, progress=progress, batch_size=batch_size,
                                                  workers=workers))
    rank, _ = _dist()
    markdown = markdown_table(all_results, pamr=config.inference.pamr)
    records = [r.record() for r in all_results]
    fault_point("eval-before-results")
    if rank == 0:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        write_results(out, config, all_results, markdown)
    return {"records": records, "markdown": markdown}
