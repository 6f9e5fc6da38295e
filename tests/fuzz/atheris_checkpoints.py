"""atheris harness: bytes -> the checkpoint, model-config and recipe loaders (issue 8).

Only exceptions that are not `Talk2DinoError` count as crashes, and so does a multi-line error message.
The first input byte picks the parser; the rest is the file. Run, for example::

    mkdir -p /tmp/t2d-new && python tests/fuzz/atheris_checkpoints.py -max_total_time=300 /tmp/t2d-new \\
        tests/fuzz/corpus/checkpoints tests/fuzz/corpus/checkpoints/model-configs tests/fuzz/corpus/recipes

libFuzzer writes new inputs into the first folder, so keep a scratch folder first, never the committed
corpus. A corpus file's first byte picks its parser; libFuzzer's mutations reach the others.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401 - imported uninstrumented first: instrumenting torch takes minutes
import yaml  # noqa: F401

with atheris.instrument_imports(include=["talk2dino", "safetensors", "yaml", "json"]):
    from talk2dino.cli.flags import build_config
    from talk2dino.cli.recipes import load_recipe
    from talk2dino.config import ProjectionConfig, TrainConfig
    from talk2dino.errors import Talk2DinoError
    from talk2dino.factory import load_projection
    from talk2dino.registry import MODEL_CONFIG_FILE, get_model_config

logging.disable(logging.CRITICAL)  # the loaders log each refusal; that is not a finding
_WORK = Path(tempfile.mkdtemp(prefix="t2d-atheris-"))
_SUFFIXES = (".pth", ".safetensors", ".bin")


def _parse(kind: int, data: bytes) -> None:
    if kind < 3:  # checkpoints through the real psi entry point
        path = _WORK / f"psi{_SUFFIXES[kind]}"
        path.write_bytes(data)
        load_projection(ProjectionConfig(source=str(path)), out_dim=8, pretrained=True, cache_dir=_WORK / "cache")
    elif kind == 3:  # a model folder's talk2dino.json
        (_WORK / MODEL_CONFIG_FILE).write_bytes(data)
        get_model_config(f"local-dir:{_WORK}")
    else:  # a YAML recipe
        path = _WORK / "recipe.yaml"
        path.write_bytes(data)
        build_config(TrainConfig, recipe=load_recipe(path))


def test_one_input(data: bytes) -> None:
    """libFuzzer entry point."""
    if not data:
        return
    kind, body = data[0] % 5, data[1:]
    try:
        _parse(kind, body)
    except Talk2DinoError as err:
        if "\n" in str(err) or not str(err):
            raise AssertionError(f"error message is not one line: {str(err)!r}") from err


def main() -> None:
    """Run libFuzzer over `sys.argv` (corpus folders, -runs=N, -max_total_time=S, ...)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
