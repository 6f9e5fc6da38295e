"""PAMR alone (method.md §4.7): seconds and windows/s of each implementation, and its share of a backbone forward.

Workload: ``--windows`` windows of ``--size``² pixels, ``--classes`` score channels (21: VOC-20 + background),
10 iterations, dilations (1, 2, 4, 8, 12, 24), random guide and scores (the cost does not depend on values).

- CPU: the torch path one call per window (as ``Segmenter.predict_features`` runs it) and one batched call,
  and the native kernel (``ops/pamr_native.c``, built at first use; left out where it cannot be built) one
  call per window, with each one's speed-up over the torch path; then the issue-6 ratio "PAMR of 21 channels on
  two 448² windows ÷ one bare forward of one 448² window" (target ≤ 15 %) against a real-size DINOv2
  ViT-B/14-reg (random weights, SDPA, nothing downloaded) when ``--share`` is given.
- CUDA: the fused Triton kernels (``pamr``'s default on CUDA) against the torch path (``fused=False``) for each
  batch size in ``--batches``, timed with CUDA events (no host synchronisation inside the timed region), with
  the peak memory of each and the largest difference between the two (≤ 1e-5 expected).

Usage::

    python benchmarks/bench_pamr.py --share                      # CPU, ~30 s on 2 cores
    python benchmarks/bench_pamr.py --device cuda --batches 2,16,64 --json pamr_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from talk2dino.ops.pamr import fused_pamr_available, pamr
from talk2dino.ops.pamr_native import native_pamr, native_pamr_status

DILATIONS = (1, 2, 4, 8, 12, 24)
ITERATIONS = 10


def _inputs(windows: int, classes: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(windows, 3, size, size, generator=generator) * 255).round()
    masks = 0.27 + 0.46 * torch.rand(windows, classes, size, size, generator=generator)
    return image.to(device), masks.to(device)


def _cuda_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median of `repeats` calls timed with CUDA events, after one warm-up (compilation, caches)."""
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1000 for start, end in events)


def _bare_forward(size: int) -> Callable[[], Any]:
    """One bare transformers DINOv2 ViT-B/14-reg forward (SDPA, random weights) of one window, on CPU."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                       patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0)
    config._attn_implementation = "sdpa"
    model = Dinov2WithRegistersModel(config).eval()
    pixels = torch.randn(1, 3, size, size)
    return lambda: model(pixels)


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    image, masks = _inputs(args.windows, args.classes, args.size, torch.device("cpu"))
    kernel = native_pamr()  # None where it cannot be built (logged): its row is then left out

    def per_window(native: bool) -> Callable[[], list[torch.Tensor]]:  # as the predictor runs it
        return lambda: [pamr(image[i : i + 1], masks[i : i + 1], iterations=ITERATIONS, dilations=DILATIONS,
                             native=native) for i in range(args.windows)]

    paths: dict[str, Callable[[], Any] | None] = {
        "torch": per_window(False),
        "torch_batched": lambda: pamr(image, masks, iterations=ITERATIONS, dilations=DILATIONS, native=False),
        "native": per_window(True) if kernel is not None else None,
        "forward": _bare_forward(args.size) if args.share else None,
    }
    timings: dict[str, list[float]] = {name: [] for name, fn in paths.items() if fn is not None}
    with torch.inference_mode():
        # Interleaved repetition by repetition, best of each: on a shared machine other processes only ever
        # add time, and the ratios compare figures taken under the same conditions.
        for repetition in range(args.repeats + 1):
            for name, fn in paths.items():
                if fn is None:
                    continue
                start = time.perf_counter()
                fn()
                if repetition:  # the first round warms up
                    timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    record: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "windows": args.windows,
                              "classes": args.classes, "size": args.size, "timings_s": timings,
                              "native": native_pamr_status(), "load_average": os.getloadavg()}
    print(f"CPU PAMR, {args.windows} windows {args.size}², {args.classes} channels, {ITERATIONS} iterations, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; native kernel: "
          f"{record['native']}")
    header = f"{'path':<34}{'seconds':>9}{'windows/s':>11}{'vs torch':>10}"
    if "forward" in best:
        header += f"{'÷ forward':>11}"
    print(header)
    labels = {"torch": "torch, one call per window", "torch_batched": "torch, one batched call",
              "native": "native kernel, one call per window"}
    for name, label in labels.items():
        if name not in best:
            continue
        line = (f"{label:<34}{best[name]:>9.3f}{args.windows / best[name]:>11.2f}"
                f"{best['torch'] / best[name]:>9.2f}×")
        if "forward" in best:
            record[f"share_{name}"] = best[name] / best["forward"]
            line += f"{100 * record[f'share_{name}']:>10.1f}%"
        print(line)
    if "forward" in best:
        print(f"bare ViT-B/14-reg forward of one window: {best['forward']:.3f} s (÷ forward: issue 6 target ≤ 15 %)")
    return record


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    if not fused_pamr_available():
        raise SystemExit("triton is not importable: the fused kernels cannot run")
    device = torch.device("cuda")
    rows = []
    for batch in args.batches:
        image, masks = _inputs(batch, args.classes, args.size, device)
        row: dict[str, Any] = {"windows": batch}
        outputs = {}
        for name, fused in (("fused", True), ("torch", False)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                call = functools.partial(pamr, image, masks, iterations=ITERATIONS, dilations=DILATIONS, fused=fused)
                seconds = _cuda_seconds(call, args.repeats)
                outputs[name] = pamr(image[:1], masks[:1], iterations=ITERATIONS, dilations=DILATIONS, fused=fused)
            row[f"{name}_s"] = seconds
            row[f"{name}_windows_per_s"] = batch / seconds
            row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["max_abs_difference"] = (outputs["fused"] - outputs["torch"]).abs().max().item()
        rows.append(row)
        print(f"{batch:4d} windows: fused {row['fused_windows_per_s']:9.1f} windows/s "
              f"({row['fused_peak_mib']:.0f} MiB), torch {row['torch_windows_per_s']:8.1f} windows/s "
              f"({row['torch_peak_mib']:.0f} MiB), max |fused − torch| {row['max_abs_difference']:.2e}")
    return {"device": torch.cuda.get_device_name(0), "classes": args.classes, "size": args.size, "rows": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--windows", type=int, default=2, help="CPU: windows per image (default 2: 500×375)")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[2, 16, 64],
                        help="CUDA: comma-separated window counts")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--share", action="store_true", help="CPU: also time one bare ViT-B/14-reg forward")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    record = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    record["torch"] = torch.__version__
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
