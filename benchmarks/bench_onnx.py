"""ONNX Runtime against the PyTorch fast path on CPU, real-size models with random weights, one run.

Builds the same model as ``bench_inference.py`` (DINOv2 ViT-B/14 with 4 registers + the CLIP ViT-B/16
text tower + psi 512->768, seeded random weights, real CLIP tokenizer; nothing is downloaded), exports
it with `talk2dino.onnx.export.export_onnx` at a 448-pixel window, loads the folder with
`talk2dino.factory.load_onnx_model`, and then times, in the same process and interleaved
(PyTorch, then ONNX Runtime, per repeat, so load changes hit both alike):

- the backbone on one 448² window (batch 1) and on two (batch 2), seconds per window;
- text encoding of 140 prompts (the 20 VOC names × the 7 default templates);
- a full ``Segmenter`` call (``set_image`` + ``predict``) on a 500×375 synthetic image: 2 windows,
  VOC-21 (background channel, cleaning on), PAMR on; the vocabulary is set once beforehand.

It also reports how far the ONNX outputs are from PyTorch's on this model (max |Δ| / max |torch|
per output) and how many labels of the full call agree. Both runtimes use the same number of threads.

Usage::

    python benchmarks/bench_onnx.py                   # ~5 min on 2 busy CPU cores (export ~1 min)
    python benchmarks/bench_onnx.py --repeats 5 --threads 4 --json onnx.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_BPE, VOC_CLASSES, build_model, synthetic_image  # noqa: E402

logger = logging.getLogger("bench_onnx")

WINDOW = 448  # the protocol's window side (InferenceConfig.window, method.md §4.3)
IMAGE_SIZE = (500, 375)  # width, height: resized to 597×448, 2 windows


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.float() - want.float()).abs().max().item() / scale if scale else 0.0


def measure(name: str, per: int, torch_fn: Callable[[], Any], onnx_fn: Callable[[], Any],
            repeats: int) -> tuple[dict[str, Any], Any, Any]:
    """Warm both up once, then `repeats` interleaved timed calls; seconds divided by `per`.

    Returns:
        ``(record, last PyTorch result, last ONNX Runtime result)``.
    """
    torch_out, onnx_out = torch_fn(), onnx_fn()
    times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(repeats):
        seconds, torch_out = _timed(torch_fn)
        times["pytorch"].append(seconds / per)
        seconds, onnx_out = _timed(onnx_fn)
        times["onnxruntime"].append(seconds / per)
    record: dict[str, Any] = {"name": name, "repeats": repeats,
                              **{k: {"median": statistics.median(v), "min": min(v), "all": v}
                                 for k, v in times.items()}}
    logger.info("%s: pytorch %.3f s, onnxruntime %.3f s", name, record["pytorch"]["median"],
                record["onnxruntime"]["median"])
    return record, torch_out, onnx_out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from talk2dino import InferenceConfig, Segmenter
    from talk2dino.factory import load_onnx_model
    from talk2dino.onnx.export import export_onnx

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="t2d-onnx-bench-") as tmp:
        work = Path(tmp)
        model = build_model(device, torch.float32, args.bpe, work)
        # verify=False: the same comparison is made below, on the benchmark's own inputs.
        export_s, paths = _timed(lambda: export_onnx(model, work / "onnx", image_size=WINDOW, verify=False))
        manifest = json.loads(paths["config"].read_text(encoding="utf-8"))
        sizes_mb = {k: round(p.stat().st_size / 1e6, 1) for k, p in paths.items() if p.is_file() and k != "config"}
        logger.info("export took %.1f s", export_s)
        onnx_model = load_onnx_model(work / "onnx", threads=args.threads)

        generator = torch.Generator().manual_seed(0)
        one = torch.randn(1, 3, WINDOW, WINDOW, generator=generator)
        two = torch.randn(2, 3, WINDOW, WINDOW, generator=generator)
        record, _, _ = measure("backbone, batch 1 (s / window)", 1, lambda: model.encode_image(one),
                               lambda: onnx_model.encode_image(one), args.repeats)
        records = [record]
        record, want, got = measure("backbone, batch 2 (s / window)", 2, lambda: model.encode_image(two),
                                    lambda: onnx_model.encode_image(two), args.repeats)
        records.append(record)
        image_errors = {n: _relative(getattr(got, n), getattr(want, n))
                        for n in ("patch_tokens", "cls_token", "register_tokens", "attn_logits")}

        templates = model.config.text.templates
        prompts = [t.format(c) for c in VOC_CLASSES for t in templates]
        record, text_torch, text_onnx = measure(f"text, {len(prompts)} prompts (s)", 1,
                                                lambda: model.encode_text(prompts),
                                                lambda: onnx_model.encode_text(prompts), args.repeats)
        records.append(record)
        text_error = _relative(text_onnx, text_torch)
        class_error = _relative(onnx_model.embed_classes(VOC_CLASSES), model.embed_classes(VOC_CLASSES))

        config = InferenceConfig(window=WINDOW, background=True, pamr=True)
        image = synthetic_image(*IMAGE_SIZE)
        segmenters = {}
        for key, m in (("pytorch", model), ("onnxruntime", onnx_model)):
            segmenter = Segmenter(m, config)
            segmenter.set_classes(list(VOC_CLASSES))
            segmenters[key] = segmenter

        def full(segmenter: Any) -> Any:
            segmenter.set_image(image)
            return segmenter.predict()

        record, result_torch, result_onnx = measure(
            f"Segmenter {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, VOC-21 + cleaning + PAMR (s)", 1,
            lambda: full(segmenters["pytorch"]), lambda: full(segmenters["onnxruntime"]), args.repeats)
        records.append(record)
        agreement = (result_torch.labels == result_onnx.labels).float().mean().item()
        score_diff = (result_torch.scores - result_onnx.scores).abs().max().item()

    import onnxruntime

    return {
        "records": records,
        "export": {"seconds": export_s, "opset": manifest["opset"], "sizes_mb": sizes_mb},
        "equality": {"image_relative": image_errors, "text_relative": text_error,
                     "class_embeddings_relative": class_error, "label_agreement": agreement,
                     "scores_max_abs_diff": score_diff},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "load_average_after": list(os.getloadavg())},
    }


def format_report(report: dict[str, Any]) -> str:
    lines = ["| measurement | PyTorch fast path | ONNX Runtime | PyTorch / ONNX |", "|---|---:|---:|---:|"]
    for rec in report["records"]:
        t, o = rec["pytorch"]["median"], rec["onnxruntime"]["median"]
        lines.append(f"| {rec['name']} | {t:.3f} | {o:.3f} | {t / o:.2f}× |")
    eq, ex, machine = report["equality"], report["export"], report["machine"]
    lines += [
        "",
        f"Medians of {report['records'][0]['repeats']} interleaved runs after one warm-up each; CPU, float32, "
        f"{machine['threads']} threads for both runtimes (torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}, Python {machine['python']}; load average after the run "
        f"{machine['load_average_after'][0]:.2f}).",
        f"Export: {ex['seconds']:.1f} s, opset {ex['opset']}, sizes MB {ex['sizes_mb']}.",
        "Equality on this model (max |ONNX − torch| / max |torch|): image "
        + ", ".join(f"{k} {v:.1e}" for k, v in eq["image_relative"].items())
        + f"; text {eq['text_relative']:.1e}; class embeddings {eq['class_embeddings_relative']:.1e}; "
        f"Segmenter labels agree on {eq['label_agreement']:.4%} of pixels, scores max |Δ| "
        f"{eq['scores_max_abs_diff']:.1e}.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement and runtime (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both runtimes (default: torch's)")
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE, help="CLIP bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for chatty in ("onnx_ir", "onnxscript"):  # the exporter's optimiser passes log every step at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    if not args.bpe.is_file():
        logger.error("CLIP BPE vocabulary not found: %s (pass --bpe)", args.bpe)
        return 2
    report = run(args)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
