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
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    list_samples,
    load_sample,
)
from talk2dino.errors import InvalidInputError, Talk2DinoError, internal_error_guard
from talk2dino.evaluation.metric import ConfusionMatrix
from talk2dino.fileio import FAULT_ENV, atomic_write_bytes, fault_point, temp_target
from talk2dino.predictor import Segmenter

logger = logging.getLogger(__name__)

# The paper's order of columns (method.md §6.1).
SUITE_ORDER = ("voc20", "context59", "coco_stuff", "cityscapes", "ade20k", "voc21", "context60", "coco_object")
# Published mIoU, 2025 table (method.md §6.1), keyed by (backbone size, PAMR).
PAPER_MIOU: dict[tuple[str, bool], dict[str, float]] = {
    ("vitb", False): dict(zip(SUITE_ORDER, (87.1, 39.8, 28.1, 36.6, 21.1, 61.5, 35.1, 41.0), strict=True)),
    ("vitl", False): dict(zip(SUITE_ORDER, (87.1, 39.1, 27.0, 35.8, 21.1, 60.1, 34.2, 37.6), strict=True)),
    ("vitb", True): dict(zip(SUITE_ORDER, (88.5, 42.4, 30.2, 38.1, 22.5, 65.8, 37.7, 45.1), strict=True)),
    ("vitl", True): dict(zip(SUITE_ORDER, (89.8, 42.7, 29.6, 38.4, 22.9, 66.1, 37.3, 42.3), strict=True)),
}
# EvalConfig sweep field -> the InferenceConfig field it sets.
_SWEEP_FIELDS = {"bg_threshold": "bg_threshold", "bg_clean_lambda": "clean_lambda", "short_side": "short_side",
                 "window": "window", "stride": "stride"}
_SWEPT = tuple(_SWEEP_FIELDS.values())
_GEOMETRY = ("short_side", "window", "stride")
_AXIS_LABELS = {"bg_threshold": "background threshold", "clean_lambda": "background-cleaning lambda",
                "short_side": "short side (px)", "window": "window (px)", "stride": "stride (px)"}
# Evaluation embeds one image at a time; what is left to shrink is the backbone's precision.
_EVAL_MEMORY_HINT = "try --dtype bfloat16, or a device with more free memory"


@dataclass
class BenchmarkResult:
    """One benchmark under one option combination."""

    spec: BenchmarkSpec
    options: dict[str, Any]
    settings: dict[str, Any]
    matrix: ConfusionMatrix
    images: int
    skipped: list[dict[str, str]]
    seconds: float
    split_images: int | None = None  # images the split lists on disk (before --limit); None: unknown

    @property
    def expected_images(self) -> int | None:
        """The full split's size: the published one (method.md §5.1), else what the folder lists."""
        return self.spec.num_images if self.spec.num_images is not None else self.split_images

    @property
    def partial(self) -> bool:
        """Fewer images were evaluated than the full split holds (--limit, skipped images, a short folder)."""
        expected = self.expected_images
        return expected is not None and self.images < expected

    def record(self) -> dict[str, Any]:
        """JSON-ready record: mIoU ×100 to one decimal, per-class IoU, effective settings, timing."""
        res = self.matrix.results()

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 4)

        return {
            "benchmark": self.spec.name,
            "tag": self.spec.tag,
            "mIoU": None if math.isnan(res["mIoU"]) else round(res["mIoU"], 1),
            "mIoU_exact": clean(res["mIoU"]),
            "mAcc": clean(res["mAcc"]),
            "aAcc": clean(res["aAcc"]),
            "per_class_IoU": {n: clean(v) for n, v in zip(self.spec.class_names, res["IoU"], strict=True)},
            "options": self.options,
            "settings": self.settings,
            "images": self.images,
            "split_images": self.expected_images,
            "partial": self.partial,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images / self.seconds, 3) if self.seconds > 0 else None,
        }


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return rank, world


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
    axes = {field: list(getattr(config, name)) for name, field in _SWEEP_FIELDS.items() if getattr(config, name)}
    if not axes:
        return [{}]
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def inference_config(base: InferenceConfig, spec: BenchmarkSpec, config: EvalConfig,
                     options: dict[str, Any]) -> InferenceConfig:
    """The benchmark protocol (method.md §5.1) on top of the model's defaults, plus swept options."""
    changes: dict[str, Any] = {
        "background": spec.background,
        "bg_clean": spec.bg_clean if config.bg_clean is None else config.bg_clean,
        "pamr": config.pamr,
    }
    changes.update(options)
    result = dataclasses.replace(base, **changes)
    result.validate()
    return result


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Cache:
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
        cache = _Cache(folder / f"progress.rank{rank}.jsonl")
        combos.append((options, cfg, settings, folder, cache, ConfusionMatrix(spec.num_classes,
                                                                               ignore_index=spec.ignore_index)))
        if rank == 0:  # one writer: ranks renaming over each other's temp files could race
            atomic_write_bytes(folder / "settings.json", json.dumps(settings, indent=2, default=str).encode())
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
                from talk2dino.outputs import save_label_png

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


def _size_key(model_name: str, weights: dict[str, Any]) -> str | None:
    text = (model_name + " " + str(weights.get("backbone", {}).get("source", ""))).lower()
    if "vitl" in text or "large" in text:
        return "vitl"
    if "vitb" in text or "base" in text:
        return "vitb"
    return None


def _varying(results: Sequence[BenchmarkResult]) -> list[str]:
    """The swept options that take more than one value among `results` (the table's extra columns)."""
    return [k for k in _SWEPT if len({r.options.get(k) for r in results}) > 1]


def markdown_table(results: Sequence[BenchmarkResult], *, pamr: bool) -> str:
    """Ours beside the paper's published numbers (method.md §6.1, marked as such)."""
    if not results:
        return ""
    size = _size_key(str(results[0].settings["model"]), results[0].settings["weights"])
    paper = PAPER_MIOU.get((size, pamr), {}) if size else {}
    swept = _varying(results)
    header = ["benchmark", *swept, "mIoU (ours)", "mIoU (paper)", "images", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        rec = r.record()
        published = paper.get(r.spec.name)
        row = [r.spec.tag, *[str(r.options.get(k, "")) for k in swept],
               "n/a" if rec["mIoU"] is None else f"{rec['mIoU']:.1f}",
               f"{published:.1f}" if published is not None else "—", _images_cell(r),
               str(rec["images_per_s"])]
        lines.append("| " + " | ".join(row) + " |")
    if len(results) > 1 and not swept:
        ours = [r.record()["mIoU"] for r in results]
        published_all = [paper.get(r.spec.name) for r in results]
        if all(v is not None for v in ours):
            avg = sum(float(v) for v in ours) / len(ours)
            known = [p for p in published_all if p is not None]
            pavg = f"{sum(known) / len(known):.1f}" if len(known) == len(published_all) else "—"
            lines.append(f"| Avg | {avg:.1f} | {pavg} | | |")
    partial = [r for r in results if r.partial]
    if partial:
        lines.append("")
        for r in _unique_by_benchmark(partial):
            lines.append(f"**Partial split:** {r.spec.tag} was evaluated on {r.images} of {r.expected_images} "
                         f"images{_partial_reason(r)}; its mIoU is not comparable with the paper's.")
    lines.extend(_per_class_tables(results, swept))
    return "\n".join(lines) + "\n"


def _images_cell(result: BenchmarkResult) -> str:
    return f"{result.images} of {result.expected_images}" if result.partial else str(result.images)


def _unique_by_benchmark(results: Sequence[BenchmarkResult]) -> list[BenchmarkResult]:
    seen: dict[str, BenchmarkResult] = {}
    for r in results:
        seen.setdefault(r.spec.name, r)
    return list(seen.values())


def _partial_reason(result: BenchmarkResult) -> str:
    reasons = []
    limit = result.settings.get("limit")
    if limit is not None and result.split_images is not None and limit < result.split_images:
        reasons.append(f"--limit {limit}")
    if result.skipped:
        reasons.append(f"{len(result.skipped)} skipped")
    if result.split_images is not None and result.spec.num_images is not None \
            and result.split_images < result.spec.num_images:
        reasons.append(f"the split on disk lists {result.split_images}")
    return f" ({', '.join(reasons)})" if reasons else ""


def _per_class_tables(results: Sequence[BenchmarkResult], swept: list[str]) -> list[str]:
    """One per-class IoU table per benchmark: a row per class, a column per option combination."""
    lines: list[str] = []
    for name in dict.fromkeys(r.spec.name for r in results):
        group = [r for r in results if r.spec.name == name]
        columns = [", ".join(f"{k}={r.options.get(k)}" for k in swept) or "IoU" for r in group]
        lines += ["", f"#### {group[0].spec.tag}: per-class IoU", "",
                  "| class | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        per_class = [r.record()["per_class_IoU"] for r in group]
        for class_name in group[0].spec.class_names:
            cells = ["n/a" if values[class_name] is None else f"{values[class_name]:.1f}" for values in per_class]
            lines.append(f"| {class_name} | " + " | ".join(cells) + " |")
    return lines


def sweep_plot(results: Sequence[BenchmarkResult], path: Path) -> bool:
    """A line plot of mIoU against the one swept option (PNG); False when the sweep is not 1-D."""
    from talk2dino.plots import line_chart

    swept = _varying(results)
    if len(swept) != 1 or len(results) < 2:
        return False
    key = swept[0]
    points = [(float(r.options[key]), r.record()["mIoU_exact"]) for r in results]
    points = [(x, y) for x, y in points if y is not None]
    if len(points) < 2:
        return False
    line_chart(points, path, title=f"{results[0].spec.tag}: mIoU vs {key}", x_label=_AXIS_LABELS.get(key, key),
               y_label="mIoU (%)")
    return True


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
    from talk2dino.registry import create_model

    specs = benchmarks_for(config)
    model = create_model(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir,
                         backbone=config.backbone, text_encoder=config.text_encoder, projection=config.projection)
    segmenter = Segmenter(model)
    logger.info("evaluating %s on %s (pamr=%s)", describe_weights(config, model.config), [s.name for s in specs],
                config.pamr)
    all_results: list[BenchmarkResult] = []
    # Log lines go through tqdm.write while a bar is shown, so neither overwrites the other.
    with contextlib.ExitStack() as stack:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())
        for spec in specs:
            all_results.extend(evaluate_benchmark(segmenter, spec, config, progress=progress))
    rank, _ = _dist()
    markdown = markdown_table(all_results, pamr=config.pamr)
    records = [r.record() for r in all_results]
    fault_point("eval-before-results")
    if rank == 0:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        payload = {"config": dataclasses.asdict(config), "records": records}
        atomic_write_bytes(out / "results.json", json.dumps(payload, indent=2, default=str).encode("utf-8"))
        atomic_write_bytes(out / "results.md", markdown.encode("utf-8"))
        for spec in specs:
            sweep_plot([r for r in all_results if r.spec.name == spec.name], out / f"sweep-{spec.name}.png")
    return {"records": records, "markdown": markdown}


def iter_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a ``results.json`` written by `run_eval`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "records" not in data:
        raise Talk2DinoError(f"{path}: not a talk2dino results file")
    yield from data["records"]
