"""Seconds per 448² window and peak memory for every backbone family and size (random weights, fp32 CPU).

Each configuration runs in a fresh child process (this script re-invoked with ``--child``) so that its peak
resident memory is its own. The model is built from its transformers config with seeded random weights
(the cost of a forward does not depend on the weight values), wrapped in the package's backbone class, and
its fast path (the one `Segmenter` uses) is timed on one 448×448 window after a warm-up.

Usage::

    python benchmarks/bench_backbones.py                     # S/B/L of each family (a few minutes on 2 cores)
    python benchmarks/bench_backbones.py --all               # also DINOv2 ViT-g/14 and DINOv3 ViT-H+/16 (slow)
    python benchmarks/bench_backbones.py --only dinov2-vitb14-reg,dino-vitb8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

# name -> (family, config kwargs). Sizes follow the released checkpoints' configs.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2-vits14-reg": ("dinov2_reg", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6)),
    "dinov2-vitb14-reg": ("dinov2_reg", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    "dinov2-vitl14-reg": ("dinov2_reg", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)),
    "dinov2-vitg14-reg": ("dinov2_reg", dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                             use_swiglu_ffn=True)),
    "dinov2-vitb14": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    "dinov3-vits16": ("dinov3", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                     num_attention_heads=6)),
    "dinov3-vitb16": ("dinov3", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12)),
    "dinov3-vitl16": ("dinov3", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16)),
    "dinov3-vith16plus": ("dinov3", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                         num_attention_heads=20, use_gated_mlp=True)),
    "dino-vits16": ("dino", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16)),
    "dino-vitb16": ("dino", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16)),
    "dino-vits8": ("dino", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=8)),
    "dino-vitb8": ("dino", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=8)),
}
SLOW = ("dinov2-vitg14-reg", "dinov3-vith16plus")


def build(name: str) -> Any:
    """The package backbone wrapper around a random model of configuration `name`."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        ViTConfig,
        ViTModel,
    )

    from talk2dino.registry import BACKBONE_FAMILIES

    family, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    if family == "dinov2_reg":
        config: Any = Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4, **kwargs)
        config._attn_implementation = "sdpa"
        model: Any = Dinov2WithRegistersModel(config)
    elif family == "dinov2":
        config = Dinov2Config(patch_size=14, image_size=518, **kwargs)
        config._attn_implementation = "sdpa"
        model = Dinov2Model(config)
    elif family == "dinov3":
        config = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **kwargs)
        config._attn_implementation = "sdpa"
        model = DINOv3ViTModel(config)
    else:
        config = ViTConfig(image_size=224, **kwargs)
        config._attn_implementation = "sdpa"
        model = ViTModel(config, add_pooling_layer=False)
    return BACKBONE_FAMILIES[config.model_type](model.eval())


def child(name: str, repeats: int) -> dict[str, Any]:
    """Build, warm up, time `repeats` single-window forwards; report seconds and peak RSS."""
    backbone = build(name)
    params = sum(p.numel() for p in backbone.parameters())
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(1, 3, 448, 448)
    backbone(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = backbone(x)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": name, "params_M": params / 1e6, "patches": int(out.patch_tokens.shape[1]),
            "heads": backbone.num_heads, "s_per_window": min(times), "peak_MB": peak / 1024,
            "forward_extra_MB": (peak - rss_built) / 1024}


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration in a child process and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="include the giant models (ViT-g/14, ViT-H+/16)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))  # noqa: T201 - the parent reads this line
        return 0
    names = args.only.split(",") if args.only else [n for n in CONFIGS if args.all or n not in SLOW]
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(f"| {r['name']} | {r['params_M']:.0f} | {r['heads']} | {r['patches']} | {r['s_per_window']:.2f} "
                    f"| {1 / r['s_per_window']:.2f} | {r['peak_MB']:.0f} | {r['forward_extra_MB']:.0f} |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, one 448×448 window, fast path\n")
    print("| backbone | params (M) | heads | patches | s / window | windows / s | peak RSS MB | forward extra MB |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
