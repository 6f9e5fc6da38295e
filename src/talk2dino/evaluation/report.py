"""Result records and reports of the benchmark runner: per-benchmark records, the paper table, sweep plots.

`BenchmarkResult` is what `talk2dino.evaluation.runner.evaluate_benchmark` returns for one benchmark under
one option combination; `write_results` turns a run's results into ``results.json``, ``results.md`` and the
sweep plots (method.md §6.1 for the published numbers beside ours).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talk2dino.config import EvalConfig
from talk2dino.data.benchmarks import BenchmarkSpec
from talk2dino.errors import Talk2DinoError
from talk2dino.evaluation.metric import ConfusionMatrix
from talk2dino.fileio import atomic_write_bytes, write_json

# The paper's order of columns (method.md §6.1).
SUITE_ORDER = ("voc20", "context59", "coco_stuff", "cityscapes", "ade20k", "voc21", "context60", "coco_object")
# Published mIoU, 2025 table (method.md §6.1), keyed by (backbone size, PAMR).
PAPER_MIOU: dict[tuple[str, bool], dict[str, float]] = {
    ("vitb", False): dict(zip(SUITE_ORDER, (87.1, 39.8, 28.1, 36.6, 21.1, 61.5, 35.1, 41.0), strict=True)),
    ("vitl", False): dict(zip(SUITE_ORDER, (87.1, 39.1, 27.0, 35.8, 21.1, 60.1, 34.2, 37.6), strict=True)),
    ("vitb", True): dict(zip(SUITE_ORDER, (88.5, 42.4, 30.2, 38.1, 22.5, 65.8, 37.7, 45.1), strict=True)),
    ("vitl", True): dict(zip(SUITE_ORDER, (89.8, 42.7, 29.6, 38.4, 22.9, 66.1, 37.3, 42.3), strict=True)),
}
# The swept InferenceConfig fields, in the order of the table's extra columns, with their plot axis labels.
AXIS_LABELS = {"bg_threshold": "background threshold", "clean_lambda": "background-cleaning lambda",
               "short_side": "short side (px)", "window": "window (px)", "stride": "stride (px)"}


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


def _size_key(model_name: str, weights: dict[str, Any]) -> str | None:
    text = (model_name + " " + str(weights.get("backbone", {}).get("source", ""))).lower()
    if "vitl" in text or "large" in text:
        return "vitl"
    if "vitb" in text or "base" in text:
        return "vitb"
    return None


def _varying(results: Sequence[BenchmarkResult]) -> list[str]:
    """The swept options that take more than one value among `results` (the table's extra columns)."""
    return [k for k in AXIS_LABELS if len({r.options.get(k) for r in results}) > 1]


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
    from talk2dino.render import line_chart

    swept = _varying(results)
    if len(swept) != 1 or len(results) < 2:
        return False
    key = swept[0]
    points = [(float(r.options[key]), r.record()["mIoU_exact"]) for r in results]
    points = [(x, y) for x, y in points if y is not None]
    if len(points) < 2:
        return False
    line_chart(points, path, title=f"{results[0].spec.tag}: mIoU vs {key}", x_label=AXIS_LABELS.get(key, key),
               y_label="mIoU (%)")
    return True



def write_results(out: Path, config: EvalConfig, results: Sequence[BenchmarkResult], markdown: str) -> None:
    """Write ``results.json`` (the effective config and one record per result), ``results.md`` and a
    ``sweep-<benchmark>.png`` per benchmark with a 1-D sweep into `out` (created), each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": dataclasses.asdict(config), "records": [r.record() for r in results]}
    write_json(out / "results.json", payload, default=str)
    atomic_write_bytes(out / "results.md", markdown.encode("utf-8"))
    for name in dict.fromkeys(r.spec.name for r in results):
        sweep_plot([r for r in results if r.spec.name == name], out / f"sweep-{name}.png")


def iter_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a ``results.json`` written by `run_eval`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "records" not in data:
        raise Talk2DinoError(f"{path}: not a talk2dino results file")
    yield from data["records"]
