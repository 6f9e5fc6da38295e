"""Image loading and conversion (RGB everywhere, method.md pitfall P1)."""

# Here rather than in `benchmarks` (which imports numpy) so that `talk2dino eval --help` can show it cheaply.
FOLDER_LAYOUT_HELP = (
    "a `folder` dataset is ROOT/images/<name>.jpg|.jpeg|.png with ROOT/labels/<name>.png (single-channel PNG "
    "whose pixel values are class indices, 255 = ignore), plus a classes file with one class name per line in "
    "label order (--classes-file)"
)
"""The layout of a user dataset (`benchmarks.folder_benchmark` with its default folders), in one sentence."""
