"""Inference benchmark: the fast path against the plain reference path, real-size models, random weights.

Builds DINOv2 ViT-B/14 with 4 registers and the CLIP ViT-B/16 text tower from transformers configs with
random weights (nothing is downloaded), composes a `Talk2DINO`, and times `Segmenter` on synthetic images:
seconds per image, windows per second, per-stage timings and peak memory, for the fast path and the
reference path (``Segmenter(..., reference=True)``) in the same run, and with ``--paths ...,batch`` (added by
default on CUDA) the throughput path: ``embed_images`` + ``predict_features_batch`` over ``--batch-images``
images at once (batched post-processing on a GPU, issue 16; the CPU default streams windows), with the
post-processing stages from one extra ``profile=True`` call.

Every (device, dtype, setting, image size, path) configuration runs in a fresh child process (this
script re-invoked with ``--child``), so that its peak memory is its own: on CPU the peak resident set
size (VmHWM, reset after the model is built) minus the resident size after construction; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated after construction.

Usage::

    python benchmarks/bench_inference.py                      # CPU, plus CUDA when present
    python benchmarks/bench_inference.py --sizes 500x375 --repeats 3 --json bench.json
    python benchmarks/bench_inference.py --settings voc21,voc20-plain --no-gpu
    python benchmarks/bench_inference.py --device cuda --no-gpu --dtype bfloat16 --paths fast,batch \
        --settings voc21,voc20-plain --batch-images 64      # issue 16 target 2: predict_batch windows/s

See benchmarks/README.md for the meaning of every column.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BPE = (
    Path(os.environ.get("TALK2DINO_SHARED", ROOT.parent / "shared")) / "reference" / "clip-bpe"
    / "bpe_simple_vocab_16e6.txt.gz"
)

# The 20 PASCAL VOC classes; with the background channel they make VOC-21.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Same count, different strings: warms the text encoder up without filling the measured vocabulary's cache.
WARMUP_CLASSES: tuple[str, ...] = tuple(f"small {name}" for name in VOC_CLASSES)

# name -> (background channel, PAMR); background cleaning follows the background channel (its default).
SETTINGS: dict[str, tuple[bool, bool]] = {
    "voc21": (True, True),  # 20 names + background, cleaning and PAMR on: the heaviest protocol setting
    "voc20-plain": (False, False),  # 20 names, no background, no cleaning, no PAMR
}
SETTING_LABELS = {"voc21": "VOC-21 bg+clean+PAMR", "voc20-plain": "VOC-20 plain"}
STAGES = ("backbone", "scores", "upsample", "pamr", "stitch", "resize_argmax")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration, run in its own child process."""

    device: str
    dtype: str
    setting: str
    width: int
    height: int
    path: str  # "fast", "reference" or "batch"
    repeats: int
    threads: int | None
    autocast: bool
    bpe: str
    batch_images: int = 0  # images per predict_batch call (path "batch")


# ---------------------------------------------------------------------------------------------- model and data
def build_model(device: torch.device, dtype: torch.dtype, bpe: Path, workdir: Path) -> Any:
    """Real-size Talk2DINO (ViT-B/14-reg + CLIP B/16 text + psi 512->768) with seeded random weights."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    from talk2dino.config import BackboneConfig, ModelConfig, ProjectionConfig, TextConfig
    from talk2dino.models import ClipTextEncoder, DinoV2Backbone, Projection, Talk2DINO
    from talk2dino.testing.clip_vocab import write_clip_tokenizer

    torch.manual_seed(0)
    dino_config = Dinov2WithRegistersConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518,
        num_register_tokens=4, layerscale_value=1.0,
    )
    # transformers 5: the model constructor takes no attn_implementation; the config attribute selects it
    # (this is what from_pretrained(..., attn_implementation="sdpa") does in talk2dino.factory).
    dino_config._attn_implementation = "sdpa"
    dino = Dinov2WithRegistersModel(dino_config)
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512, num_hidden_layers=12,
        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    )
    clip = CLIPTextModelWithProjection(text_config)
    tokenizer = AutoTokenizer.from_pretrained(write_clip_tokenizer(bpe, workdir / "tokenizer"))
    config = ModelConfig(
        name="bench-random-vitb14-reg",
        backbone=BackboneConfig(source="local-dir:random"),
        text=TextConfig(source="local-dir:random"),
        projection=ProjectionConfig(source=None),
    )
    weights_info = {
        "backbone": {"source": "local-dir:random", "path": "random", "revision": None},
        "text": {"source": "local-dir:random", "path": "random", "revision": None},
        "projection": {"source": None, "sha256": "random-seed-0"},
        "dtype": str(dtype).removeprefix("torch."),
    }
    model = Talk2DINO(
        DinoV2Backbone(dino),
        ClipTextEncoder(clip, tokenizer, context_length=config.text.context_length),
        Projection(512, 768),
        config,
        weights_info=weights_info,
    )
    model = model.to(device).eval()
    # As create_model(dtype=...): only the backbone changes dtype; text and psi stay float32.
    model.backbone.model.to(dtype)
    return model


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Deterministic natural-ish ``[height, width, 3]`` uint8 RGB: smooth gradients, soft blobs, edges, noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    image = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        a, b = rng.uniform(-80, 80, size=2)
        fy, fx, phase = rng.uniform(1.0, 4.0), rng.uniform(1.0, 4.0), rng.uniform(0, 2 * np.pi)
        image[..., c] = 128 + a * y + b * x + 30 * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
    for _ in range(8):  # soft coloured blobs ("objects")
        cy, cx = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.05, 0.25)
        colour = rng.uniform(-90, 90, size=3).astype(np.float32)
        mask = np.exp(-(((y - cy) * height / width) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        image += mask[..., None] * colour
    for _ in range(4):  # a few hard-edged rectangles
        y1, x1 = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        y2 = min(height, y1 + int(rng.integers(8, max(9, height // 3))))
        x2 = min(width, x1 + int(rng.integers(8, max(9, width // 3))))
        image[y1:y2, x1:x2] = rng.uniform(0, 255, size=3)
    image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- measurement
class _SdpaCounter(torch.overrides.TorchFunctionMode):
    """Counts calls of ``F.scaled_dot_product_attention`` (to prove which attention a path uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_sdpa_calls(model: Any, *, reference: bool) -> int:
    """SDPA calls of one backbone pass over a tiny 56x56 input (12 = every block fused, 0 = eager)."""
    x = torch.zeros(1, 3, 56, 56, device=model.device)
    with _SdpaCounter() as counter:
        model.encode_image(x, reference=reference)
    return counter.calls


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryProbe:
    """Peak memory above the post-construction baseline, for CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.baseline = 0
        self.model_mb = 0.0

    def start(self) -> None:
        """Take the baseline and reset the peak."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.model_mb = self.baseline / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda.max_memory_allocated"
            return
        rss = _status_kib("VmRSS")
        if rss is not None and _reset_peak_rss() and _status_kib("VmHWM") is not None:
            self.baseline, self.method = rss, "VmHWM"
        else:  # no /proc: ru_maxrss includes construction, so this can under-report
            self.baseline = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss"
        self.model_mb = self.baseline / 1024

    def peak_mb(self) -> float:
        """Peak increase over the baseline since `start`, in MiB."""
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20
        peak = _status_kib("VmHWM") if self.method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, (peak or 0) - self.baseline) / 1024


def run_child(spec: Spec) -> dict[str, Any]:
    """Measure one configuration in this process; returns a JSON-ready record."""
    from talk2dino import InferenceConfig, Segmenter

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    dtype = DTYPES[spec.dtype]
    background, pamr = SETTINGS[spec.setting]
    reference = spec.path == "reference"

    def sync() -> None:
        """Wait for queued CUDA work so that timers see it."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(prefix="t2d-bench-") as tmp:
        t0 = time.perf_counter()
        model = build_model(device, dtype, Path(spec.bpe), Path(tmp))
        build_s = time.perf_counter() - t0
    segmenter = Segmenter(model, InferenceConfig(background=background, pamr=pamr), reference=reference)
    image = synthetic_image(spec.width, spec.height)
    sdpa_calls = count_sdpa_calls(model, reference=reference)
    autocast: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device_type="cuda", dtype=dtype)
        if spec.autocast and device.type == "cuda" and dtype != torch.float32 else contextlib.nullcontext()
    )

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn`; return its output and its wall time in seconds."""
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    if spec.path == "batch":
        return _run_batch_child(spec, segmenter, image, timed, autocast, sdpa_calls, build_s)
    load_before = os.getloadavg()[0]
    probe = MemoryProbe(device)
    probe.start()
    with autocast:
        # Warm-up: a full call with another vocabulary of the same size (warms the text encoder too).
        segmenter.set_classes(list(WARMUP_CLASSES))
        segmenter.set_image(image)
        segmenter.predict()
        # First call with the measured vocabulary: its text encoding is included.
        # Only sizes are kept from the outputs, so that the peak is that of one call (plus the segmenter's
        # own cache of the previous image while the next is embedded), not of results piling up here.
        _, text_first = timed(lambda: segmenter.set_classes(list(VOC_CLASSES)))
        features, embed_first = timed(lambda: segmenter.set_image(image))
        windows, resized = len(features.boxes), list(features.resized_size)
        del features
        result, predict_first = timed(segmenter.predict)
        num_channels = len(result.class_names)
        del result
        steady: list[dict[str, float]] = []
        for _ in range(spec.repeats):
            _, embed_s = timed(lambda: segmenter.set_image(image))
            _, classes_s = timed(lambda: segmenter.set_classes(list(VOC_CLASSES)))  # cached vocabulary
            result, predict_s = timed(segmenter.predict)
            steady.append({"total": embed_s + classes_s + predict_s, "backbone": embed_s, "set_classes": classes_s,
                           "predict": predict_s, **result.timings})
            del result
    peak_mb = probe.peak_mb()
    # Best of the steady runs (timeit's convention): other processes only ever add time. The stages are
    # those of that same run, so they add up to its total.
    best = min(steady, key=lambda run: run["total"])
    seconds = best["total"]
    return {
        **asdict(spec),
        "threads_used": torch.get_num_threads(),
        "windows": windows,
        "resized": resized,
        "channels": num_channels,
        "sdpa_calls_per_pass": sdpa_calls,
        "build_s": build_s,
        "first_call_s": text_first + embed_first + predict_first,
        "text_first_s": text_first,
        "seconds_per_image": seconds,
        "windows_per_second": windows / seconds,
        "median_seconds_per_image": float(statistics.median(run["total"] for run in steady)),
        "stages": {key: best.get(key, 0.0) for key in ("backbone", "set_classes", "predict", *STAGES[1:])},
        "steady_runs": steady,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "peak_mb": peak_mb,
        "baseline_mb": probe.model_mb,
        "memory_method": probe.method,
    }


def _run_batch_child(spec: Spec, segmenter: Any, image: np.ndarray, timed: Callable[[Callable[[], Any]], Any],
                     autocast: contextlib.AbstractContextManager[Any], sdpa_calls: int,
                     build_s: float) -> dict[str, Any]:
    """The "batch" path: ``spec.batch_images`` images per call through ``embed_images`` + ``predict_features_batch``
    (what ``predict_batch`` does), timed as a whole; stages from one extra ``profile=True`` call."""
    images = [image] + [synthetic_image(spec.width, spec.height, seed) for seed in range(1, spec.batch_images)]
    load_before = os.getloadavg()[0]
    probe = MemoryProbe(segmenter.model.device)
    probe.start()
    with autocast:
        segmenter.set_classes(list(WARMUP_CLASSES))  # warm-up: a smaller batch, another vocabulary
        segmenter.predict_batch(images[:2])
        _, text_first = timed(lambda: segmenter.set_classes(list(VOC_CLASSES)))
        steady: list[dict[str, float]] = []
        windows = 0
        for _ in range(spec.repeats):
            embedded, embed_s = timed(lambda: segmenter.embed_images(images))
            windows = sum(len(f.boxes) for f in embedded)
            _, post_s = timed(functools.partial(segmenter.predict_features_batch, embedded))
            steady.append({"total": embed_s + post_s, "backbone": embed_s, "predict": post_s})
            del embedded
        features = segmenter.embed_images(images)
        profiled = segmenter.predict_features_batch(features, profile=True)
        stages = {stage: sum(r.timings.get(stage, 0.0) for r in profiled) for stage in STAGES[1:]}
        num_channels = len(profiled[0].class_names)
        del features, profiled
    peak_mb = probe.peak_mb()
    best = min(steady, key=lambda run: run["total"])
    count = len(images)
    return {
        **asdict(spec),
        "threads_used": torch.get_num_threads(),
        "windows": windows // count,
        "resized": None,
        "channels": num_channels,
        "sdpa_calls_per_pass": sdpa_calls,
        "build_s": build_s,
        "first_call_s": 0.0,
        "text_first_s": text_first,
        "seconds_per_image": best["total"] / count,
        "windows_per_second": windows / best["total"],
        "post_windows_per_second": windows / best["predict"],
        "median_seconds_per_image": float(statistics.median(run["total"] for run in steady)) / count,
        "stages": {"backbone": best["backbone"], "set_classes": 0.0, "predict": best["predict"], **stages},
        "steady_runs": steady,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "peak_mb": peak_mb,
        "baseline_mb": probe.model_mb,
        "memory_method": probe.method,
    }


# ---------------------------------------------------------------------------------------------- parent side
def machine_info() -> dict[str, Any]:
    """Torch/transformers versions, threads, CPU model, RAM and GPU name of this machine."""
    import transformers

    cpu = platform.processor() or platform.machine()
    memory_gib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def spawn(spec: Spec) -> dict[str, Any]:
    """Run `spec` in a fresh interpreter (this script with ``--child``) and read its record."""
    with tempfile.TemporaryDirectory(prefix="t2d-bench-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec)),
               "--child-out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"child {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` (width x height) -> (500, 375)."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 16 or int(h) < 16:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use WIDTHxHEIGHT, e.g. 500x375")
    return int(w), int(h)


def plan(args: argparse.Namespace) -> Iterator[Spec]:
    """Every configuration to run, in table order."""
    devices = [args.device]
    if args.device == "cpu" and not args.no_gpu and torch.cuda.is_available():
        devices.append("cuda")
    for device in devices:
        if args.dtype:
            dtypes = args.dtype
        else:
            dtypes = ["bfloat16", "float16"] if device.startswith("cuda") else ["float32"]
        for dtype in dtypes:
            for setting in args.settings:
                for width, height in args.sizes:
                    paths = args.paths or ["fast", "reference", *(["batch"] if device.startswith("cuda") else [])]
                    for path in paths:
                        repeats = args.ref_repeats if path == "reference" else args.repeats
                        yield Spec(device, dtype, setting, width, height, path, repeats, args.threads,
                                   args.autocast, str(args.bpe), args.batch_images if path == "batch" else 0)


def _config_name(rec: dict[str, Any]) -> str:
    """Table label of a record's device, dtype and setting."""
    extra = "+autocast" if rec["autocast"] and rec["device"].startswith("cuda") else ""
    return f"{rec['device']} {DTYPE_SHORT[rec['dtype']]}{extra}, {SETTING_LABELS[rec['setting']]}"


def _image_name(rec: dict[str, Any]) -> str:
    """Table label of a record's image size (width × height)."""
    return f"{rec['width']}×{rec['height']}"


def _fmt(rec: dict[str, Any] | None, key: str, spec: str) -> str:
    """A table cell: ``rec[key]`` formatted with `spec`, or a dash when the record is missing."""
    return "–" if rec is None else format(rec[key], spec)


def format_tables(records: list[dict[str, Any]]) -> str:
    """The summary table (fast vs reference) and the per-stage table, as Markdown."""
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for rec in records:
        key = (rec["device"], rec["dtype"], rec["autocast"], rec["setting"], rec["width"], rec["height"])
        pairs.setdefault(key, {})[rec["path"]] = rec
    lines = [
        "| config | image | windows | fast s/img | ref s/img | speed-up (ref/fast) | fast windows/s "
        "| fast peak MB | ref peak MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for pair in pairs.values():
        fast, ref = pair.get("fast"), pair.get("reference")
        any_rec = fast or ref
        if any_rec is None:  # a batch-only configuration: in the batch table below
            continue
        speed = f"{ref['seconds_per_image'] / fast['seconds_per_image']:.2f}×" if fast and ref else "–"
        cells = [
            _config_name(any_rec), _image_name(any_rec), str(any_rec["windows"]),
            _fmt(fast, "seconds_per_image", ".3f"), _fmt(ref, "seconds_per_image", ".3f"), speed,
            _fmt(fast, "windows_per_second", ".2f"), _fmt(fast, "peak_mb", ".0f"), _fmt(ref, "peak_mb", ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-stage seconds (the best steady run; backbone = `set_image`, the other stages from "
        "`result.timings`; first call = text encoding + `set_image` + `predict` with a new vocabulary):",
        "",
        "| config | image | path | backbone | scores | upsample | pamr | stitch | resize_argmax "
        "| set_classes (cached) | text (first call) | first call total |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for pair in pairs.values():
        for path in ("fast", "reference"):
            found = pair.get(path)
            if found is None:
                continue
            rec = found
            st = rec["stages"]
            cells = [f"{st.get(s, 0.0):.3f}" if (s != "pamr" or SETTINGS[rec["setting"]][1]) else "–"
                     for s in STAGES]
            lines.append(
                f"| {_config_name(rec)} | {_image_name(rec)} | {path} | {' | '.join(cells)} "
                f"| {st['set_classes'] * 1e3:.2f} ms | {rec['text_first_s']:.3f} | {rec['first_call_s']:.3f} |"
            )
    batches = [rec for rec in records if rec["path"] == "batch"]
    if batches:
        lines += [
            "",
            "Throughput path (`embed_images` + `predict_features_batch` over a batch of images, as `predict_batch`; "
            "batched post-processing on a GPU, windows streamed on CPU; stages summed over the batch, from a "
            "`profile=True` call):",
            "",
            "| config | image | images/batch | windows/s | post-processing windows/s | s/img | backbone s | scores "
            "| upsample | pamr | stitch | resize_argmax | peak MB |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for rec in batches:
            st = rec["stages"]
            cells = [f"{st.get(s, 0.0):.3f}" if (s != "pamr" or SETTINGS[rec["setting"]][1]) else "–"
                     for s in STAGES[1:]]
            lines.append(
                f"| {_config_name(rec)} | {_image_name(rec)} | {rec['batch_images']} | {rec['windows_per_second']:.1f} "
                f"| {rec['post_windows_per_second']:.1f} | {rec['seconds_per_image']:.4f} | {st['backbone']:.3f} "
                f"| {' | '.join(cells)} | {rec['peak_mb']:.0f} |")
    return "\n".join(lines)


def format_machine(info: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """One Markdown paragraph describing the machine and the memory method."""
    threads = sorted({r["threads_used"] for r in records if r["device"] == "cpu"})
    methods = sorted({r["memory_method"] for r in records})
    baseline = {r["device"]: r["baseline_mb"] for r in records if r["path"] != "reference"}
    sdpa = sorted({(r["path"], r["sdpa_calls_per_pass"]) for r in records})
    load = max((max(r["load_average_1min"]) for r in records), default=0.0)
    return (
        f"Machine: {info['cpu']} ({info['cpu_count']} logical CPUs, {info['memory_gib']} GiB RAM), "
        f"GPU: {info['gpu'] or 'none'}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}; CPU threads used: {', '.join(map(str, threads)) or '–'}.\n"
        f"Peak memory: increase over the process after model construction ({', '.join(methods)}); "
        f"baseline after construction: "
        + ", ".join(f"{d} {mb:.0f} MB" for d, mb in baseline.items())
        + ". SDPA calls per backbone pass: " + ", ".join(f"{p} {n}" for p, n in sdpa)
        + f". Highest 1-min load average seen: {load:.2f} (above the thread count means other processes "
        "competed for the CPU)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                   default=[(500, 375), (2048, 1024)],
                   help="comma-separated WIDTHxHEIGHT list (default: 500x375,2048x1024)")
    p.add_argument("--settings", type=lambda s: s.split(","), default=["voc21"],
                   help=f"comma-separated from {sorted(SETTINGS)} (default: voc21)")
    p.add_argument("--repeats", type=int, default=2, help="timed steady-state runs of the fast path (default: 2)")
    p.add_argument("--ref-repeats", type=int, default=1,
                   help="timed steady-state runs of the reference path (default: 1)")
    p.add_argument("--device", default="cpu",
                   help="first device (default: cpu); CUDA is added when present unless --no-gpu")
    p.add_argument("--no-gpu", action="store_true", help="do not add a CUDA run")
    p.add_argument("--dtype", type=lambda s: s.split(","), default=None,
                   help="backbone dtypes for every device (default: float32 on CPU, bfloat16,float16 on CUDA)")
    p.add_argument("--autocast", action="store_true",
                   help="on CUDA also wrap every call in torch.autocast(dtype) (the package itself casts weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--bpe", type=Path, default=DEFAULT_BPE,
                   help="CLIP BPE merge list for the tokenizer (default: ../shared/reference/clip-bpe/...)")
    p.add_argument("--json", type=Path, default=None, help="also write every record and the machine here")
    p.add_argument("--paths", type=lambda s: s.split(","), default=None,
                   help="comma-separated from fast, reference, batch (default: fast,reference, plus batch on CUDA)")
    p.add_argument("--batch-images", type=int, default=32,
                   help="images per predict_batch call on the batch path (default: 32)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        unknown = [s for s in args.settings if s not in SETTINGS] + [d for d in args.dtype or [] if d not in DTYPES]
        if unknown:
            p.error(f"unknown setting or dtype {unknown}; settings {sorted(SETTINGS)}, dtypes {sorted(DTYPES)}")
        if args.repeats < 1 or args.ref_repeats < 1 or args.batch_images < 1:
            p.error("--repeats, --ref-repeats and --batch-images must be >= 1")
        if any(path not in ("fast", "reference", "batch") for path in args.paths or []):
            p.error(f"unknown path in {args.paths}; choose from fast, reference, batch")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available")
        if not args.bpe.is_file():
            p.error(f"CLIP BPE file not found: {args.bpe} (pass --bpe or set TALK2DINO_SHARED)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration in a child process and print the tables."""
    args = parse_args(argv)
    if args.child is not None:
        record = run_child(Spec(**json.loads(args.child)))
        args.child_out.write_text(json.dumps(record, indent=1))
        return 0
    info = machine_info()
    specs = list(plan(args))
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.device} {spec.dtype} {spec.setting} {spec.width}x{spec.height} "
              f"{spec.path} ...", file=sys.stderr, flush=True)
        rec = spawn(spec)
        records.append(rec)
        print(f"    {rec['seconds_per_image']:.3f} s/img, first call {rec['first_call_s']:.3f} s, "
              f"peak +{rec['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    print(format_machine(info, records))
    print()
    print(format_tables(records))
    print(f"\nTotal benchmark time: {total:.0f} s ({len(specs)} child processes).")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "total_s": total, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
