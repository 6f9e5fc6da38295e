"""PAMR alone, idle and while another process keeps the CPUs busy (issue 13): a table of seconds and ratios.

Workload: the PAMR of a 500x375 image as ``Segmenter.predict`` runs it: two 448x448 windows, 20 score
channels, 10 iterations, dilations (1, 2, 4, 8, 12, 24), one ``pamr`` call per window.

Variants, measured in this one process and interleaved repetition by repetition:

- ``serial-affinities`` (the default ``pamr``): the ~1,200 small element-wise ops of the affinities on
  one thread, the 10 propagation steps with torch's thread count;
- ``all-threaded`` (``pamr`` before issue 13): every op with torch's thread count;
- ``native`` (the default ``pamr`` on CPU since issue 16, when a C compiler is there): the kernel of
  ``ops/pamr_native.c``, one parallel region for the affinities and one for the propagation;

each with torch's default thread count and with ``torch.set_num_threads(1)``. Results of the two torch
variants are checked to be bit-identical, and the native kernel's largest difference from them is printed.

Scenarios: *idle* (nothing started by this script; other users of the machine are reported with the
load average) and *busy*: a competing process (``multiprocessing`` spawn) runs a float32 1024x1024
matmul loop with torch's default thread count for the duration of the busy measurements, as a second
talk2dino process would. Each figure is the median of ``--repeats`` runs (min in the JSON).

Usage::

    python benchmarks/bench_pamr_contention.py               # about 1 minute on 2 cores
    python benchmarks/bench_pamr_contention.py --repeats 7 --json pamr.json

See benchmarks/README.md ("PAMR under CPU contention").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from talk2dino.ops import pamr as pamr_module
from talk2dino.ops.pamr_native import native_pamr, native_pamr_status

DILATIONS = (1, 2, 4, 8, 12, 24)
ITERATIONS = 10
WINDOWS = 2
WINDOW = 448
CLASSES = 20


def _busy(stop: mp.synchronize.Event, ready: mp.synchronize.Event) -> None:  # pragma: no cover - child
    a = torch.rand(1024, 1024)
    b = torch.rand(1024, 1024)
    ready.set()
    while not stop.is_set():
        torch.mm(a, b)


@contextmanager
def competitor() -> Iterator[None]:
    """A spawned process looping on matmuls with torch's default thread count, until the block ends."""
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    process = ctx.Process(target=_busy, args=(stop, ready), daemon=True)
    process.start()
    try:
        ready.wait(60)
        time.sleep(0.5)  # let it reach its steady loop
        yield
    finally:
        stop.set()
        process.join(10)
        if process.is_alive():
            process.kill()


@contextmanager
def variant(name: str, threads: int) -> Iterator[None]:
    saved_limit, saved_threads = pamr_module._SERIAL_AFFINITY_PIXELS, torch.get_num_threads()
    if name == "all-threaded":
        pamr_module._SERIAL_AFFINITY_PIXELS = 0
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        pamr_module._SERIAL_AFFINITY_PIXELS = saved_limit
        torch.set_num_threads(saved_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    guides = torch.rand(WINDOWS, 1, 3, WINDOW, WINDOW, generator=generator) * 255
    scores = torch.rand(WINDOWS, 1, CLASSES, WINDOW, WINDOW, generator=generator)

    def run(native: bool) -> list[torch.Tensor]:
        return [pamr_module.pamr(guides[i], scores[i], iterations=ITERATIONS, dilations=DILATIONS, native=native)
                for i in range(WINDOWS)]

    names = ["serial-affinities", "all-threaded"] + (["native"] if native_pamr() is not None else [])
    variants = [(name, threads) for name in names for threads in sorted({default_threads, 1}, reverse=True)]
    outputs = {}
    for name, threads in variants:  # warm-up (scratch buffer, neighbour index) and identity check
        with variant(name, threads):
            outputs[name, threads] = run(name == "native")
    reference = outputs[variants[0]]
    identical = all(torch.equal(a, b) for (name, _), out in outputs.items() if name != "native"
                    for a, b in zip(out, reference, strict=True))
    native_gap = max(((a - b).abs().max().item() for (name, _), out in outputs.items() if name == "native"
                      for a, b in zip(out, reference, strict=True)), default=float("nan"))

    times: dict[tuple[str, int, str], list[float]] = {}
    load: dict[str, list[float]] = {}
    for scenario in ("idle", "busy"):
        manager = competitor() if scenario == "busy" else contextmanager(lambda: iter([None]))()
        with manager:
            load[scenario] = list(os.getloadavg())
            for _ in range(args.repeats):
                for name, threads in variants:
                    with variant(name, threads):
                        start = time.perf_counter()
                        run(name == "native")
                        times.setdefault((name, threads, scenario), []).append(time.perf_counter() - start)

    print(f"PAMR of a 500x375 image ({WINDOWS} windows {WINDOW}x{WINDOW}, {CLASSES} channels, "
          f"{ITERATIONS} iterations), median of {args.repeats}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, default threads {default_threads}")
    print(f"load average (1/5/15 min) at start: idle {load['idle']}, busy {load['busy']}")
    print(f"torch variants bit-identical: {identical}; native kernel: {native_pamr_status()}, largest difference "
          f"from the torch path {native_gap:.1e}\n")
    print("| variant | threads | idle s | busy s | busy/idle |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, threads in variants:
        idle = statistics.median(times[name, threads, "idle"])
        busy = statistics.median(times[name, threads, "busy"])
        rows.append({"variant": name, "threads": threads, "idle_s": idle, "busy_s": busy,
                     "idle_runs": times[name, threads, "idle"], "busy_runs": times[name, threads, "busy"]})
        print(f"| {name} | {threads} | {idle:.3f} | {busy:.3f} | {busy / idle:.1f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "load": load, "identical": identical, "native_gap": native_gap,
                       "cpus": os.cpu_count(), "torch": torch.__version__}, handle, indent=2)


if __name__ == "__main__":
    main()
