"""Coverage-guided fuzzing of dataset input: class-names files, label maps, split files and COCO JSON.

    python tests/fuzz/atheris_datasets.py -runs=20000 tests/fuzz/corpus/datasets/captions \
        tests/fuzz/corpus/datasets/classes tests/fuzz/corpus/datasets/label_png

Each input is given, as the file's content, to every parser in turn. Only one-line ``Talk2DinoError`` refusals
are allowed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# Third-party heavyweights are imported before instrumenting, so that only our parsers get instrumented
# (instrumenting torch takes minutes at start-up and steers the fuzzer towards code that is not ours).
import numpy  # noqa: F401
import torch  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parser_fuzz_support import instrumented  # noqa: E402

with instrumented():
    from talk2dino.data import coco_masks, converters
    from talk2dino.data.benchmarks import folder_benchmark, read_class_names_file
    from talk2dino.data.samples import list_samples, load_label
    from talk2dino.errors import Talk2DinoError
    from talk2dino.extract.coco import read_coco_captions

from parser_fuzz_support import check_message  # noqa: E402

_SCRATCH = Path(tempfile.mkdtemp(prefix="t2d-atheris-datasets-"))
(_SCRATCH / "classes.txt").write_text("a\nb\nc\n", encoding="utf-8")
_SPEC = folder_benchmark(_SCRATCH, _SCRATCH / "classes.txt")


def _captions(data: bytes) -> object:
    root = _SCRATCH / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_bytes(data)
    return read_coco_captions(root, "val")


def _split(data: bytes) -> object:
    root = _SCRATCH / "folder"
    if not root.is_dir():
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        for stem in ("a", "b"):
            (root / "images" / f"{stem}.png").write_bytes(b"")
        (root / "labels" / "a.png").write_bytes(b"")
    (root / "split.txt").write_bytes(data)
    spec = folder_benchmark(root, _SCRATCH / "classes.txt", split_file="split.txt")
    return list_samples(spec, root)


def _painter(path: Path) -> object:
    # Indexing COCO instance JSON needs no mask API; a stub keeps the harness independent of pycocotools.
    original = coco_masks._mask_api
    coco_masks._mask_api = lambda: object()  # type: ignore[assignment]
    try:
        return coco_masks.CocoStuffThingPainter(path)
    finally:
        coco_masks._mask_api = original  # type: ignore[assignment]


def _write(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


PARSERS = (
    lambda d: read_class_names_file(_write("names.txt", d)),
    lambda d: load_label(_write("label.png", d), _SPEC),
    _captions,
    lambda d: _painter(_write("instances.json", d)),
    lambda d: converters.read_numbered_names_file(_write("labels459.txt", d)),
    _split,
)


def test_one_input(data: bytes) -> None:
    """Feed ``data`` to every dataset parser in turn; only clean Talk2DinoErrors are allowed.

    Every parser sees every input (they are cheap), so the raw corpus files are valid seeds as they are.
    """
    for parse in PARSERS:
        try:
            parse(data)
        except Talk2DinoError as exc:
            check_message(exc)


def main() -> None:
    """Run atheris over ``test_one_input`` with the command-line options of libFuzzer."""
    import atheris

    warnings.simplefilter("ignore")
    try:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
