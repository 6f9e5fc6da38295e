"""Package boundaries (house-style §2) and a silent, light import (house-style §7).

The library (models/, ops/, data/, render/, the predictor and its helpers, the factory and the registry, and the
base modules they stand on) never imports the layers built on it; data/ never imports render/; no private name
(``_x``) crosses from one package to another. "Package" here is a sub-package of talk2dino (``models``,
``server``, ...) or, for a top-level module, that module itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "talk2dino"
UPPER = ("cli", "server", "training", "evaluation", "extract", "onnx", "bench")
LIBRARY_PACKAGES = ("models", "ops", "data", "render")
LIBRARY_MODULES = ("predictor", "prepare", "postprocess", "results", "vocabulary", "factory", "registry", "catalog",
                   "config", "weights", "errors", "fileio", "labels", "compat")
# The factory builds a Talk2DINO from an ONNX export folder (`load_onnx_model`): it may use the runtime parts.
ALLOWED = {("factory", "onnx.runtime")}


def _unit(parts: tuple[str, ...]) -> str:
    """The package of a module below talk2dino: its sub-package, or the top-level module itself."""
    return parts[0].removesuffix(".py")


def _modules() -> Iterator[tuple[Path, tuple[str, ...]]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, path.relative_to(SRC).parts


def _talk2dino_imports(tree: ast.AST) -> Iterator[tuple[ast.AST, str, list[str]]]:
    """(node, imported module below talk2dino as "a.b", imported names) for every import of talk2dino code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("talk2dino."):
                    yield node, alias.name.removeprefix("talk2dino."), []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            if node.module == "talk2dino":
                for name in names:  # `from talk2dino import render`: the sub-package itself
                    yield node, name, []
            elif node.module.startswith("talk2dino."):
                yield node, node.module.removeprefix("talk2dino."), names


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _library_files() -> list[Path]:
    files = [path for package in LIBRARY_PACKAGES for path in sorted((SRC / package).rglob("*.py"))]
    return files + [SRC / f"{name}.py" for name in LIBRARY_MODULES if (SRC / f"{name}.py").is_file()]


def test_library_never_imports_upper_layers() -> None:
    offenders = []
    for path in _library_files():
        unit = _unit(path.relative_to(SRC).parts)
        for _, module, _names in _talk2dino_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.split(".")[0] in UPPER and (unit, module) not in ALLOWED:
                offenders.append(f"{path.relative_to(SRC)}: talk2dino.{module}")
    assert not offenders, "the library imports an upper layer:\n" + "\n".join(offenders)


def test_data_never_imports_render() -> None:
    offenders = [
        f"{path.relative_to(SRC)}: talk2dino.{module}"
        for path in sorted((SRC / "data").rglob("*.py"))
        for _, module, _names in _talk2dino_imports(ast.parse(path.read_text(encoding="utf-8")))
        if module.split(".")[0] == "render"
    ]
    assert not offenders, "\n".join(offenders)


def test_no_private_name_crosses_a_package() -> None:
    offenders = []
    for path, parts in _modules():
        unit = _unit(parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_aliases: dict[str, str] = {}  # local name -> the talk2dino module it is bound to
        for node, module, names in _talk2dino_imports(tree):
            target = module.split(".")[0]
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != unit:
                    offenders.append(f"{path.relative_to(SRC)}: {name} from talk2dino.{module}")
                if _is_module(f"{module}.{name}"):
                    module_aliases[name] = f"{module}.{name}"
            if isinstance(node, ast.ImportFrom) and node.module == "talk2dino":
                module_aliases[module] = module
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        module_aliases[alias.asname] = alias.name.removeprefix("talk2dino.")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and module_aliases[node.value.id].split(".")[0] != unit):
                offenders.append(f"{path.relative_to(SRC)}: {node.value.id}.{node.attr}")
    assert not offenders, "private names used across packages:\n" + "\n".join(sorted(set(offenders)))


@pytest.mark.parametrize("package", ["models", "ops"])
def test_core_never_imports_upper_layers(package: str) -> None:
    """The innermost packages also stay below the predictor and the factory."""
    offenders = []
    for path in (SRC / package).rglob("*.py"):
        for _, module, _names in _talk2dino_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.split(".")[0] in (*UPPER, "predictor", "factory", "render"):
                offenders.append(f"{path.name}: talk2dino.{module}")
    assert not offenders


def test_the_checks_see_what_they_should() -> None:
    """The AST helpers find lazy imports inside functions and `from talk2dino import x` forms."""
    code = "def f():\n    from talk2dino import cli\n    import talk2dino.server.app as app\n    return app._x\n"
    found = [module for _, module, _ in _talk2dino_imports(ast.parse(code))]
    assert found == ["cli", "server.app"]


def test_import_is_silent_and_does_not_load_torch() -> None:
    code = "import sys, talk2dino; assert 'torch' not in sys.modules, 'torch imported'; print(talk2dino.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
