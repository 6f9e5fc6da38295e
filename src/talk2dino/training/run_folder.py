"""The run folder of `talk2dino train`: its files, checkpoints, resume checks and the log history.

The run folder (``TrainConfig.out``) after every epoch::

    checkpoint.pt            psi, Adam state, epochs done, step, RNG states, config, log history
                             (the commit point; written to a temp file and renamed)
    talk2dino.json           ModelConfig naming the backbone and text encoder of the features,
    projection.safetensors   psi, and projection.json with the training metadata: the folder
    projection.json          loads with ``create_model("local-dir:OUT")``
    train_config.json        the effective TrainConfig
    log.jsonl                one line per epoch: losses, lr, seconds, val recall@K, head histogram

The model files and the log are derived from the checkpoint and rewritten from it on ``resume``,
so a crash or a full disk at any point loses at most the epoch in progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from talk2dino.config import ModelConfig, TrainConfig
from talk2dino.errors import Talk2DinoError
from talk2dino.fileio import atomic_path, fault_point, json_bytes, remove_temps
from talk2dino.models.projection import PROJECTION_CONFIG_FILE, PROJECTION_FILE, Projection
from talk2dino.registry import MODEL_CONFIG_FILE, save_model_folder

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = "talk2dino-train-checkpoint/1"
RUN_FILES = (CHECKPOINT_FILE, TRAIN_CONFIG_FILE, LOG_FILE, MODEL_CONFIG_FILE, PROJECTION_FILE, PROJECTION_CONFIG_FILE)
# TrainConfig fields a resumed run may change: none of them alters the trained weights.
# (`features` may move; the features themselves are compared through their manifest summary.)
RESUMABLE_FIELDS = frozenset(
    {"features", "val_features", "epochs", "device", "on_device", "eval_every", "recall_ks", "val_max_images"}
)


class TrainingError(Talk2DinoError):
    """A run folder cannot be used, a resume does not match, or a run file cannot be written."""


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """JSON form of the config (tuples as lists), comparable with a reloaded train_config.json."""
    return dict(json.loads(json.dumps(dataclasses.asdict(config))))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Durable atomic write of `path` through `write(handle)` (see `talk2dino.fileio.atomic_path`).

    Raises:
        TrainingError: naming `path`, when anything fails (disk full, permissions); the old file is intact.
    """
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
            write(handle)
    except Exception as err:  # OSError, or torch's RuntimeError wrapping one
        raise TrainingError(
            f"{path}: could not write ({type(err).__name__}: {err}); the previous {path.name} is intact. "
            "Free disk space (or fix permissions), then rerun with --resume"
        ) from err


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda h: h.write(json_bytes(value)))


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    # The whole log is rewritten each epoch: it is tiny, and a torn last line is impossible.
    _atomic_write(path, lambda h: h.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in history).encode()))


def write_train_config(out: Path, config: TrainConfig) -> None:
    """Write ``train_config.json`` (the effective `config`) into the run folder `out`, atomically.

    Raises:
        TrainingError: naming the file when it cannot be written.
    """
    _write_json(out / TRAIN_CONFIG_FILE, config_dict(config))


def save_checkpoint(out: Path, *, epoch: int, step: int, psi: Projection, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, features: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Commit an epoch: write ``checkpoint.pt`` (psi on CPU, optimiser and RNG states, config, features
    summary, log history) atomically; everything else in the run folder is derived from it.

    Args:
        out: the run folder.
        epoch: epochs done; step: optimiser steps done.
        psi: the projection; optimizer: its optimiser.
        config: the run's configuration; features: the features summary of `talk2dino.training.run`.
        history: one log record per epoch done.

    Raises:
        TrainingError: naming the file when it cannot be written; the previous checkpoint is intact.
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "step": step,
        "psi": {k: v.detach().to("cpu").clone() for k, v in psi.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "config": config_dict(config),
        "features": features,
        "log": list(history),
    }
    _atomic_write(out / CHECKPOINT_FILE, lambda h: torch.save(checkpoint, h))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint this trainer wrote (on CPU, weights-only unpickling).

    Raises:
        TrainingError: the file is torn, foreign or of another format.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip / unpickling errors: a torn or foreign file
        from talk2dino.weights import describe_load_error  # one line, naming a refused global (issue 8)

        raise TrainingError(
            f"{path}: unreadable checkpoint ({describe_load_error(err)}); it is not a file this trainer wrote "
            "completely. Move it away to restart the run from scratch"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return dict(state)


def inspect_out(out: Path, *, resume: bool) -> tuple[bool, dict[str, Any] | None]:
    """Check the run folder before anything is loaded or written.

    Returns:
        (holds_run, checkpoint): whether `out` holds a run of ours; its checkpoint, when resuming one.

    Raises:
        TrainingError: `out` is a file, holds files we did not write (a released checkpoint, a model
            folder, features), or holds a run while `resume` is off.
    """
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; give a folder for the run")
    if not out.is_dir():
        return False, None
    for name in remove_temps(out, RUN_FILES):
        logger.info("%s: deleted %s, a temp file left by an interrupted run", out, name)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise TrainingError(
            f"--out {out} holds files not written by `talk2dino train` ({', '.join(foreign[:5])}); "
            "training never writes next to released weights or other data: choose a new or empty folder"
        )
    holds_run = (out / TRAIN_CONFIG_FILE).is_file()
    if not holds_run:
        leftovers = sorted(p.name for p in out.iterdir())
        if leftovers:
            raise TrainingError(
                f"--out {out} holds a model folder ({', '.join(leftovers)}) but no {TRAIN_CONFIG_FILE}: it was not "
                "written by `talk2dino train`; choose a new or empty folder"
            )
        return False, None
    if not resume:
        raise TrainingError(
            f"--out {out} already holds a training run; pass --resume to continue it, or choose a new folder"
        )
    checkpoint_path = out / CHECKPOINT_FILE
    return True, load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None


def check_same_run(config: TrainConfig, saved: dict[str, Any], *, origin: Path) -> None:
    """Refuse to resume with settings that would change the trained weights (all but `RESUMABLE_FIELDS`).

    Raises:
        TrainingError: listing each differing field with its saved and current value.
    """
    current = config_dict(config)
    names = sorted((set(current) | set(saved)) - RESUMABLE_FIELDS)
    differing = [f"{n}: run {saved.get(n)!r} vs now {current.get(n)!r}" for n in names
                 if saved.get(n) != current.get(n)]
    if differing:
        raise TrainingError(
            f"{origin}: cannot resume, the run was started with another configuration ({'; '.join(differing)}); "
            "use the run's settings or a new --out"
        )


def write_derived_files(out: Path, model_config: ModelConfig, psi: Projection, history: list[dict[str, Any]],
                        metadata: dict[str, Any]) -> None:
    """Write the model folder (talk2dino.json, projection.*) and log.jsonl from the committed state.

    Raises:
        TrainingError: naming the folder when a write fails (the checkpoint already holds everything).
    """
    try:
        save_model_folder(out, model_config, psi, metadata)
    except Exception as err:  # safetensors and OSError; atomic_path already removed its temp files
        raise TrainingError(
            f"{out}: could not write the model files ({type(err).__name__}: {err}); {CHECKPOINT_FILE} is intact. "
            "Free disk space, then rerun with --resume"
        ) from err
    fault_point("train-before-log")
    _write_log(out / LOG_FILE, history)


def derived_files_current(out: Path, psi: Projection, history: list[dict[str, Any]], epoch: int) -> bool:
    """Whether the model files and the log in `out` already match the committed state (psi, history, epoch)."""
    from safetensors.torch import load_file

    try:
        lines = (out / LOG_FILE).read_text(encoding="utf-8").splitlines()
        if [json.loads(line) for line in lines] != history:
            return False
        info = json.loads((out / PROJECTION_CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("epoch") != epoch or not (out / MODEL_CONFIG_FILE).is_file():
            return False
        saved = load_file(str(out / PROJECTION_FILE))
    except Exception:  # missing, torn or unreadable: rewrite from the checkpoint
        return False
    state = psi.state_dict()
    return set(saved) == set(state) and all(torch.equal(saved[k], state[k].cpu()) for k in state)


def code_version() -> dict[str, Any]:
    """The talk2dino and torch versions, and the git commit when running from our own checkout."""
    from talk2dino import __version__

    commit = None
    package_src = Path(__file__).resolve().parents[2]  # .../src when running from a checkout
    try:
        proc = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_src, capture_output=True,
                              text=True, timeout=5, check=False)
        lines = proc.stdout.split()
        # only our own checkout counts, not some repository a virtual environment happens to live in
        if proc.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() / "src" == package_src:
            commit = lines[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"talk2dino": __version__, "git_commit": commit, "torch": torch.__version__}


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA) and Python RNG states, for an exact resume."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the states `rng_state` returned (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

