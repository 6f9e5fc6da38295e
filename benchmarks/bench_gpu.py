"""GPU benchmark (issue 16, target 6): one run, one table, from the bare backbone to the folder CLI.

Rows, in one process, on one model (DINOv2 ViT-B/14 with 4 registers + CLIP ViT-B/16 text + psi, seeded random
weights saved to a temporary folder, nothing downloaded; ``--small``: a 2-layer, 64-wide model for a CPU smoke
test):

1. bare transformers ``Dinov2WithRegistersModel`` (SDPA attention) forward, windows/s, at ``--batch`` windows of
   448 x 448 (bf16 on CUDA, fp32 on CPU): the reference for issue 16's target 1;
2. our backbone (``Talk2DINO.encode_image``, the fast path) on the same input;
3. peak device memory of our backbone per batch size (``torch.cuda.max_memory_allocated`` above the memory
   allocated before the call);
4. ``Segmenter.predict_batch`` windows/s over ``--photos`` synthetic 500 x 375 photos (2 windows each), VOC-21
   (20 names + background, cleaning), with and without PAMR;
5. ``talk2dino segment`` over ``--images`` synthetic JPEGs (label PNG + overlay + legend + JSON), img/s over the
   steady part of the run (first to last JSON written, so model loading and process start-up are left out)
   and over its whole wall time.

Timing: a warm-up call, then ``--repeats`` calls between two device synchronisations, wall clock (CUDA events
agree when the device is the bottleneck; both are printed in the JSON). GPU busy % is the share of the wall time
during which at least one kernel ran: from NVML (``pynvml``: utilization.gpu sampled every 20 ms) when it is
importable, else from the CUDA kernels recorded by ``torch.profiler`` (CUPTI), merged into a union of intervals;
for the CLI row the profiler's clock is tied to the wall clock by a marker kernel, so the steady window can be
cut out of the trace. On CPU the GPU columns read n/a.

Usage::

    python benchmarks/bench_gpu.py --device cuda                 # the issue's sizes, bf16
    python benchmarks/bench_gpu.py --device cpu --small          # smoke test, under a minute
    python benchmarks/bench_gpu.py --device cuda --json gpu.json --bpe /path/to/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_BPE, VOC_CLASSES, synthetic_image  # noqa: E402

logger = logging.getLogger("bench_gpu")


@dataclass(frozen=True)
class Sizes:
    """Model and workload sizes of one run."""

    hidden: int  # DINOv2 width (768: ViT-B)
    layers: int
    heads: int
    text_hidden: int  # CLIP text width (512: B/16)
    text_layers: int
    window: int  # backbone input side, and the inference window
    batch: int  # windows per backbone call
    memory_batches: tuple[int, ...]
    photos: int  # images per predict_batch call
    photo: tuple[int, int]  # (width, height) of the synthetic photos
    images: int  # JPEGs for the folder CLI
    cli_batch: int  # --batch-size of the CLI


REAL = Sizes(768, 12, 12, 512, 12, 448, 128, (16, 32, 64, 128), 64, (500, 375), 256, 32)
SMALL = Sizes(64, 2, 4, 64, 2, 112, 4, (1, 2, 4), 2, (150, 112), 6, 2)


def save_sources(folder: Path, sizes: Sizes, bpe: Path) -> dict[str, str]:
    """Random-weight backbone, text tower (with the real CLIP tokenizer) and psi on disk; their CLI sources."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    from talk2dino.testing.clip_vocab import write_clip_tokenizer

    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=sizes.hidden, num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, mlp_ratio=4,
        patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0)).save_pretrained(folder / "dino")
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.text_hidden, intermediate_size=4 * sizes.text_hidden, projection_dim=512,
        num_hidden_layers=sizes.text_layers, num_attention_heads=max(1, sizes.text_hidden // 64),
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).save_pretrained(folder / "clip")
    write_clip_tokenizer(bpe, folder / "clip")
    generator = torch.Generator().manual_seed(0)
    psi = {"linear_layer.weight": torch.randn(sizes.hidden, 512, generator=generator) * 0.05,
           "linear_layer.bias": torch.zeros(sizes.hidden),
           "hidden_layers.0.weight": torch.randn(sizes.hidden, sizes.hidden, generator=generator) * 0.05,
           "hidden_layers.0.bias": torch.zeros(sizes.hidden)}
    torch.save(psi, folder / "psi.pth")
    return {"backbone": f"local-dir:{folder / 'dino'}", "text_encoder": f"local-dir:{folder / 'clip'}",
            "projection": str(folder / "psi.pth")}


# ---------------------------------------------------------------------------------------------- GPU busy
def _nvml_handle(device: torch.device) -> Any:
    """An NVML device handle, or None where pynvml is missing or NVML does not start."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # ImportError, or NVML missing / not permitted: fall back to the profiler
        return None


class NvmlSampler:
    """utilization.gpu every 20 ms on a thread, with wall-clock stamps, so any window can be averaged."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.samples, self._stop = handle, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import pynvml

        while not self._stop.wait(0.02):
            self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def __enter__(self) -> NvmlSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, start: float, end: float) -> float | None:
        inside = [value for stamp, value in self.samples if start <= stamp <= end]
        return sum(inside) / len(inside) / 100 if inside else None


def kernel_union_us(prof: Any, offset_us: float = 0.0, window: tuple[float, float] | None = None) -> float:
    """Microseconds during which at least one CUDA kernel ran (overlapping kernels counted once), optionally
    only inside `window` (wall-clock microseconds, mapped with `offset_us`)."""
    from torch.autograd import DeviceType

    # Kernels only: copies and memsets run on the copy engines, which NVML's utilization.gpu leaves out too.
    spans = sorted((e.time_range.start + offset_us, e.time_range.end + offset_us) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))
    if window is not None:
        spans = [(max(s, window[0]), min(e, window[1])) for s, e in spans if e > window[0] and s < window[1]]
    total, current_start, current_end = 0.0, None, None
    for start, end in spans:
        if current_end is None or start > current_end:
            total += 0.0 if current_end is None else current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    return total + (0.0 if current_end is None else current_end - current_start)


def profile_call(fn: Callable[[], Any], device: torch.device) -> float:
    """GPU busy fraction of one call of `fn`, from the profiler's kernel records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    return kernel_union_us(prof) / (wall * 1e6)


# ---------------------------------------------------------------------------------------------- rows
def timed(fn: Callable[[], Any], device: torch.device, repeats: int, work: int, nvml: Any) -> dict[str, Any]:
    """Warm up, then `repeats` calls: work units per second (wall and CUDA events), busy %, peak memory."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
    sampler = NvmlSampler(nvml) if nvml is not None else None
    wall0 = time.time()
    if sampler is not None:
        sampler.__enter__()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler.__exit__()
    row: dict[str, Any] = {"rate": work * repeats / wall, "seconds_per_call": wall / repeats}
    if cuda:
        events[1].record()
        events[1].synchronize()
        row["event_seconds_per_call"] = events[0].elapsed_time(events[1]) / 1000 / repeats
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        row["busy"] = sampler.busy(wall0, wall0 + wall) if sampler is not None else profile_call(fn, device)
    return row


def run_cli(argv: list[str], out: Path, device: torch.device, nvml: Any) -> dict[str, Any]:
    """The folder CLI in this process: exit code, whole and steady img/s, GPU busy over the steady window."""
    from talk2dino.cli import main

    cuda, prof, offset_us = device.type == "cuda", None, 0.0
    sampler = NvmlSampler(nvml) if cuda and nvml is not None else None
    if cuda and sampler is None:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.__enter__()
        torch.cuda.synchronize(device)
        marker_wall = time.time() * 1e6
        torch.cuda._sleep(1000)  # a marker kernel: its trace time is tied to `marker_wall`
        torch.cuda.synchronize(device)
    if sampler is not None:
        sampler.__enter__()
    start = time.time()
    try:
        code = main(argv)
    finally:
        wall = time.time() - start
        if sampler is not None:
            sampler.__exit__()
        if prof is not None:
            prof.__exit__(None, None, None)
    stamps = sorted(p.stat().st_mtime for p in out.glob("*.json"))
    row: dict[str, Any] = {"exit": code, "images": len(stamps), "rate_whole": len(stamps) / wall, "wall_s": wall}
    steady = (stamps[0], stamps[-1]) if len(stamps) > 2 and stamps[-1] > stamps[0] else None
    if steady is not None:
        row["rate"] = (len(stamps) - 1) / (steady[1] - steady[0])
    if cuda and steady is not None:
        if sampler is not None:
            row["busy"] = sampler.busy(*steady)
        elif prof is not None:
            marks = [e for e in prof.events() if "spin_kernel" in e.name]
            if marks:
                offset_us = marker_wall - marks[0].time_range.start
                window = (steady[0] * 1e6, steady[1] * 1e6)
                row["busy"] = kernel_union_us(prof, offset_us, window) / (window[1] - window[0])
    return row


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model and workload: a CPU smoke test")
    parser.add_argument("--dtype", default=None, help="backbone dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5; --small 2)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the folder CLI row")
    parser.add_argument("--cli-args", default="", help="extra flags for the CLI row, e.g. '--writers 12 --workers 3'")
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE, help="CLIP BPE vocabulary (bpe_simple_vocab_16e6)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    sizes = SMALL if args.small else REAL
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (2 if args.small else 5)
    nvml = _nvml_handle(device) if device.type == "cuda" else None
    busy_method = "n/a" if device.type != "cuda" else ("NVML utilization.gpu" if nvml else "CUPTI kernel union")

    from transformers import Dinov2WithRegistersModel

    from talk2dino import InferenceConfig, Segmenter, create_model

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="t2d-bench-gpu-") as tmp_name, torch.inference_mode():
        tmp = Path(tmp_name)
        sources = save_sources(tmp, sizes, args.bpe)
        bare = Dinov2WithRegistersModel.from_pretrained(sources["backbone"].removeprefix("local-dir:"),
                                                        attn_implementation="sdpa", dtype=dtype).to(device).eval()
        x = torch.randn(sizes.batch, 3, sizes.window, sizes.window, device=device)
        x_bare = x.to(dtype)
        rows.append({"row": "bare transformers Dinov2WithRegistersModel (SDPA)", "unit": "windows/s",
                     **timed(lambda: bare(pixel_values=x_bare), device, repeats, sizes.batch, nvml)})
        bare = None  # its weights freed before ours load
        model = create_model(None, device=device, dtype=dtype, **sources)
        rows.append({"row": "our backbone (encode_image)", "unit": "windows/s",
                     **timed(lambda: model.encode_image(x), device, repeats, sizes.batch, nvml)})
        if device.type == "cuda":
            for batch in sizes.memory_batches:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                model.encode_image(torch.randn(batch, 3, sizes.window, sizes.window, device=device))
                rows.append({"row": f"backbone peak memory, batch {batch}", "unit": "MiB",
                             "rate": (torch.cuda.max_memory_allocated(device) - base) / 2**20})
        photos = [synthetic_image(*sizes.photo, seed=i) for i in range(sizes.photos)]
        for pamr in (True, False):
            segmenter = Segmenter(model, InferenceConfig(background=True, pamr=pamr, short_side=sizes.window,
                                                         window=sizes.window, stride=sizes.window // 2,
                                                         window_batch_size=sizes.batch))
            segmenter.set_classes(list(VOC_CLASSES))
            windows = sum(len(segmenter.prepare(p).boxes) for p in photos)
            rows.append({"row": f"predict_batch, {len(photos)} photos {sizes.photo[0]}x{sizes.photo[1]}, VOC-21, "
                                f"{'PAMR' if pamr else 'no PAMR'} ({windows} windows)", "unit": "windows/s",
                         **timed(lambda s=segmenter: s.predict_batch(photos), device, repeats, windows, nvml)})
        model = segmenter = None  # freed before the CLI loads its own
        folder, out = tmp / "jpgs", tmp / "out"
        folder.mkdir()
        from PIL import Image

        count = args.images or sizes.images
        for i in range(count):
            Image.fromarray(photos[i % len(photos)]).save(folder / f"p{i:05d}.jpg", quality=90)
        argv_cli = ["-q", "segment", str(folder), "--labels", ", ".join(VOC_CLASSES), "--background", "--out",
                    str(out), "--backbone", sources["backbone"], "--text-encoder", sources["text_encoder"],
                    "--projection", sources["projection"], "--device", str(device), "--dtype", dtype_name,
                    "--batch-size", str(sizes.cli_batch), "--window-batch-size", str(sizes.batch), "--no-progress",
                    *args.cli_args.split()]
        rows.append({"row": f"talk2dino segment, {count} JPEGs, labels + overlay + JSON, VOC-21 + PAMR",
                     "unit": "img/s", **run_cli(argv_cli, out, device, nvml)})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"\n{name}, torch {torch.__version__}, {dtype_name}, {'small' if args.small else 'real'} sizes, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; GPU busy: {busy_method}\n")
    print("| measurement | rate | unit | GPU busy | peak GPU memory |\n|---|--:|---|--:|--:|")
    for row in rows:
        busy = f"{row['busy'] * 100:.0f} %" if row.get("busy") is not None else "n/a"
        peak = f"{row['peak_mib']:.0f} MiB" if "peak_mib" in row else "n/a"
        rate = f"{row['rate']:,.1f}" if "rate" in row else "n/a"
        extra = f" (whole run {row['rate_whole']:.1f}, exit {row['exit']})" if "rate_whole" in row else ""
        print(f"| {row['row']}{extra} | {rate} | {row['unit']} | {busy} | {peak} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "dtype": dtype_name, "small": args.small,
                                         "busy_method": busy_method, "rows": rows}, indent=1))
    return 0 if all(row.get("exit", 0) == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
