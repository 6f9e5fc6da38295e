"""Segmentation results as pictures and files, shared by the CLI, the HTTP server and its web page.

- :mod:`~talk2dino.render.labels`: label colours (PASCAL VOC), the palette / 16-bit label PNG, legend, overlay,
  PNG bytes.
- :mod:`~talk2dino.render.pictures`: the colour map and the captioned grids of score maps and attention heads.
- :mod:`~talk2dino.render.rle`: COCO run-length encoding (pycocotools-compatible, without pycocotools).
- :mod:`~talk2dino.render.save`: the result files of ``talk2dino segment`` / ``SegmentationResult.save``, each
  written atomically.
- :mod:`~talk2dino.render.charts`: sweep and ablation charts (evaluation and training reports).
- :mod:`~talk2dino.render.text` and :mod:`~talk2dino.render.arrays`: caption fonts; tensor-to-numpy.

Everything is drawn with numpy and Pillow; torch is never imported here (tensors are accepted as they come).
The names below are the package's drawing API; import them from ``talk2dino.render``.
"""

from __future__ import annotations

from talk2dino.render.charts import bar_chart, line_chart
from talk2dino.render.labels import (
    DEFAULT_OVERLAY_ALPHA,
    LEGEND_PADDING,
    LEGEND_ROW_HEIGHT,
    LEGEND_SWATCH,
    MAX_LABEL_CLASSES,
    MAX_PALETTE_COLORS,
    label_colors,
    label_image,
    label_png_bytes,
    legend_image,
    overlay,
    palette,
    png_bytes,
)
from talk2dino.render.pictures import (
    DEFAULT_TILE_SIZE,
    attention_grid,
    attention_tiles,
    colormap,
    heatmap_grid,
    heatmap_tiles,
    image_grid,
)
from talk2dino.render.rle import label_rles, rle_decode, rle_encode
from talk2dino.render.save import (
    result_file_names,
    save_attention_png,
    save_heatmaps_png,
    save_label_png,
    save_legend_png,
    save_overlay_png,
    save_scores_npz,
    write_result_files,
)

__all__ = [
    "DEFAULT_OVERLAY_ALPHA",
    "DEFAULT_TILE_SIZE",
    "LEGEND_PADDING",
    "LEGEND_ROW_HEIGHT",
    "LEGEND_SWATCH",
    "MAX_LABEL_CLASSES",
    "MAX_PALETTE_COLORS",
    "attention_grid",
    "attention_tiles",
    "bar_chart",
    "colormap",
    "heatmap_grid",
    "heatmap_tiles",
    "image_grid",
    "label_colors",
    "label_image",
    "label_png_bytes",
    "label_rles",
    "legend_image",
    "line_chart",
    "overlay",
    "palette",
    "png_bytes",
    "result_file_names",
    "rle_decode",
    "rle_encode",
    "save_attention_png",
    "save_heatmaps_png",
    "save_label_png",
    "save_legend_png",
    "save_overlay_png",
    "save_scores_npz",
    "write_result_files",
]
