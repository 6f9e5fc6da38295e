"""Crash safety: the fault-injection hook, atomic writes under SIGKILL, and the kill/resume campaign.

The campaign (`tests/crash_harness.py`, marked slow) SIGKILLs `talk2dino extract`, `train` and `eval` at
``$T2D_KILL_POINTS`` (default 20) points per command and checks that every resumed run ends byte-identical
to an uninterrupted one. The fast tests here pin the pieces it relies on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BPE

from talk2dino import fileio
from talk2dino.evaluation.runner import ProgressCache
from talk2dino.extract.shards import canonical_safetensors

HARNESS = Path(__file__).resolve().parent / "crash_harness.py"


def _write_twice(path: Path, fault: str) -> subprocess.CompletedProcess[str]:
    """In a fresh interpreter, write `path` twice (b"old..." then b"new...") with the hook armed by `fault`."""
    code = ("import sys; from talk2dino.fileio import atomic_write_bytes as w; p = sys.argv[1]; "
            "w(p, b'old' * 100, durable=True); w(p, b'new' * 100, durable=True)")
    env = {**os.environ, fileio.FAULT_ENV: fault}
    return subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_fault_point_is_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(fileio.FAULT_ENV, raising=False)
    before = dict(fileio._fault_hits)
    for site in fileio.FAULT_SITES:
        fileio.fault_point(site)
    fileio.atomic_write_bytes(tmp_path / "a.bin", b"data")
    assert fileio._fault_hits == before and (tmp_path / "a.bin").read_bytes() == b"data"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_before_rename_keeps_the_old_file_and_the_temp_is_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    proc = _write_twice(target, "atomic-before-rename:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_bytes() == b"old" * 100  # the final name holds the complete old file
    temps = [p for p in tmp_path.iterdir() if p != target]
    assert len(temps) == 1 and fileio.temp_target(temps[0].name) == "manifest.json"
    assert temps[0].read_bytes() == b"new" * 100
    assert fileio.remove_temps(tmp_path, ["manifest.json"]) == [temps[0].name]
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_mid_write_leaves_a_torn_temp_never_a_torn_final_file(tmp_path: Path) -> None:
    target = tmp_path / "images-000-00000.safetensors"
    proc = _write_twice(target, "atomic-mid-write:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    (temp,) = tmp_path.iterdir()
    assert fileio.temp_target(temp.name) == target.name and temp.read_bytes() == b"old" * 50
    proc = _write_twice(target, "atomic-after-rename:2")  # renamed, then killed: the new file is complete
    assert proc.returncode == -signal.SIGKILL and target.read_bytes() == b"new" * 100


def test_eval_cache_cuts_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "progress.rank0.jsonl"
    whole = json.dumps({"name": "a", "counts": [[0, 0, 5]]}) + "\n"
    torn = json.dumps({"name": "b", "counts": [[1, 1, 7]]})[:15]
    path.write_text(whole + torn, encoding="utf-8")
    cache = ProgressCache(path)
    assert set(cache.done) == {"a"}
    cache.add({"name": "b", "counts": [[1, 1, 7]]})  # must not be glued onto the torn fragment
    cache.close()
    assert path.read_text(encoding="utf-8") == whole + json.dumps({"name": "b", "counts": [[1, 1, 7]]}) + "\n"
    assert set(ProgressCache(path).done) == {"a", "b"}


def test_shard_bytes_do_not_depend_on_the_metadata_order() -> None:
    from safetensors.torch import load, save

    tensors = {"b": torch.arange(3, dtype=torch.int64), "a": torch.ones(2, 5, dtype=torch.float16)}
    one = canonical_safetensors(save(tensors, metadata={"rank": "0", "format": "f", "index": "1"}))
    two = canonical_safetensors(save(tensors, metadata={"index": "1", "format": "f", "rank": "0"}))
    assert one == two and canonical_safetensors(one) == one
    loaded = load(one)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    size = int.from_bytes(one[:8], "little")
    assert size % 8 == 0  # tensor data stays 8-byte aligned, as the writer keeps it
    assert list(json.loads(one[8:8 + size])["__metadata__"]) == ["format", "index", "rank"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its runs")
def test_sigkill_campaign_resumes_to_identical_outputs(tmp_path: Path) -> None:
    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary missing: {BPE}")
    points = int(os.environ.get("T2D_KILL_POINTS", "20"))
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(HARNESS), str(tmp_path / "work"), "--points", str(points),
                           "--report", str(report_path)], capture_output=True, text=True, timeout=1800)
    assert report_path.is_file(), proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failures = [f for command in report["commands"] for f in command["failures"]]
    assert proc.returncode == 0 and not failures, failures[:5] or proc.stderr[-3000:]
    for command in report["commands"]:
        assert len(command["points"]) == points
        killed = sum(p["first"] == "killed" for p in command["points"])
        assert killed >= points * 3 // 4, (command["command"], killed)  # fault-site points always kill
        assert all(p["outcome"] == "ok" for p in command["points"])
