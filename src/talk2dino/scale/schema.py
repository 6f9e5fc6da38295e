"""The Arrow schemas of the Ray pipeline: the decoded images passed from the CPU tasks to the actors, and the
Parquet output (one row per image).

The label map is stored as PNG bytes (``labels_png``), byte for byte the ``<stem>_labels.png`` that
``talk2dino segment`` writes (`talk2dino.render.label_png_bytes`): one column whatever the vocabulary size, a
few KB per image (PNG compresses label maps well), readable by any image library
(``np.array(Image.open(io.BytesIO(row["labels_png"])))`` gives the class indices) and convertible to COCO RLE
per class with `talk2dino.render.label_rles`. Per-class RLE columns would grow with the vocabulary and need
pycocotools-style decoding to be seen.
"""

from __future__ import annotations

import pyarrow as pa

from talk2dino.errors import InvalidInputError

OUTPUT_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),  # the image as listed (a local path or a URI)
    pa.field("size", pa.int64()),  # file size in bytes at listing time (resume key)
    pa.field("mtime_ns", pa.int64()),  # modification time in ns at listing time (resume key)
    pa.field("sha256", pa.string()),  # of the bytes decoded (null when the file could not be read)
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("class_names", pa.list_(pa.string())),  # "background" first when the background channel is on
    pa.field("pixel_counts", pa.list_(pa.int64())),  # per class, in class_names' order
    pa.field("pixel_shares", pa.list_(pa.float64())),  # per class, summing to 1
    pa.field("background_index", pa.int32()),  # 0 with a background channel, else null
    pa.field("labels_png", pa.large_binary()),  # the label PNG of `talk2dino segment` (class indices)
    pa.field("model", pa.string()),  # the model's short name
    pa.field("model_info", pa.string()),  # JSON: name, profile, weights (sources and sha256 of every part)
    pa.field("settings", pa.string()),  # JSON: the effective InferenceConfig
    pa.field("seconds", pa.float64()),  # segmentation time of this image in its actor (backbone share + rest)
    pa.field("error", pa.string()),  # null on success; one line naming what is wrong with the image
])
"""One row per image of `talk2dino.scale.segment_dataset`'s Parquet output."""

DECODED_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("resized", pa.list_(pa.int32())),  # (H', W') processing size
    pa.field("boxes", pa.list_(pa.int32())),  # window boxes (y1, y2, x1, x2), flattened
    pa.field("windows", pa.list_(pa.int32())),  # guides shape (n, 3, wh, ww)
    pa.field("guides", pa.large_binary()),  # the windows as uint8 (exact: they are resized uint8 pixels)
    pa.field("error", pa.string()),
])
"""An image after `talk2dino.prepare.prepare_image` in a CPU task, on its way to a segmenting actor."""

LISTING_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
])
"""The input listing: what is to be segmented, with the stat used as the resume key."""

SUMMARY_SCHEMA = pa.schema([
    pa.field("file", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("failures", pa.int64()),
])
"""What each write task reports back to the driver: one row per part file written."""


def check_output_schema(schema: pa.Schema, where: str) -> None:
    """Refuse an existing output whose columns are not `OUTPUT_SCHEMA`'s (resuming into another table).

    Raises:
        InvalidInputError: one line naming the missing or retyped columns.
    """
    wrong = [f.name for f in OUTPUT_SCHEMA if schema.get_field_index(f.name) < 0
             or not schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise InvalidInputError(f"{where}: not a talk2dino segment-dataset output (columns {', '.join(wrong)} are "
                                "missing or of another type); give a new --out")
