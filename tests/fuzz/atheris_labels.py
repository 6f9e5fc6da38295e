"""Coverage-guided fuzzing of label input (``parse_label_list``, ``read_label_file``, ``check_labels``).

    python tests/fuzz/atheris_labels.py -runs=50000 tests/fuzz/corpus/labels/files tests/fuzz/corpus/labels/strings

Each input is parsed as a labels file (written verbatim) and as a ``--labels`` string (decoded as UTF-8 with
replacement), with and without the background channel. Only one-line ``Talk2DinoError`` refusals are allowed.
"""

from __future__ import annotations

import os
import sys
import tempfile

# Third-party heavyweights are imported before instrumenting, so that only our parsers get instrumented
# (instrumenting torch takes minutes at start-up and steers the fuzzer towards code that is not ours).
import numpy  # noqa: F401
import torch  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parser_fuzz_support import instrumented  # noqa: E402

with instrumented():
    from talk2dino.cli.segment import read_label_file
    from talk2dino.errors import Talk2DinoError
    from talk2dino.labels import split_labels as parse_label_list
    from talk2dino.predictor import Segmenter

from parser_fuzz_support import check_message  # noqa: E402

_SCRATCH = tempfile.mkdtemp(prefix="t2d-atheris-labels-")


def test_one_input(data: bytes) -> None:
    """Parse ``data`` both as a labels file and as a ``--labels`` string; only clean Talk2DinoErrors are allowed."""
    path = os.path.join(_SCRATCH, "labels.txt")
    with open(path, "wb") as handle:
        handle.write(data)
    for parse in (lambda: read_label_file(path), lambda: parse_label_list(data.decode("utf-8", "replace"))):
        for background in (False, True):
            try:
                checked = Segmenter.check_labels(parse(), background=background)
            except Talk2DinoError as exc:
                check_message(exc)
                continue
            assert checked and len(set(checked)) == len(checked)


def main() -> None:
    """Run atheris over ``test_one_input`` with the command-line options of libFuzzer."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
