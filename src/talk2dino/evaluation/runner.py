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


def _sparse_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int) -> list[list[int]]:
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore, device=pred.device)
    matrix.update(pred, target)
    nz = torch.nonzero(matrix.state)
    return [[int(g), int(p), int(matrix.state[g, p])] for g, p in nz.tolist()]


def _apply(matrix: ConfusionMatrix, counts: list[list[int]]) -> None:
    for g, p, n in counts:
        matrix.state[g, p] += n


def evaluate_benchmark(segmenter: Segmenter, spec: BenchmarkSpec, config: EvalConfig, *,
                       progress: bool = True) -> list[BenchmarkResult]:
    """Evaluate one benchmark for every option combination; returns one result per combination."""
    from tqdm import tqdm

    rank, world = _dist()
    root = _root_of(spec, config)
    samples: list[Sample] = list_samples(spec, root)
    split_images = len(samples)
    if config.limit is not None:
        samples = samples[:config.limit]
    mine = samples[rank::world]
    model = segmenter.model
    grid = option_grid(config)
    base = model.config.inference
    combos = []
    for options in grid:
        cfg = inference_config(base, spec, config, options)
        settings = {"inference": cfg.effective_dict(), "model": model.config.name, "profile": model.config.profile,
                    "weights": model.weights_info, "benchmark": spec.name, "limit": config.limit}
        key = _settings_key(settings)
        folder = Path(config.out) / f"{spec.name}-{key}"
        cache = ProgressCache(folder / f"progress.rank{rank}.jsonl")
        combos.append((options, cfg, settings, folder, cache, ConfusionMatrix(spec.num_classes,
                                                                               ignore_index=spec.ignore_index)))
        if rank == 0:  # one writer: ranks renaming over each other's temp files could race
            write_json(folder / "settings.json", settings, default=str)
    skipped: list[list[dict[str, str]]] = [[] for _ in combos]
    segmenter.set_classes(list(spec.vocabulary))
    start = time.perf_counter()
    bar = tqdm(mine, desc=spec.tag, unit="img", disable=not progress)
    for sample in bar:
        pending = [i for i, c in enumerate(combos) if sample.name not in c[4].done]
        for i, c in enumerate(combos):
            entry = c[4].done.get(sample.name)
            if entry is not None and "counts" in entry:
                _apply(c[5], entry["counts"])
            elif entry is not None:
                skipped[i].append({"name": sample.name, "reason": entry["skipped"]})
        if not pending:
            continue
        try:
            image, label = load_sample(sample, spec)
        except InvalidInputError as err:
            if not config.skip_bad:
                raise
            for i in pending:
                combos[i][4].add({"name": sample.name, "skipped": str(err)})
                skipped[i].append({"name": sample.name, "reason": str(err)})
            continue
        target = torch.from_numpy(label)
        features_by_geometry: dict[tuple[Any, ...], Any] = {}
        for i in pending:
            options, cfg, _, folder, cache, matrix = combos[i]
            geometry = tuple(getattr(cfg, g) for g in _GEOMETRY)
            segmenter.config = cfg
            # Only an unreadable sample is skipped (above, with skip_bad); a failure of the model is no sample's
            # fault and stops the run as one InternalError line (issue 12).
            with internal_error_guard(memory_hint=_EVAL_MEMORY_HINT):
                if geometry not in features_by_geometry:
                    features_by_geometry = {geometry: segmenter.embed_images([image])[0]}
                result = segmenter.predict_features(features_by_geometry[geometry])
            pred = result.labels
            counts = _sparse_counts(pred, target, spec.num_classes, spec.ignore_index)
            if config.save_predictions:  # before the cache line: a resume never revisits a cached image
                from talk2dino.render import save_label_png

                out = folder / "predictions" / f"{sample.name}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                save_label_png(out, pred.numpy(), spec.num_classes, background_index=0 if spec.background else None)
            _apply(matrix, counts)
            cache.add({"name": sample.name, "counts": counts})
        fault_point("eval-image")
        if progress:
            bar.set_postfix(mIoU=f"{combos[0][5].results()['mIoU']:.1f}")
    seconds = time.perf_counter() - start
    results = []
    for i, (options, _cfg, settings, folder, cache, matrix) in enumerate(combos):
        cache.close()
        matrix.all_reduce()  # also the point after which no rank writes into `folder` any more
        if rank == 0:  # temp files of a killed earlier run (ours by name); nobody is writing one now
            _remove_stale_temps(folder)
            _remove_stale_temps(folder / "predictions")
        all_skipped = _gather(skipped[i], world)
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


def run_eval(config: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate, write ``results.json`` + ``results.md`` (+ sweep plots) under ``config.out``.

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
            all_results.extend(evaluate_benchmark(segmenter, spec, config, progress=progress))
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
