"""Package boundaries (house-style §2) and a silent, light import (house-style §7)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "talk2dino"
FORBIDDEN = ("cli", "server", "training", "evaluation", "extract", "bench")


@pytest.mark.parametrize("package", ["models", "ops"])
def test_core_never_imports_upper_layers(package: str) -> None:
    offenders = []
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[0] == "talk2dino" and len(parts) > 1 and parts[1] in FORBIDDEN:
                    offenders.append(f"{path.name}: {name}")
    assert not offenders


def test_import_is_silent_and_does_not_load_torch() -> None:
    code = "import sys, talk2dino; assert 'torch' not in sys.modules, 'torch imported'; print(talk2dino.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
