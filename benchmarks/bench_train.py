"""Training-loop benchmark: psi on COCO-size synthetic features, the real loop against a DataLoader baseline.

Builds random features of the full COCO Captions 2014 train size (414,113 captions, 82,783 images,
ViT-B: M = 12 heads, D = 768; float16 in RAM as ``talk2dino extract`` stores them: about 1.5 GB of
heads and 0.4 GB of text), then times, in the same process and on the same features:

- **loop**: the real training step (`talk2dino.training.loop.Trainer` with `ContrastiveObjective`,
  strategy ``max`` by default): index batches are slices of one seeded ``randperm``, features are
  gathered by direct indexing, no DataLoader;
- **DataLoader**: the same loss, psi and Adam, fed by a ``torch.utils.data.DataLoader`` over a
  ``TensorDataset(text, caption_image)`` with batch 128 and shuffling (one ``__getitem__`` per caption
  and a ``default_collate`` per batch, ``num_workers=0``), the usual baseline.

Each path runs ``--warmup`` untimed steps, then ``--steps`` timed steps; seconds per epoch are
extrapolated to the 3,236 steps of a full epoch (``ceil(captions / batch)``) plus, for the loop, the
measured cost of drawing the epoch's permutation. ``--steps 0`` times one full epoch of each instead.
The data-only rows time the batch assembly alone (no psi, no backward). Peak RSS is the process's
high-water mark (``ru_maxrss``), features included.

Usage::

    python benchmarks/bench_train.py                    # CPU, 300 steps per path, ~2-4 min on 2 cores
    python benchmarks/bench_train.py --steps 0          # one full epoch per path
    python benchmarks/bench_train.py --device cuda --json train_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from talk2dino.config import TrainConfig
from talk2dino.data.features import FeatureSet
from talk2dino.models.projection import Projection
from talk2dino.training.loop import Trainer, shuffled_batches
from talk2dino.training.objective import ContrastiveObjective, strategy_images
from talk2dino.training.run import build_optimizer

COCO_CAPTIONS = 414_113  # COCO Captions 2014 train, method.md §3.1
COCO_IMAGES = 82_783
VITB_HEADS = 12  # method.md §1
VITB_DIM = 768
TEXT_DIM = 512


def synthetic_features(*, captions: int, images: int, heads: int, dim: int, seed: int) -> FeatureSet:
    """Random float16 features of the given size (heads ~ N(0, 1), text ~ N(0, 1)), built in chunks."""
    generator = torch.Generator().manual_seed(seed)

    def randn16(*shape: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float16)
        chunk = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], chunk):
            rows = out[start:start + chunk]
            rows.copy_(torch.randn(rows.shape, generator=generator))
        return out

    caption_image = torch.cat([torch.arange(images), torch.randint(0, images, (captions - images,),
                                                                     generator=generator)])
    return FeatureSet(
        image_ids=torch.arange(images), heads=randn16(images, heads, dim), mean_heads=randn16(images, dim),
        cls=randn16(images, dim), caption_ids=torch.arange(captions), caption_image=caption_image,
        text=randn16(captions, TEXT_DIM), manifest={},
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(device: torch.device, text_dim: int, dim: int, seed: int) -> tuple[Projection, torch.optim.Adam]:
    """psi and the recipe's Adam, exactly as `run_train` builds them."""
    torch.manual_seed(seed)
    psi = Projection(text_dim, dim).to(device)
    return psi, build_optimizer(psi, TrainConfig(features="-", out="-"))


def time_loop(features: FeatureSet, *, device: torch.device, batch_size: int, steps: int, warmup: int,
              strategy: Any, seed: int) -> dict[str, float]:
    """The real loop: Trainer + ContrastiveObjective over randperm index batches."""
    psi, optimizer = make_step(device, TEXT_DIM, features.embed_dim, seed)
    objective = ContrastiveObjective(
        psi, text=features.text.to(device), caption_image=features.caption_image.to(device),
        images=strategy_images(features, strategy).to(device), strategy=strategy, temperature=0.07,
        divide_by_batch_squared=True, device=device,
    )
    trainer = Trainer(psi, optimizer, objective)
    num = int(features.text.shape[0])
    sync(device)
    start = time.perf_counter()
    batches = shuffled_batches(num, batch_size, seed=seed, epoch=0, device=device)
    sync(device)
    permutation_s = time.perf_counter() - start
    trainer.run_epoch(0, batches[:warmup])
    measured = batches[warmup:warmup + steps] if steps else batches
    sync(device)
    start = time.perf_counter()
    trainer.run_epoch(1, measured)  # ends with one .item(): the device is synchronised
    seconds = time.perf_counter() - start
    data_s = time_data_only(lambda: iter(measured), objective, device)
    return {"steps": len(measured), "seconds": seconds, "permutation_s": permutation_s, "data_s": data_s}


def time_data_only(make_batches: Any, objective: ContrastiveObjective, device: torch.device) -> float:
    """Seconds to assemble the same batches (gather, cast, move) without psi or backward."""
    sync(device)
    start = time.perf_counter()
    for index in make_batches():
        rows = objective.caption_image[index]
        objective.text[index].to(device).float()
        objective.images[rows].to(device).float()
    sync(device)
    return time.perf_counter() - start


def loader_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for text, rows in loader:
        yield text.to(device, non_blocking=True), rows.to(device, non_blocking=True)


def time_dataloader(features: FeatureSet, *, device: torch.device, batch_size: int, steps: int, warmup: int,
                    strategy: Any, seed: int) -> dict[str, float]:
    """Baseline: the same loss and optimiser fed by a DataLoader over a TensorDataset."""
    psi, optimizer = make_step(device, TEXT_DIM, features.embed_dim, seed)
    # The image table stays where the loop keeps it; the baseline's difference is the caption path.
    objective = ContrastiveObjective(
        psi, text=features.text, caption_image=features.caption_image,
        images=strategy_images(features, strategy).to(device), strategy=strategy, temperature=0.07,
        divide_by_batch_squared=True, device=device,
    )
    dataset = TensorDataset(features.text, features.caption_image)

    def loader() -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed), num_workers=0,
                          pin_memory=device.type == "cuda")

    def run(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
        count = 0
        for text, rows in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss_for(text, rows)
            loss.backward()
            optimizer.step()
            count += 1
        return count

    iterator = loader_batches(loader(), device)
    run(islice(iterator, warmup))
    sync(device)
    start = time.perf_counter()
    count = run(islice(iterator, steps) if steps else iterator)
    sync(device)
    seconds = time.perf_counter() - start

    sync(device)
    start = time.perf_counter()  # data only: DataLoader collation, then the same image gather as the loop
    for text, rows in islice(loader_batches(loader(), device), count):
        objective.images[rows].float()
        text.float()
    sync(device)
    data_s = time.perf_counter() - start
    return {"steps": count, "seconds": seconds, "permutation_s": 0.0, "data_s": data_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=COCO_CAPTIONS)
    parser.add_argument("--images", type=int, default=COCO_IMAGES)
    parser.add_argument("--heads", type=int, default=VITB_HEADS)
    parser.add_argument("--dim", type=int, default=VITB_DIM)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per path (0: one full epoch)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    parser.add_argument("--strategy", default="max", choices=["max", "avg", "cls", "cls-weighted"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the DataLoader baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    start = time.perf_counter()
    features = synthetic_features(captions=args.captions, images=args.images, heads=args.heads, dim=args.dim,
                                  seed=args.seed)
    build_s = time.perf_counter() - start
    rss_features = peak_rss_gb()
    steps_per_epoch = math.ceil(args.captions / args.batch_size)
    common = dict(device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                  strategy=args.strategy, seed=args.seed)
    results = {"loop (randperm + direct indexing)": time_loop(features, **common)}
    if not args.no_baseline:
        results["DataLoader(TensorDataset), batch 128"] = time_dataloader(features, **common)
    rss_peak = peak_rss_gb()

    rows = []
    for name, r in results.items():
        steps_per_s = r["steps"] / r["seconds"]
        epoch_s = steps_per_epoch / steps_per_s + r["permutation_s"]
        rows.append({"path": name, "timed_steps": r["steps"], "steps_per_s": steps_per_s, "epoch_s": epoch_s,
                     "epochs_per_s": 1 / epoch_s, "data_ms_per_step": 1e3 * r["data_s"] / r["steps"]})
    feature_gb = sum(t.numel() * t.element_size() for t in (features.heads, features.text, features.mean_heads,
                                                           features.cls)) / 1e9
    header = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "captions": args.captions, "images": args.images, "heads": args.heads,
        "dim": args.dim, "batch_size": args.batch_size, "strategy": args.strategy,
        "steps_per_epoch": steps_per_epoch, "feature_gb_fp16": feature_gb, "build_s": build_s,
        "peak_rss_gb_after_features": rss_features, "peak_rss_gb": rss_peak,
    }
    extrapolated = "full epoch" if args.steps == 0 else (
        f"{args.steps} timed steps after {args.warmup} warm-up steps, extrapolated to {steps_per_epoch} steps/epoch")
    print(f"Training loop, {args.captions:,} captions / {args.images:,} images, M={args.heads}, D={args.dim}, "
          f"fp16 features ({feature_gb:.2f} GB), batch {args.batch_size}, strategy {args.strategy}; "
          f"device {header['device']}, {header['threads']} threads, torch {torch.__version__}; {extrapolated}.")
    print(f"Peak RSS: {rss_features:.2f} GB after building the features, {rss_peak:.2f} GB at the end.\n")
    print("| path | steps/s | s/epoch | epochs/s | data ms/step |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['path']} | {row['steps_per_s']:.1f} | {row['epoch_s']:.1f} | {row['epochs_per_s']:.4f} "
              f"| {row['data_ms_per_step']:.2f} |")
    if len(rows) == 2:
        speedup = rows[0]["steps_per_s"] / rows[1]["steps_per_s"]
        print(f"\nspeed-up of the loop over the DataLoader baseline: {speedup:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"setup": header, "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
