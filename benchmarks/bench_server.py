"""Load check of ``talk2dino serve``: N concurrent clients on loopback against the real-size model.

Starts the server in a child process (this script re-invoked with ``--child-server``) with the real-size
random-weight model of ``bench_inference.build_model`` (DINOv2 ViT-B/14-reg + CLIP B/16 text + psi; nothing
is downloaded), then runs N client threads that post the same synthetic image with the same labels to
``POST /v1/segment`` back to back for a bounded time. A client refused with 429 (overload) or 503 waits the
answer's ``Retry-After`` before its next request, as a well-behaved client does. Reports answers by status
(ok, 4xx, 5xx, connection errors), p50/p95 latency of the successful ones, throughput, the server's
batching, and the server process's resident memory: once the model was loaded and warmed up, sampled over
the run (peak, end, and the mean of each half: a second half above the first means memory grows with load),
and the kernel's peak ``VmHWM``.

Usage::

    python benchmarks/bench_server.py                          # 4 clients x 60 s, VOC-20 labels, no PAMR
    python benchmarks/bench_server.py --clients 32 --duration 60 --json load.json   # overload: 429s expected
    python benchmarks/bench_server.py --tiny                   # quick check: small image at 224, 3 labels, 15 s

Only loopback traffic; the child is stopped (SIGINT, then SIGKILL after a grace period) however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 600.0
POLL_S = 0.5
BASELINE_REPEATS = 2


# ---------------------------------------------------------------------------------------------- the server child
def run_child_server(args: argparse.Namespace) -> int:
    """Build the real-size random model, wrap it in the server and serve on 127.0.0.1 until SIGINT."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_inference import DEFAULT_BPE, build_model

    from talk2dino import InferenceConfig, Segmenter
    from talk2dino.server import ServerConfig, create_app
    from talk2dino.server.http import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(torch.device("cpu"), torch.float32, Path(args.bpe or DEFAULT_BPE), Path(workdir))
    geometry = {"short_side": args.short_side, "window": args.short_side, "stride": args.short_side // 2}
    segmenter = Segmenter(model, InferenceConfig(pamr=args.pamr, background=args.background, **geometry))
    if args.baseline_out:
        # The same work without HTTP, queue or batching, measured in this process just before serving, so
        # that the load figures can be read against it even on a machine shared with other jobs.
        from bench_inference import synthetic_image

        image = synthetic_image(*args.size)
        segmenter.set_classes(args.labels)
        times = []
        for _ in range(1 + BASELINE_REPEATS):  # the first call warms up
            begin = time.perf_counter()
            segmenter.predict_features(segmenter.embed_images([image])[0])
            times.append(time.perf_counter() - begin)
        Path(args.baseline_out).write_text(json.dumps({"direct_s": statistics.median(times[1:])}), encoding="utf-8")
    config = ServerConfig(port=args.port, queue_size=args.queue_size, max_batch=args.max_batch,
                          request_timeout_s=args.request_timeout)
    serve(create_app(segmenter, config), log_level="warning")  # returns after SIGINT/SIGTERM, gracefully
    return 0


# ---------------------------------------------------------------------------------------------- measurement
def _status_kib(pid: int, field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _image_png(width: int, height: int) -> bytes:
    sys.path.insert(0, str(HERE))
    from bench_inference import synthetic_image
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def server_process(args: argparse.Namespace, port: int, baseline: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-server", "--port", str(port),
               "--baseline-out", str(baseline), "--size", f"{args.size[0]}x{args.size[1]}",
               "--labels", ",".join(args.labels),
               "--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch),
               "--short-side", str(args.short_side),
               "--request-timeout", str(args.request_timeout), "--pamr" if args.pamr else "--no-pamr",
               "--background" if args.background else "--no-background"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.bpe:
        command += ["--bpe", args.bpe]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def wait_ready(client: Any, url: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} during startup")
        with contextlib.suppress(Exception):
            response = client.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return dict(response.json())
        time.sleep(POLL_S)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s")


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    image = _image_png(*args.size)
    form = {"labels": ", ".join(args.labels), "pamr": str(args.pamr).lower(),
            "background": str(args.background).lower()}
    baseline_file = Path(tempfile.mkdtemp(prefix="talk2dino-bench-")) / "baseline.json"
    with server_process(args, port, baseline_file) as proc, httpx.Client() as client:
        started_boot = time.monotonic()
        wait_ready(client, url, proc)
        boot_s = time.monotonic() - started_boot
        # Warm-up: first-call text encoding of the vocabulary and allocator growth, not measured.
        warm = client.post(f"{url}/v1/segment", data=form, files={"image": ("bench.png", image, "image/png")},
                           timeout=args.request_timeout + 30)
        warm.raise_for_status()
        rss_ready_kib = _status_kib(proc.pid, "VmRSS")

        results: list[tuple[float, float, int, str]] = []  # (start offset, latency s, status, error)
        server_timings: list[dict[str, float]] = []  # the answers' own "timings" (seconds per stage)
        lock = threading.Lock()
        rss_samples: list[tuple[float, int]] = []  # (offset s, KiB)
        stop_sampling = threading.Event()
        load_start = os.getloadavg()[0]
        t0 = time.monotonic()
        deadline = t0 + args.duration

        def client_loop() -> None:
            with httpx.Client() as own:
                while time.monotonic() < deadline:
                    begin = time.monotonic()
                    retry_after = 0.0
                    try:
                        response = own.post(f"{url}/v1/segment", data=form,
                                            files={"image": ("bench.png", image, "image/png")},
                                            timeout=args.request_timeout + 30)
                        status, error = response.status_code, ""
                        if status == 200:
                            with lock:
                                server_timings.append(response.json()["timings"])
                        else:
                            error = _error_kind(str(response.json().get("error", "")))
                            with contextlib.suppress(ValueError):
                                retry_after = float(response.headers.get("retry-after", "0"))
                    except httpx.HTTPError as err:
                        status, error = 0, type(err).__name__
                        retry_after = 1.0
                    with lock:
                        results.append((begin - t0, time.monotonic() - begin, status, error))
                    if retry_after > 0:
                        # A refused client waits as Retry-After asks (but not past the end of the run).
                        time.sleep(max(0.0, min(retry_after, deadline - time.monotonic())))

        def sample() -> None:
            while not stop_sampling.wait(POLL_S):
                rss = _status_kib(proc.pid, "VmRSS")
                if rss is not None:
                    rss_samples.append((time.monotonic() - t0, rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.duration + args.request_timeout + 60)
        elapsed = time.monotonic() - t0
        stop_sampling.set()
        sampler.join(5)
        health = client.get(f"{url}/healthz", timeout=10).json()
        peak_kib = _status_kib(proc.pid, "VmHWM")
    direct_s = json.loads(baseline_file.read_text())["direct_s"] if baseline_file.is_file() else None
    baseline_file.unlink(missing_ok=True)
    baseline_file.parent.rmdir()

    ok = sorted(latency for _, latency, status, _ in results if status == 200)

    def median_of(key: str) -> float | None:
        values = [t[key] for t in server_timings if key in t]
        return round(statistics.median(values), 3) if values else None

    statuses = Counter(status for _, _, status, _ in results)
    errors = Counter(f"{status} {error}" for _, _, status, error in results if status != 200)
    during = [kib for offset, kib in rss_samples if offset <= args.duration]
    half = len(during) // 2

    def mb(kib: float | None) -> int | None:
        return round(kib / 1024) if kib else None

    return {
        "clients": args.clients, "duration_s": args.duration, "elapsed_s": round(elapsed, 2),
        "image": f"{args.size[0]}x{args.size[1]}", "labels": len(args.labels), "pamr": args.pamr,
        "background": args.background, "max_batch": args.max_batch, "queue_size": args.queue_size,
        "requests": len(results), "ok": len(ok), "statuses": dict(statuses), "errors": dict(errors),
        "refused_4xx": sum(n for code, n in statuses.items() if 400 <= code < 500),
        "server_5xx": sum(n for code, n in statuses.items() if code >= 500),
        "connection_errors": statuses.get(0, 0),
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
        "p50_s": round(statistics.median(ok), 3) if ok else None,
        "p95_s": round(ok[min(len(ok) - 1, int(0.95 * len(ok)))], 3) if ok else None,
        "max_s": round(ok[-1], 3) if ok else None,
        "server_boot_s": round(boot_s, 1),
        "direct_s_per_image": round(direct_s, 3) if direct_s is not None else None,
        # Medians over the answers: time waiting in the queue, this image's share of its backbone batch,
        # requests per batch, and the server's time from arrival to answer.
        "server_queue_s": median_of("queue"), "server_embed_image_s": median_of("embed_image"),
        "server_batch_size": median_of("batch_size"), "server_total_s": median_of("total"),
        "rss_ready_mb": mb(rss_ready_kib),
        "rss_max_sampled_mb": mb(max(kib for _, kib in rss_samples)) if rss_samples else None,
        "rss_end_mb": mb(rss_samples[-1][1]) if rss_samples else None,
        "rss_first_half_mean_mb": mb(statistics.mean(during[:half])) if half else None,
        "rss_second_half_mean_mb": mb(statistics.mean(during[half:])) if half else None,
        "rss_first_half_max_mb": mb(max(during[:half])) if half else None,
        "rss_second_half_max_mb": mb(max(during[half:])) if half else None,
        "peak_rss_mb": round(peak_kib / 1024) if peak_kib else None,
        "largest_batch": health["queue"]["largest_batch"], "batches": health["queue"]["batches"],
        "server_completed": health["queue"]["completed"], "cpu_count": os.cpu_count(),
        "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _error_kind(message: str) -> str:
    """An error message without its numbers, so that answers of one kind count together."""
    return re.sub(r"[0-9][0-9.,]*", "N", message)[:100]


def format_table(record: dict[str, Any]) -> str:
    """One Markdown table row per run, with the header, and the errors by kind below it."""
    header = ("| clients | duration | image | labels | requests | ok | 4xx (refused) | 5xx | conn. errors | ok/s | "
              "p50 s | p95 s | largest batch | RSS ready / peak / end MB | RSS mean 1st / 2nd half MB |")
    rule = "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"
    row = (f"| {record['clients']} | {record['duration_s']:g} s | {record['image']} | {record['labels']} | "
           f"{record['requests']} | {record['ok']} | {record['refused_4xx']} | {record['server_5xx']} | "
           f"{record['connection_errors']} | {record['requests_per_s']:.3f} | {record['p50_s']} | {record['p95_s']} | "
           f"{record['largest_batch']} | {record['rss_ready_mb']} / {record['rss_max_sampled_mb']} / "
           f"{record['rss_end_mb']} | {record['rss_first_half_mean_mb']} / {record['rss_second_half_mean_mb']} |")
    errors = "\n".join(f"- {n} x {kind}" for kind, n in sorted(record["errors"].items(), key=lambda kv: -kv[1]))
    return "\n".join([header, rule, row, "", "answers other than 200:", errors or "- none"])


# ---------------------------------------------------------------------------------------------- command line
VOC20 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which clients send requests")
    parser.add_argument("--size", type=parse_size, default=(500, 375), help="image WIDTHxHEIGHT (500x375: 2 windows)")
    parser.add_argument("--labels", type=lambda s: [x.strip() for x in s.split(",")], default=list(VOC20),
                        help="comma-separated labels (default: the 20 VOC classes)")
    parser.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=False, help="PAMR on the server")
    parser.add_argument("--background", action=argparse.BooleanOptionalAction, default=True,
                        help="background channel (with cleaning)")
    parser.add_argument("--max-batch", type=int, default=4, help="server --max-batch")
    parser.add_argument("--queue-size", type=int, default=16, help="server --queue-size")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="server --request-timeout (s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--bpe", default=None, help="CLIP BPE vocabulary (default: ../shared/reference/clip-bpe)")
    parser.add_argument("--json", default=None, help="also write the record to this file")
    parser.add_argument("--short-side", type=int, default=448,
                        help="server resize target = window (stride half of it); 448 is the protocol")
    parser.add_argument("--tiny", action="store_true",
                        help="quick check: a 160x120 image processed at 224 (one 224 window), 3 labels, 15 s; "
                             "flags given explicitly still win")
    parser.add_argument("--child-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--size" not in given:
            args.size = (160, 120)
        if "--labels" not in given:
            args.labels = ["cat", "sofa", "window"]
        if "--duration" not in given:
            args.duration = 15.0
        if "--short-side" not in given:
            args.short_side = 224
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_server:
        return run_child_server(args)
    record = run_load(args)
    sys.stdout.write(format_table(record) + "\n\n")
    sys.stdout.write(f"same work without the server (Segmenter.embed_images + predict_features, in the server "
                     f"process before serving): {record['direct_s_per_image']} s per image\n")
    sys.stdout.write(f"server medians: queue {record['server_queue_s']} s, image embedding "
                     f"{record['server_embed_image_s']} s per image, batch of {record['server_batch_size']}, "
                     f"arrival to answer {record['server_total_s']} s\n")
    sys.stdout.write(f"server: {record['server_completed']} answers in {record['batches']} batches; "
                     f"startup {record['server_boot_s']} s; 1-min load average {record['loadavg_1m_start']} at the "
                     f"start, {record['loadavg_1m_end']} at the end, on {record['cpu_count']} CPUs\n")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
