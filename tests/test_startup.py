"""Start-up cost (issue 12, item 5): commands that load no model import neither torch nor transformers.

Each case runs in a fresh interpreter, since this test process has long imported both. The figures are in
benchmarks/bench_startup.py and benchmarks/README.md ("Start-up").
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

CHECK = """
import sys
from talk2dino.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help exits from argparse
    code = exc.code
loaded = [name for name in {heavy!r} if name in sys.modules]
assert not loaded, f"main({{sys.argv[1:]}}) imported {{loaded}}"
sys.exit(0 if code in (0, None) else 10 + code)
"""


def _run(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False,
                          timeout=120)


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["models"],
    *([sub, "--help"] for sub in ("segment", "serve", "eval", "extract", "train", "convert", "export-onnx")),
], ids=" ".join)
def test_model_free_commands_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    proc = _run(CHECK.format(heavy=HEAVY), *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if argv == ["models"]:
        assert "talk2dino-vitb14-reg\t" in proc.stdout


def test_no_command_prints_help_without_heavy_imports() -> None:
    proc = _run(CHECK.format(heavy=HEAVY))
    assert proc.returncode == 12, proc.stderr[-2000:]  # exit code 2: usage
    assert "usage: talk2dino" in proc.stderr


def test_list_models_reads_the_names_without_torch() -> None:
    code = ("import sys, talk2dino; names = talk2dino.list_models(); "
            f"assert not [n for n in {HEAVY!r} if n in sys.modules], sorted(sys.modules); print(names[0])")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "talk2dino-vitb14-reg"


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "talk2dino", "--version"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("talk2dino ")
