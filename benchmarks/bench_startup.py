"""Start-up cost of the ``talk2dino`` command (issue 12, item 5): wall time of fresh processes and what they import.

For each command (``--help``, ``--version``, ``models``, every subcommand's ``--help``, and one ``segment`` of
``examples/rocket.jpg`` with a tiny random local model), the script runs ``talk2dino.cli.main(argv)`` in
fresh interpreters and reports:

- **wall**: process start to exit, seen from this script; best and median of ``--repeats`` runs (other
  processes on a shared machine only ever add time, so the best is the figure to compare);
- **imports**: the sum of the self times of the modules imported, under ``python -X importtime``; the best of
  ``--import-repeats`` extra runs (not in the wall figures: the flag itself slows imports down a little);
- whether **torch** and **transformers** were imported, and which other heavy modules were (``sys.modules``
  at exit, written by the child to a side file).

The tiny model (a 2-layer DINOv2 with registers, a 2-layer CLIP text tower with the real CLIP tokenizer, and a
psi) is built with the helpers of ``tests/conftest.py`` into a temporary folder, or read from ``--model-dir``
when it already holds ``dino/``, ``clip/`` and ``psi.pth``. Nothing is downloaded.

Usage::

    python benchmarks/bench_startup.py                       # ~1 min on 2 cores
    python benchmarks/bench_startup.py --repeats 10 --json startup.json
    python benchmarks/bench_startup.py --compare OTHER/src   # before -> after: OTHER's package against this one

With ``--compare`` both checkouts run every command, alternating run by run, so that a busy shared machine
slows both alike; ``git worktree add /tmp/t2d-before HEAD`` gives the committed tree to compare with.

See benchmarks/README.md ("Start-up").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "rocket.jpg"
HEAVY = ("torch", "transformers", "torch._dynamo", "torch.distributed.tensor", "scipy", "sympy", "cv2", "PIL",
         "numpy", "onnx", "onnxruntime", "fastapi", "uvicorn", "yaml")

# Run in the child: main(argv), then record the interesting modules of sys.modules and where talk2dino came from.
CHILD = """
import json, sys
report, heavy, argv = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
from talk2dino.cli import main
try:
    code = main(argv)
except SystemExit as exc:  # --help exits from argparse
    code = exc.code
import talk2dino
with open(report, "w", encoding="utf-8") as handle:
    json.dump({"code": code, "package": talk2dino.__file__,
               "modules": [name for name in heavy if name in sys.modules]}, handle)
"""

IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def commands(model: dict[str, str] | None, out: Path) -> list[tuple[str, list[str]]]:
    """(shown name, argv) of every measured command; the segment row needs the tiny model."""
    rows: list[tuple[str, list[str]]] = [("--help", ["--help"]), ("--version", ["--version"]), ("models", ["models"])]
    for sub in ("segment", "serve", "eval", "extract", "train", "convert", "export-onnx"):
        rows.append((f"{sub} --help", [sub, "--help"]))
    if model is not None:
        rows.append(("segment (tiny model)",
                     ["segment", str(PHOTO), "--labels", "rocket,sky,smoke,tree", "--backbone", model["backbone"],
                      "--text-encoder", model["text_encoder"], "--projection", model["projection"],
                      "--device", "cpu", "--no-progress", "--out", str(out)]))
    return rows


def run_child(argv: list[str], folder: Path, src: Path | None, *, importtime: bool = False) -> dict[str, Any]:
    """One fresh interpreter running ``main(argv)`` (the package in `src` when given, else the installed one):
    wall time, exit code, imported modules (and import time)."""
    report = folder / "child.json"
    report.unlink(missing_ok=True)
    flags = ["-X", "importtime"] if importtime else []
    cmd = [sys.executable, *flags, "-c", CHILD, str(report), ",".join(HEAVY), *argv]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record: dict[str, Any] = {"wall_s": wall, **json.loads(report.read_text(encoding="utf-8"))}
    if record["code"] not in (0, None):
        raise RuntimeError(f"{' '.join(argv)} exited {record['code']}:\n{proc.stderr[-3000:]}")
    if importtime:
        rows = [(int(m[1]), int(m[2]), m[4]) for m in map(IMPORT_LINE.match, proc.stderr.splitlines()) if m]
        record["import_s"] = sum(own for own, _, _ in rows) / 1e6
        record["slowest_imports"] = [(name, cumulative / 1e6) for _, cumulative, name in
                                     sorted(rows, key=lambda row: -row[1])[:15]]
    return record


def build_tiny_model(folder: Path) -> dict[str, str] | None:
    """The tiny DINOv2-reg, CLIP text tower and psi of tests/conftest.py in `folder` (None: no CLIP BPE file)."""
    sources = {"backbone": f"local-dir:{folder / 'dino'}", "text_encoder": f"local-dir:{folder / 'clip'}",
               "projection": str(folder / "psi.pth")}
    if (folder / "dino").is_dir() and (folder / "clip").is_dir() and (folder / "psi.pth").is_file():
        return sources
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import BPE, save_tiny_clip, save_tiny_dinov2, save_tiny_projection

    if not BPE.is_file():
        print(f"CLIP BPE vocabulary missing ({BPE}): the segment row is left out", file=sys.stderr)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_dinov2(folder / "dino")
    save_tiny_clip(folder / "clip")
    save_tiny_projection(folder / "psi.pth")
    return sources


def machine() -> dict[str, Any]:
    """Python, torch and transformers versions (read without importing them), CPU and load."""
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), **versions, "cpu": cpu, "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown, one row per command; with two checkouts every cell reads "compared -> current"."""

    def cell(rec: dict[str, Any], value: Any) -> str:
        shown = [value(tree) for tree in rec["trees"].values()]
        return " → ".join(shown) if len(set(shown)) > 1 else shown[0]

    lines = ["| command | wall best (s) | wall median (s) | imports (s, -X importtime) | torch | transformers | "
             "other heavy modules |", "|---|--:|--:|--:|:-:|:-:|---|"]
    for rec in results:
        def other(tree: dict[str, Any]) -> str:
            return ", ".join(m for m in tree["modules"] if m not in ("torch", "transformers")) or "–"

        lines.append(" | ".join([
            f"| `{rec['command']}`",
            cell(rec, lambda tree: f"{min(tree['walls']):.2f}"),
            cell(rec, lambda tree: f"{statistics.median(tree['walls']):.2f}"),
            cell(rec, lambda tree: f"{tree['import_s']:.2f}"),
            cell(rec, lambda tree: "yes" if "torch" in tree["modules"] else "no"),
            cell(rec, lambda tree: "yes" if "transformers" in tree["modules"] else "no"),
            cell(rec, other),
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed fresh processes per command (5)")
    parser.add_argument("--import-repeats", type=int, default=2, help="-X importtime runs per command (2)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder for the tiny model (reused when it holds one; default: a temporary folder)")
    parser.add_argument("--no-segment", action="store_true", help="leave out the tiny segment row")
    parser.add_argument("--only", default=None,
                        help='comma-separated subset of the shown command names, e.g. "--help,segment (tiny model)"')
    parser.add_argument("--compare", type=Path, default=None,
                        help="the src/ folder of another checkout, measured alternately with this one (before)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    args = parser.parse_args()
    trees: dict[str, Path | None] = {"current": None}
    if args.compare is not None:
        trees = {"compared": args.compare.resolve(), **trees}
    with tempfile.TemporaryDirectory(prefix="t2d-startup-") as tmp:
        work = Path(tmp)
        model = None if args.no_segment else build_tiny_model(args.model_dir or work / "tiny")
        results = []
        for name, argv in commands(model, work / "out"):
            if args.only and name not in args.only.split(","):
                continue
            print(f"{name} ...", file=sys.stderr)
            timed: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
            for src in trees.values():  # warm the file cache; the first run after a change compiles .pyc files
                run_child(argv, work, src)
            for _ in range(args.repeats):
                for tree, src in trees.items():
                    timed[tree].append(run_child(argv, work, src))
            record: dict[str, Any] = {"command": name, "argv": argv, "trees": {}}
            for tree, src in trees.items():
                probe = min((run_child(argv, work, src, importtime=True) for _ in range(args.import_repeats)),
                            key=lambda r: r["import_s"])
                record["trees"][tree] = {"walls": [r["wall_s"] for r in timed[tree]],
                                         "modules": timed[tree][-1]["modules"], "package": timed[tree][-1]["package"],
                                         "import_s": probe["import_s"], "slowest_imports": probe["slowest_imports"]}
            results.append(record)
    info = machine()
    for tree in trees:
        print(f"{tree}: talk2dino from {results[0]['trees'][tree]['package'] if results else '?'}")
    print(f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, {info['cpu']} "
          f"({info['cpu_count']} logical CPUs), load average at the end {info['load_average']}")
    print()
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
