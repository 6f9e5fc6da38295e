"""Coverage-guided fuzzing of image decoding (``load_image``) with atheris.

    python tests/fuzz/atheris_images.py -runs=20000 tests/fuzz/corpus/images
    python tests/fuzz/atheris_images.py -max_total_time=60 -artifact_prefix=/tmp/ tests/fuzz/corpus/images

Each input is written to a temporary file as is and decoded with a 1-megapixel limit; a ``Talk2DinoError`` with a
one-line message is the expected way to fail. Any other exception, or a multi-line message, is a crash that
atheris reports (and saves as ``crash-*``); copy it to ``corpus/images/found/bad_<what>.<ext>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parser_fuzz_support import instrumented  # noqa: E402

with instrumented():
    from PIL import Image

    # Pillow imports its format plugins lazily, on the first open; import them now so they are instrumented
    # too and coverage guides the fuzzer through their header parsers.
    Image.init()

    from talk2dino.data.images import load_image
    from talk2dino.errors import Talk2DinoError

from parser_fuzz_support import check_message  # noqa: E402

_SCRATCH = tempfile.mkdtemp(prefix="t2d-atheris-images-")


def test_one_input(data: bytes) -> None:
    """Decode ``data`` as an image file; only clean Talk2DinoErrors are allowed.

    The bytes are the whole file (Pillow picks the format from the content, not the name), so the corpus
    files are valid seeds as they are and a crash file is a plain image file.
    """
    path = os.path.join(_SCRATCH, "input.img")
    with open(path, "wb") as handle:
        handle.write(data)
    try:
        rgb = load_image(path, max_pixels=1_000_000)
    except Talk2DinoError as exc:
        check_message(exc)
        return
    assert rgb.dtype.name == "uint8" and rgb.ndim == 3 and rgb.shape[2] == 3


def main() -> None:
    """Run atheris over ``test_one_input`` with the command-line options of libFuzzer."""
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF/TIFF tags; not crashes
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
