"""The Python API's memory guard: `Segmenter(max_image_memory=...)`, the CLI's ``--max-image-memory`` below the CLI.

A path (or a lazily opened PIL image) whose segmentation would need more than the limit is refused from its
header, before any pixel is decoded, with one line naming the file, its size, the estimate and the limit; a
`predict` whose labels would make the score maps too large is refused before they are allocated. The estimate
and the default limit are one piece of code, shared with the CLI (`talk2dino.data.image_memory`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino import Segmenter
from talk2dino.config import InferenceConfig
from talk2dino.data import image_memory
from talk2dino.data.images import ImageTooLargeError
from talk2dino.errors import InvalidInputError

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from make_corpus import png_with_header  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def bomb(tmp_path: Path) -> Path:
    """A 4000x3000 PNG header over 64 bytes of data: decoding it would fail, so a refusal that names the memory
    proves that nothing was decoded."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(4000, 3000))
    return path


def test_set_image_refuses_a_path_from_its_header(tiny_model, bomb: Path) -> None:
    seg = Segmenter(tiny_model, max_image_memory=MiB)
    with pytest.raises(ImageTooLargeError) as info:
        seg.set_image(bomb)
    message = str(info.value)
    assert message.startswith(f"{bomb}: image is 4000x3000 (12,000,000 pixels) and needs about ")
    assert "MiB to segment with 1 score channel(s), above max_image_memory 1.0 MiB" in message
    assert "raise max_image_memory" in message and "\n" not in message
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, ValueError)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: image is 4000x3000"):
        seg.predict_batch([bomb])


def test_no_limit_decodes_as_before(tiny_model, bomb: Path) -> None:
    seg = Segmenter(tiny_model, max_image_memory=None)
    with pytest.raises(InvalidInputError, match="cannot decode image data") as info:
        seg.set_image(bomb)  # the guard is off: the (truncated) pixels are decoded, and fail
    assert not isinstance(info.value, ImageTooLargeError)


def test_a_lazy_pil_image_is_checked_before_it_is_decoded(tiny_model, bomb: Path) -> None:
    seg = Segmenter(tiny_model, max_image_memory=MiB)
    with Image.open(bomb) as lazy, pytest.raises(ImageTooLargeError, match=r"bomb\.png: image is 4000x3000"):
        seg.set_image(lazy)


def test_the_default_is_the_cli_default(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from talk2dino.cli import batch

    assert batch.MemoryBudget is image_memory.MemoryBudget and batch.format_bytes is image_memory.format_bytes
    assert Segmenter(tiny_model).max_image_memory == image_memory.default_image_memory() == \
        batch.default_image_memory()
    monkeypatch.setattr(image_memory, "machine_memory", lambda: 16 << 30)
    assert image_memory.default_image_memory() == 8 << 30
    assert Segmenter(tiny_model).max_image_memory == 8 << 30
    assert image_memory.image_memory_limit(None) == image_memory.FALLBACK_IMAGE_MEMORY


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "8GB"])
def test_a_bad_limit_is_refused(tiny_model, value: object) -> None:
    with pytest.raises(InvalidInputError, match="max_image_memory must be a positive number of bytes"):
        Segmenter(tiny_model, max_image_memory=value)  # type: ignore[arg-type]


def test_predict_checks_the_labels_of_the_call(tiny_model) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    labels = [f"thing{i}" for i in range(40)]
    config = tiny_model.config.inference
    few = image_memory.MemoryBudget(1, 2, config, overlay=False).need(64, 48)
    many = image_memory.MemoryBudget(1, len(labels), config, overlay=False).need(64, 48)
    assert few < many
    seg = Segmenter(tiny_model, max_image_memory=(few + many) // 2)
    seg.set_image(rgb)  # an array: already decoded, nothing to check from a header
    seg.set_classes(labels[:2])
    assert seg.predict().labels.shape == (48, 64)
    seg.set_classes(labels)
    with pytest.raises(ImageTooLargeError, match=r"^the image of set_image: image is 64x48 \(3,072 pixels\) "
                                                 r"and needs about .* with 40 score channel\(s\)"):
        seg.predict()
    with pytest.raises(ImageTooLargeError, match=r"^image 0: image is 64x48"):
        seg.predict_batch([rgb])
    seg.max_image_memory = None
    assert seg.predict().labels.shape == (48, 64)


def test_budget_estimate_is_unchanged_by_the_move() -> None:
    # The CLI's estimate (tests/test_segment_guards.py measures it) from its new home: same numbers.
    budget = image_memory.MemoryBudget(100 * MiB, 3, InferenceConfig())
    with pytest.raises(ImageTooLargeError, match=r"^image is 13000x13000 \(169,000,000 pixels\) and needs about "):
        budget(13000, 13000, "L")
    assert budget.need(4000, 3000, "F") > budget.need(4000, 3000, "RGB")
