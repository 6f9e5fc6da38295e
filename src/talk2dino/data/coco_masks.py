"""Raw COCO-Stuff stuffthingmaps painted from COCO-format JSON annotations (instances and / or stuff) with pycocotools.

For users who have ``instances_val2017.json`` and ``stuff_val2017.json`` but not the stuffthingmaps PNGs:
:class:`CocoStuffThingPainter` renders one image's raw map, :func:`write_stuffthingmaps` a folder of them (then run
`talk2dino.data.convert_folders.convert_coco_object` / ``convert_coco_stuff``). Needs ``pycocotools`` (the ``eval``
extra), imported on first use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from talk2dino.data.convert_folders import ConversionCounts, write_label_map_png
from talk2dino.data.converters import UNLABELLED, MissingDependencyError
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.fileio import JSON_READ_ERRORS

__all__ = ["CocoSource", "CocoStuffThingPainter", "coco_masks_to_stuffthingmap", "write_stuffthingmaps"]

logger = logging.getLogger(__name__)

_COCO_OTHER_ID = 183  # COCO-Stuff's 'other' (= thing pixels) in stuff_*.json; painted by the instance JSON instead


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:
        raise MissingDependencyError(
            "decoding COCO polygon / RLE masks needs pycocotools: pip install 'talk2dino[eval]'"
        ) from exc
    return mask_api


CocoSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]  # noqa: UP007 (a runtime alias on Python 3.10)


class CocoStuffThingPainter:
    """Raw stuffthingmaps from COCO-format JSON annotations (instances and / or stuff), using pycocotools.

    For users who have ``instances_val2017.json`` and ``stuff_val2017.json`` but not the stuffthingmaps PNGs.
    The JSONs are read and indexed once; :meth:`paint` then renders one image.

    Painting: every annotation (crowd ones included) paints its ``category_id − 1`` over its mask, in the order
    of the sources and then of the annotations in each, so **later annotations win where masks overlap**. Pass
    the stuff JSON before the instances JSON so that things are painted over stuff. Annotations of COCO-Stuff's
    ``other`` category (id 183, which marks thing pixels in the stuff JSON) and of ids outside 1..182 are skipped
    (logged). Pixels that no annotation covers are 255 (unlabelled).

    Panoptic JSONs hold no masks (their segments are PNGs) and are not supported.
    """

    def __init__(self, sources: CocoSource | Sequence[CocoSource]) -> None:
        """Args:
            sources: One COCO JSON (a path or an already loaded dict) or a sequence of them, painted in order.

        Raises:
            InvalidInputError: A missing or malformed JSON.
            MissingDependencyError: pycocotools is not installed.
        """
        self._mask_api = _mask_api()
        source_list: list[CocoSource]
        if isinstance(sources, (str, os.PathLike, Mapping)):
            source_list = [sources]
        else:
            source_list = list(sources)
        self._sizes: dict[int, tuple[int, int]] = {}
        self._file_names: dict[int, str] = {}
        self._annotations: dict[int, list[dict[str, Any]]] = {}
        for source in source_list:
            self._add(source)

    def _add(self, source: CocoSource) -> None:
        if isinstance(source, Mapping):
            data, where = source, "COCO dict"
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidInputError(f"{path}: COCO JSON not found")
            from talk2dino.fileio import json_loads_unique

            try:
                # A repeated key (a real "annotations" list, then an empty one) must not read as an empty file.
                data = json_loads_unique(path.read_bytes())
            except JSON_READ_ERRORS as exc:
                raise InvalidInputError(f"{one_line(path)}: cannot read COCO JSON ({one_line(exc)})") from exc
            where = one_line(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
            raise InvalidInputError(f"{where}: not a COCO annotation file (no 'annotations' list)")
        images = data.get("images", [])
        if not isinstance(images, list):
            raise InvalidInputError(f"{where}: 'images' is a JSON {type(images).__name__}, expected a list")
        from talk2dino.data.images import MAX_IMAGE_PIXELS

        for index, image in enumerate(images):
            try:
                image_id, size = _json_int(image["id"]), (_json_int(image["height"]), _json_int(image["width"]))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise InvalidInputError(
                    f"{where}: images[{index}] lacks an integer id/height/width: {one_line(repr(image))}"
                ) from exc
            if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_IMAGE_PIXELS:
                # paint() allocates height x width; refuse sizes that cannot be a real image.
                raise InvalidInputError(
                    f"{where}: images[{index}] (id {image_id}) has size {size[1]}x{size[0]}; expected 1 to "
                    f"{MAX_IMAGE_PIXELS:,} pixels"
                )
            if image_id in self._sizes and self._sizes[image_id] != size:
                raise InvalidInputError(f"{where}: image {image_id} has size {size}, elsewhere {self._sizes[image_id]}")
            self._sizes[image_id] = size
            if "file_name" in image:
                self._file_names[image_id] = str(image["file_name"])
        for index, annotation in enumerate(data["annotations"]):
            needed = {"image_id", "segmentation", "category_id"}
            if not isinstance(annotation, Mapping) or not needed <= set(annotation):
                raise InvalidInputError(
                    f"{where}: annotations[{index}] is not an object with image_id/category_id/segmentation"
                )
            try:
                image_id, _ = _json_int(annotation["image_id"]), _json_int(annotation["category_id"])
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInputError(
                    f"{where}: annotations[{index}] has a non-integer image_id or category_id: "
                    f"{one_line(repr(annotation))}"
                ) from exc
            self._annotations.setdefault(image_id, []).append(dict(annotation))

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images listed in the JSONs' ``images`` sections, sorted."""
        return sorted(self._sizes)

    def file_name(self, image_id: int) -> str | None:
        """The image's ``file_name`` in the JSON, if given."""
        return self._file_names.get(image_id)

    def paint(self, image_id: int, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Render one image's raw stuffthingmap.

        Args:
            image_id: COCO image id.
            height: Image height; default from the JSON's ``images`` entry (must agree when both are given).
            width: Image width; likewise.

        Returns:
            ``[H, W]`` uint8 raw values: category id − 1, or 255 where no annotation paints.

        Raises:
            InvalidInputError: Unknown size, conflicting sizes, or a malformed segmentation.
        """
        known = self._sizes.get(int(image_id))
        if height is None or width is None:
            if known is None:
                raise InvalidInputError(f"image {image_id} is not in the JSON's images; pass height and width")
            height, width = known
        elif known is not None and known != (height, width):
            raise InvalidInputError(f"image {image_id} is {known[1]}x{known[0]} in the JSON, not {width}x{height}")
        canvas = np.full((height, width), UNLABELLED, dtype=np.uint8)
        for annotation in self._annotations.get(int(image_id), []):
            category_id = int(annotation["category_id"])
            if not 1 <= category_id < _COCO_OTHER_ID:
                logger.debug("image %s: skipping annotation of category %d", image_id, category_id)
                continue
            mask = self._decode(annotation["segmentation"], height, width, image_id)
            canvas[mask] = category_id - 1
        return canvas

    def _decode(self, segmentation: Any, height: int, width: int, image_id: int) -> np.ndarray:
        api = self._mask_api
        try:
            if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
                if not segmentation:
                    return np.zeros((height, width), dtype=bool)
                rle = api.merge(api.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
                rle = api.frPyObjects(dict(segmentation), height, width)  # uncompressed RLE
            elif isinstance(segmentation, Mapping):
                rle = dict(segmentation)  # compressed RLE
            else:
                raise TypeError(f"unsupported segmentation of type {type(segmentation).__name__}")
            if [int(side) for side in rle["size"]] != [height, width]:
                raise ValueError(f"mask size {rle['size']} differs from the image's {[height, width]}")
            return np.asarray(api.decode(rle), dtype=bool)
        except Exception as exc:  # pycocotools raises bare Exception (and TypeError, ...) on malformed input
            raise InvalidInputError(f"image {image_id}: bad segmentation ({exc})") from exc


def _json_int(value: Any) -> int:
    """An integer JSON value (``12`` or ``12.0``); TypeError/ValueError for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():  # also False for NaN and infinities
        raise ValueError(f"expected an integer, got {value}")
    return int(value)


def coco_masks_to_stuffthingmap(
    coco: CocoSource | Sequence[CocoSource], image_id: int, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """One image's raw stuffthingmap from COCO-format JSON annotations (polygons and RLE), via pycocotools.

    A one-shot wrapper of :class:`CocoStuffThingPainter` (see it for the painting and overlap rules); for many
    images build the painter once, or use :func:`write_stuffthingmaps`.

    Args:
        coco: A COCO JSON path or loaded dict, or a sequence of them (stuff before instances).
        image_id: COCO image id.
        height: Image height; default from the JSON.
        width: Image width; default from the JSON.

    Returns:
        ``[H, W]`` uint8 raw values (category id − 1; 255 unlabelled), ready for
        :func:`coco_object_from_stuffthingmap` or :func:`coco_stuff_train_ids`.

    Raises:
        MissingDependencyError: pycocotools is not installed (``pip install 'talk2dino[eval]'``).
        InvalidInputError: Malformed JSON or segmentation, or unknown image size.
    """
    return CocoStuffThingPainter(coco).paint(image_id, height, width)


def write_stuffthingmaps(
    sources: CocoSource | Sequence[CocoSource],
    out_dir: str | os.PathLike[str],
    *,
    image_ids: Iterable[int] | None = None,
    overwrite: bool = False,
) -> ConversionCounts:
    """Write raw stuffthingmaps ``<file stem>.png`` for the images of COCO JSONs (then run the converters).

    Args:
        sources: COCO JSON paths or dicts, painted in order (stuff before instances; see
            :class:`CocoStuffThingPainter`).
        out_dir: Output folder, created if needed (e.g. ``coco_stuff164k/annotations/val2017``).
        image_ids: Images to render; default: every image of the JSONs' ``images`` sections.
        overwrite: Rewrite outputs that already exist.

    Returns:
        Counts of written and skipped files.

    Raises:
        MissingDependencyError: pycocotools is not installed.
        InvalidInputError: Malformed JSON or no image to render.
    """
    painter = CocoStuffThingPainter(sources)
    wanted = painter.image_ids if image_ids is None else [int(image_id) for image_id in image_ids]
    if not wanted:
        raise InvalidInputError("the COCO JSONs list no images to render")
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for image_id in wanted:
        file_name = painter.file_name(image_id)
        stem = Path(file_name).stem if file_name else f"{image_id:012d}"
        output = target / f"{stem}.png"
        if output.exists() and not overwrite:
            skipped += 1
            continue
        write_label_map_png(output, painter.paint(image_id))
        written += 1
    logger.info("wrote %d raw stuffthingmaps to %s, kept %d existing", written, target, skipped)
    return ConversionCounts(written=written, skipped=skipped)
