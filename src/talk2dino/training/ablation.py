"""The paper-style head-selection ablation table from finished training runs (method.md §3.6)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from talk2dino.training.run_folder import LOG_FILE


def _last_entry(run: Path) -> dict:
    lines = [line for line in (run / LOG_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{run / LOG_FILE}: empty training log")
    return json.loads(lines[-1])


def ablation_table(runs: Mapping[str, str | os.PathLike[str]], *, plot: bool = True) -> str:
    """Markdown table (strategy, epochs, train loss, val recall@K) of the final epoch of each run, plus a
    recall@1 bar chart ``ablation.png`` next to the runs when validation was logged.
    """
    rows = []
    recall1: dict[str, float] = {}
    ks: list[str] = []
    for name, folder in runs.items():
        entry = _last_entry(Path(folder))
        val = entry.get("val") or {}
        for key in val:
            if key.startswith("recall@") and key not in ks:
                ks.append(key)
        rows.append((name, entry, val))
        if "recall@1" in val:
            recall1[name] = float(val["recall@1"])
    header = ["strategy", "epochs", "train InfoNCE", *ks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry, val in rows:
        infonce = entry.get("train_infonce", entry.get("train_loss"))
        cells = [name, str(entry.get("epoch")), f"{infonce:.4f}" if infonce is not None else "—"]
        cells += [f"{val[k]:.3f}" if k in val else "—" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    if plot and len(recall1) > 1:
        from talk2dino.render import bar_chart

        first = Path(next(iter(runs.values())))
        bar_chart(recall1, first.parent / "ablation.png", title="val text->image recall@1 by head selection")
    return "\n".join(lines) + "\n"
