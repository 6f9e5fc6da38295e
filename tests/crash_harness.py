"""Crash harness: SIGKILL `talk2dino extract`, `train` and `eval` at random points, resume, compare.

For every command it runs the real CLI (`talk2dino.cli.main`, the console script's entry point) on tiny
random models and tiny datasets, first uninterrupted (the reference), then once per kill point in a fresh
folder: the run is killed with SIGKILL, either at the n-th hit of a named `talk2dino.fileio.fault_point`
site (``TALK2DINO_FAULT_INJECT=<site>:<n>``) or after a random wall-clock delay, then the same command is
rerun (sometimes killed again) until it exits 0. After every kill no file under a final name may be
truncated; after the completed resume no temp file may survive and every output must equal the reference
byte for byte, except for the wall-clock fields listed in `_NORMALISED` (timings cannot repeat).

Speed: each run is a forked child of this process, which imported torch, transformers and talk2dino once
(a fresh interpreter pays ~3 s of imports per run; a fork pays milliseconds). The child is a separate
process killed by a real SIGKILL, so nothing of it survives but what it wrote to disk. This parent runs
no parallel torch code before forking (one intra-op thread), so the children inherit no thread pool.

Usage (a bigger run by hand)::

    python tests/crash_harness.py /tmp/crash --points 60 --seed 1 --report /tmp/crash/report.json

``--points`` defaults to ``$T2D_KILL_POINTS`` or 20 (per command). Exit status 0 when every point passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("crash_harness")

COMMANDS = ("extract", "train", "eval")
# Sites each command passes through (the atomic-* sites are shared by every writer).
_ATOMIC = ("atomic-mid-write", "atomic-temp-written", "atomic-before-rename", "atomic-after-rename")
SITES = {
    "extract": (*_ATOMIC, "extract-batch", "extract-mid-shard", "extract-shard-files"),
    "train": (*_ATOMIC, "train-step", "train-after-checkpoint", "train-before-log"),
    "eval": (*_ATOMIC, "eval-image", "eval-torn-line", "eval-before-results"),
}
# Fields that hold wall-clock time, so cannot repeat between two runs: dropped before comparing.
_NORMALISED = {
    "manifest.json": "extract: top-level 'updated' (time of the last manifest write)",
    "log.jsonl": "train: 'seconds' of each epoch record and of its validation",
    "checkpoint.pt": "train: 'seconds' of the log records it holds (every tensor compared exactly)",
    "results.json": "eval: 'seconds' and 'images_per_s' of each record",
    "results.md": "eval: the img/s column",
}
VOC_STEMS = tuple(f"2007_{i:06d}" for i in range(1, 7))


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def build_inputs(work: Path) -> dict[str, str]:
    """Tiny models (conftest helpers), a tiny COCO (test_extract) and a tiny VOC; returns their paths."""
    from conftest import save_tiny_clip, save_tiny_dinov2, save_tiny_projection
    from test_eval_runner import make_voc
    from test_extract import make_coco

    root = work / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_dinov2(root / "dino")
    save_tiny_clip(root / "clip")
    save_tiny_projection(root / "psi.pth")
    make_coco(root / "coco")
    make_voc(root / "voc", stems=VOC_STEMS)
    paths = {"backbone": f"local-dir:{root / 'dino'}", "text_encoder": f"local-dir:{root / 'clip'}",
             "projection": str(root / "psi.pth"), "coco": str(root / "coco"), "voc": str(root / "voc"),
             "features": str(work / "extract" / "ref" / "out")}
    (root / "paths.json").write_text(json.dumps(paths, indent=2))
    return paths


def command_argv(command: str, paths: dict[str, str]) -> tuple[list[str], str]:
    """(CLI arguments, output folder relative to the run's working directory) of one command."""
    if command == "extract":  # 9 input images, shards of 2 (5 shards), one image per batch
        return ["extract", "--coco-root", paths["coco"], "--split", "train", "--out", "out",
                "--backbone", paths["backbone"], "--text-encoder", paths["text_encoder"], "--image-size", "28",
                "--shard-size", "2", "--batch-size", "1", "--text-batch-size", "4", "--num-workers", "0",
                "--device", "cpu", "--no-progress"], "out"
    if command == "train":  # the reference extraction's features; 5 epochs of 5 steps, validation every epoch
        return ["train", "--features", paths["features"], "--val-features", paths["features"], "--out", "run",
                "--epochs", "5", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", "--resume",
                "--no-progress"], "run"
    if command == "eval":  # 6 images x 2 thresholds, predictions saved
        return ["eval", "--dataset", "voc21", "--data-root", paths["voc"], "--out", "res", "--device", "cpu",
                "--model", "talk2dino-vitb14-reg", "--backbone", paths["backbone"],
                "--text-encoder", paths["text_encoder"], "--projection", paths["projection"],
                "--short-side", "56", "--window", "28", "--stride", "14", "--bg-threshold", "0.3,0.55",
                "--save-predictions", "--no-progress"], "res"
    raise ValueError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")


# ----------------------------------------------------------------------------------------------------------
# Forked runs
# ----------------------------------------------------------------------------------------------------------


def in_child(cwd: Path, log: Path, body: Callable[[], int], *, fault: str | None = None,
             kill_after: float | None = None, counts: Path | None = None) -> tuple[str, float]:
    """Run `body` in a forked child; returns ("exit <code>" | "killed", seconds).

    Args:
        cwd: the child's working directory.
        log: the child's stdout and stderr.
        body: what the child runs; its return value is the exit code.
        fault: ``TALK2DINO_FAULT_INJECT`` for the child (None: unset).
        kill_after: SIGKILL the child after this many seconds (None: wait for it).
        counts: write the child's fault-site hit counts there as JSON (needs `fault` set).
    """
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            os.chdir(cwd)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if fault is None:
                os.environ.pop("TALK2DINO_FAULT_INJECT", None)
            else:
                os.environ["TALK2DINO_FAULT_INJECT"] = fault
            code = body()
            if counts is not None:
                from talk2dino import fileio

                counts.write_text(json.dumps(fileio._fault_hits))
        except BaseException:  # noqa: BLE001 - report anything, then leave with a distinct code
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = None if kill_after is None else start + kill_after
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if os.WIFSIGNALED(status):
        return ("killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"), seconds
    return f"exit {os.WEXITSTATUS(status)}", seconds


def cli_body(argv: list[str]) -> Callable[[], int]:
    """The child body that runs ``talk2dino <argv>``."""
    def body() -> int:
        from talk2dino.cli import main

        return main(argv)
    return body


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def _is_temp(name: str) -> bool:
    from talk2dino.fileio import temp_target

    return temp_target(name) is not None


def files_of(folder: Path) -> dict[str, Path]:
    """Relative path -> path of every file under `folder`."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def torn_files(folder: Path) -> list[str]:
    """Files under a final name (not a temp name) that are not complete, after a kill; [] when none."""
    from PIL import Image
    from safetensors.numpy import load_file

    from talk2dino.fileio import file_sha256

    problems: list[str] = []
    if not folder.is_dir():
        return problems
    for rel, path in files_of(folder).items():
        if _is_temp(path.name):
            continue
        try:
            data = path.read_bytes()
            if path.suffix == ".json":
                value = json.loads(data)
                if path.name == "manifest.json":  # every shard it lists must be there, whole
                    for entry in value["image_shards"] + value["caption_shards"]:
                        if file_sha256(path.parent / entry["file"]) != entry["sha256"]:
                            problems.append(f"{rel} lists {entry['file']} with another sha256")
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".pt":
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        problems.append(f"{rel}: corrupt zip member")
            elif path.name == "log.jsonl":
                [json.loads(line) for line in data.decode().splitlines()]
            elif path.name.startswith("progress."):  # append-only: only a torn *last* line is allowed
                [json.loads(line) for line in data.decode().splitlines(keepends=True) if line.endswith("\n")]
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".md" and not data.endswith(b"\n"):
                problems.append(f"{rel}: truncated")
        except Exception as err:  # noqa: BLE001 - any failure to read means a torn file
            problems.append(f"{rel}: {type(err).__name__}: {err}")
    return problems


def _without_seconds(value: Any) -> Any:
    """`value` without its "seconds" entries, at any depth (epoch and validation timings)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _normalise(rel: str, path: Path) -> Any:
    name = Path(rel).name
    data = path.read_bytes()
    if name == "manifest.json":
        value = json.loads(data)
        value.pop("updated", None)
        return value
    if name == "log.jsonl":
        return [_without_seconds(json.loads(line)) for line in data.decode().splitlines()]
    if name == "results.json":
        value = json.loads(data)
        for record in value["records"]:
            record.pop("seconds", None)
            record.pop("images_per_s", None)
        return value
    if name == "results.md":
        return ["|".join(line.split("|")[:-2]) for line in data.decode().splitlines()]
    if name == "checkpoint.pt":
        import torch

        value = torch.load(path, map_location="cpu", weights_only=True)
        value["log"] = _without_seconds(value["log"])
        return value
    return data


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def differences(reference: Path, candidate: Path) -> list[str]:
    """What differs between two output folders (after `_NORMALISED`), and temp files left; [] when none."""
    ref, got = files_of(reference), files_of(candidate)
    problems = [f"temp file survived: {rel}" for rel in got if _is_temp(Path(rel).name)]
    got = {rel: p for rel, p in got.items() if not _is_temp(Path(rel).name)}
    if ref.keys() != got.keys():
        missing, extra = sorted(ref.keys() - got.keys()), sorted(got.keys() - ref.keys())
        problems.append(f"files differ: missing {missing}, extra {extra}")
    for rel in sorted(ref.keys() & got.keys()):
        if not _equal(_normalise(rel, ref[rel]), _normalise(rel, got[rel])):
            problems.append(f"{rel} differs from the uninterrupted run")
    return problems


# ----------------------------------------------------------------------------------------------------------
# The campaign
# ----------------------------------------------------------------------------------------------------------


def plan_points(rng: random.Random, counts: dict[str, int], sites: tuple[str, ...], points: int,
                reference_seconds: float) -> list[dict[str, Any]]:
    """Kill points: about 3 in 4 at fault sites (each hit site in turn, a random hit), the rest at random times."""
    hit = [s for s in sites if counts.get(s, 0) > 0]
    delays = max(1, points // 4) if points > 1 else 0
    plan: list[dict[str, Any]] = []
    order: list[str] = []
    while len(plan) < points - delays:
        if not order:
            order = list(hit)
            rng.shuffle(order)
        site = order.pop()
        plan.append({"fault": f"{site}:{rng.randint(1, counts[site])}"})
    plan += [{"delay": round(rng.uniform(0.05, 1.0) * reference_seconds, 3)} for _ in range(delays)]
    rng.shuffle(plan)
    return plan


def campaign(command: str, work: Path, paths: dict[str, str], points: int, rng: random.Random) -> dict[str, Any]:
    """Reference run, counting run, then every kill point with its resumes; returns the command's report."""
    start = time.perf_counter()
    argv, out = command_argv(command, paths)
    body = cli_body(argv)
    base = work / command
    shutil.rmtree(base, ignore_errors=True)
    status, ref_seconds = in_child(base / "ref", base / "ref.log", body)
    if status != "exit 0":
        raise RuntimeError(f"{command}: the uninterrupted run failed ({status}); see {base / 'ref.log'}")
    reference = base / "ref" / out
    # The same run with the hook armed but matching nothing: hit counts per site, and the armed code paths
    # (split writes) must write the same files.
    status, _ = in_child(base / "count", base / "count.log", body, fault="no-such-site:1",
                         counts=base / "counts.json")
    counts = json.loads((base / "counts.json").read_text()) if status == "exit 0" else {}
    failures = [f"armed run: {p}" for p in (differences(reference, base / "count" / out) if counts else
                                            [f"failed ({status})"])]
    report: dict[str, Any] = {"command": command, "reference_seconds": round(ref_seconds, 2), "site_hits": counts,
                              "points": [], "failures": failures}
    for index, point in enumerate(plan_points(rng, counts, SITES[command], points, ref_seconds)):
        folder = base / f"p{index:03d}"
        log = base / f"p{index:03d}.log"
        status, _ = in_child(folder, log, body, fault=point.get("fault"), kill_after=point.get("delay"))
        entry: dict[str, Any] = {**point, "first": status, "resumes": 0, "kills": int(status == "killed")}
        problems = torn_files(folder / out) if status == "killed" else []
        if status not in ("killed", "exit 0"):
            problems.append(f"killed run ended with {status}")
        while status != "exit 0" and not problems and entry["resumes"] < 6:
            entry["resumes"] += 1
            again = entry["resumes"] <= 2 and rng.random() < 0.3  # sometimes the resume is killed too
            delay = round(rng.uniform(0.05, 1.0) * ref_seconds, 3) if again else None
            status, _ = in_child(folder, log, body, kill_after=delay)
            if status == "killed":
                entry["kills"] += 1
                problems += torn_files(folder / out)
            elif status != "exit 0":
                problems.append(f"resume {entry['resumes']} ended with {status} (log {log})")
        if status == "exit 0" and not problems:
            problems += differences(reference, folder / out)
        entry["problems"] = problems
        entry["outcome"] = "ok" if not problems else "FAIL"
        if problems:
            report["failures"].append(f"point {index} {point}: {problems}")
            logger.error("%s point %d %s: %s", command, index, point, problems)
        else:
            shutil.rmtree(folder)  # keep failing folders only
        report["points"].append(entry)
    report["kills"] = sum(p["kills"] for p in report["points"])
    report["resumes"] = sum(p["resumes"] for p in report["points"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _warm_imports() -> None:
    """Import here what the runs import lazily (~3 s, mostly transformers), so that forked runs start warm."""
    import importlib

    for name in ("talk2dino.cli", "talk2dino.evaluation.runner", "talk2dino.extract.run", "talk2dino.training.run",
                 "talk2dino.render", "safetensors.torch", "safetensors.numpy", "tqdm",
                 "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                 "transformers.models.dinov2.modeling_dinov2",
                 "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
                 "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip"):
        try:
            importlib.import_module(name)
        except ImportError:  # only a speed-up; a missing optional module is imported (or fails) in the run
            logger.debug("cannot pre-import %s", name)
    import transformers

    for name in ("AutoModel", "AutoConfig", "AutoTokenizer", "CLIPTextModelWithProjection", "CLIPTokenizer",
                 "Dinov2Model", "Dinov2WithRegistersModel"):
        getattr(transformers, name, None)


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; writes the JSON report and returns 0 when every point passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="working folder (inputs, runs, logs)")
    parser.add_argument("--points", type=int, default=int(os.environ.get("T2D_KILL_POINTS", "20")),
                        help="kill points per command (default $T2D_KILL_POINTS or 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill-point draw")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma list of extract,train,eval")
    parser.add_argument("--report", type=Path, default=None, help="JSON report (default WORK/report.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    torch.set_num_threads(1)  # before any torch op: no thread pool for the forked children to inherit
    _warm_imports()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    status, _ = in_child(work, work / "inputs.log", lambda: (build_inputs(work), 0)[1])
    if status != "exit 0":
        logger.error("building the inputs failed (%s); see %s", status, work / "inputs.log")
        return 2
    paths = json.loads((work / "inputs" / "paths.json").read_text())
    rng = random.Random(args.seed)
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    if "train" in commands and "extract" not in commands and not Path(paths["features"]).is_dir():
        commands.insert(0, "extract")  # train reads the reference extraction
    reports = []
    for command in commands:
        report = campaign(command, work, paths, args.points, rng)
        reports.append(report)
        logger.info("%s: %d points, %d kills, %d resumes, %d failures, %.1fs", command, len(report["points"]),
                    report["kills"], report["resumes"], len(report["failures"]), report["seconds"])
    summary = {"seed": args.seed, "points_per_command": args.points, "normalised": _NORMALISED, "commands": reports}
    (args.report or work / "report.json").write_text(json.dumps(summary, indent=2))
    return 1 if any(r["failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
