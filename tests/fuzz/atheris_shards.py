"""Coverage-guided fuzzing of extracted features: shard files and manifests.

    python tests/fuzz/atheris_shards.py -runs=20000 tests/fuzz/corpus/shards/files

Each input is loaded as an image shard (``read_shard``) and as the ``manifest.json`` of a folder holding one
valid shard pair (``load_features`` and ``iter_shards``). Only one-line ``Talk2DinoError``
refusals are allowed, and no file outside the folder may be read.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Third-party heavyweights are imported before instrumenting, so that only our parsers get instrumented
# (instrumenting torch takes minutes at start-up and steers the fuzzer towards code that is not ours).
import numpy  # noqa: F401
import torch  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parser_fuzz_support import instrumented  # noqa: E402

with instrumented():
    from talk2dino.data.features import IMAGE_KEYS, iter_shards, load_features, read_shard
    from talk2dino.errors import Talk2DinoError

from make_corpus import caption_tensors, image_tensors  # noqa: E402
from parser_fuzz_support import check_message  # noqa: E402
from safetensors.torch import save  # noqa: E402

_SCRATCH = Path(tempfile.mkdtemp(prefix="t2d-atheris-shards-"))
_FOLDER = _SCRATCH / "features"
_FOLDER.mkdir()
(_FOLDER / "images-000-00000.safetensors").write_bytes(save(image_tensors()))
(_FOLDER / "captions-000-00000.safetensors").write_bytes(save(caption_tensors([1, 2])))
(_SCRATCH / "outside.safetensors").write_bytes(save(image_tensors()))
_READ: list[Path] = []
_ORIGINAL_READ_BYTES = Path.read_bytes


def _spy(self: Path) -> bytes:
    _READ.append(self)
    return _ORIGINAL_READ_BYTES(self)




def test_one_input(data: bytes) -> None:
    """Load ``data`` as an image shard and as a manifest; only clean Talk2DinoErrors are allowed."""
    _READ.clear()
    shard = _SCRATCH / "shard.safetensors"
    shard.write_bytes(data)
    (_FOLDER / "manifest.json").write_bytes(data)
    for load in (lambda: read_shard(shard, IMAGE_KEYS), lambda: load_features(_FOLDER),
                 lambda: list(iter_shards(_FOLDER))):
        try:
            load()
        except Talk2DinoError as exc:
            check_message(exc)
    # Only under atheris (main installs the spy); a replay from pytest leaves Path alone.
    root = _FOLDER.resolve()
    escaped = [p for p in _READ if p.name != "shard.safetensors" and root not in p.resolve().parents]
    assert not escaped, f"read outside the features folder: {escaped}"


def main() -> None:
    """Run atheris over ``test_one_input`` with the command-line options of libFuzzer."""
    import atheris

    Path.read_bytes = _spy  # type: ignore[method-assign]
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
