"""``talk2dino segment``: images, folders or list files plus a vocabulary -> label PNGs, overlays, legends, JSON.

The walk from the flag to the pixel: the labels are read here (`talk2dino.labels.split_labels` for ``--labels``,
`read_label_file` for ``--labels-file``) and every flag is checked before any weights load; the model and its
`Segmenter` come from the "Model"/"Inference" flags (`talk2dino.cli.model_flags`); the files are decoded and cut
into windows a few batches ahead (`talk2dino.cli.batch.prepared_batches`), embedded by
`Segmenter.embed_images`, segmented by `Segmenter.predict_features_batch` (a batch at a time; per image with
`Segmenter.predict_features` when an image fails), and written by a background thread or a pool
of writer processes (`talk2dino.cli.batch.ResultFiles`, `talk2dino.render.write_result_files`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talk2dino.cli.model_flags import (
    add_inference_flags,
    add_model_flags,
    build_segmenter,
    check_model_flags,
    inference_config,
)
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.labels import split_labels

if TYPE_CHECKING:
    from talk2dino.predictor import Segmenter
    from talk2dino.prepare import ImageFeatures
    from talk2dino.results import SegmentationResult

# The CLI's messages keep one logger name in every command module, so the lines users and scripts read stay
# ``ERROR talk2dino.cli: ...``.
logger = logging.getLogger("talk2dino.cli")


def add_parser(sub: Any) -> None:
    """``talk2dino segment`` and its flags."""
    seg = sub.add_parser("segment", help="segment images with free-form labels",
                         description="Segment images, folders or list files (@list.txt) with free-form labels. "
                                     "Writes per image a palette PNG label map, a colour overlay PNG, a colour "
                                     "legend PNG and a JSON summary.")
    seg.add_argument("inputs", nargs="+", help="image files, folders, or list files (@list.txt, one path per line)")
    labels = seg.add_argument_group("Labels").add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", default=None,
                        help='comma-separated labels, e.g. "cat, sofa, window"; double-quote a label that holds a '
                             'comma: \'"dining table, wooden", sofa\'')
    labels.add_argument("--labels-file", default=None,
                        help="a text file with one label per line; blank lines and lines starting with '#' "
                             "(comments) are skipped, a '#' inside a label is kept")
    seg.add_argument("--underscores-to-spaces", action="store_true", default=None,
                     help="read '_' in labels as spaces (as the reference demo does)")
    add_model_flags(seg)
    add_inference_flags(seg)
    out = seg.add_argument_group("Output")
    out.add_argument("--out", default=None,
                     help="output folder (default ./talk2dino-out), created if missing; checked before the model "
                          "loads. A file there is never written over unless talk2dino wrote it (it is listed in a "
                          "talk2dino <stem>.json there) or --overwrite is given; an input image never is. "
                          "Earlier talk2dino outputs in it are not taken as inputs")
    out.add_argument("--overwrite", action="store_true", default=None,
                     help="write over existing files in --out that talk2dino did not write (never an input image)")
    out.add_argument("--save-scores", action="store_true", default=None,
                     help="also write <stem>_scores.npz: per-label score maps before argmax, image size, float16")
    out.add_argument("--save-heatmaps", action="store_true", default=None,
                     help="also write <stem>_heatmaps.png: a grid of the per-label score maps on one colour scale")
    out.add_argument("--save-attention", action="store_true", default=None,
                     help="also write <stem>_attention.png: a grid of the DINOv2 per-head CLS attention maps")
    out.add_argument("--no-overlay", action="store_true", default=None, help="skip the overlay PNG")
    out.add_argument("--overlay-alpha", type=float, default=None, help="overlay opacity in [0, 1] (default 0.5)")
    out.add_argument("--batch-size", type=int, default=None, help="images embedded together (default 4)")
    out.add_argument("--max-image-memory", default=None, metavar="SIZE",
                     help="refuse an image (that image only) whose segmentation would need more memory than this, "
                          "estimated from its size in the file header before decoding, the number of labels and "
                          "the outputs asked for: e.g. 8GB, 16GiB, 512M (K, M, G: powers of 1024). Default: half "
                          "of this machine's (or container's) memory. Images in flight together add up")
    out.add_argument("--workers", type=int, default=None,
                     help="processes decoding and resizing the next images while the model runs (default: 0 on "
                          "CPU; on GPU a quarter of the cores, 1 to 8)")
    out.add_argument("--writers", type=int, default=None,
                     help="processes encoding and writing the PNG and JSON files while the model runs; 0 writes on "
                          "one background thread (default: 0 on CPU, where a pool only takes cores from the model; "
                          "on GPU the cores the main process and --workers leave, 1 to 16)")
    out.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


LABEL_FILE_MAX_BYTES = 16 * 1024 * 1024
"""Largest accepted labels file (16 MiB): far above any real vocabulary, small enough to read safely."""


def read_label_file(path: str) -> list[str]:
    """One label per line (UTF-8, optional byte-order mark, LF or CRLF); blank lines skipped, whitespace trimmed.

    A line whose first non-blank character is ``#`` is a comment and skipped; a ``#`` later in a line belongs to
    the label (``C# code`` is the label ``C# code``).

    Raises:
        InvalidInputError: a missing, unreadable, oversized or non-UTF-8 file, or one without any label; the
            message is one line naming the file (and the line, for bad bytes).
    """
    from talk2dino.fileio import open_regular

    file_path = Path(path)
    shown = one_line(file_path)
    try:
        if file_path.is_dir():
            raise InvalidInputError(f"{shown}: is a folder; --labels-file expects a text file, one label per line")
        # open_regular refuses a FIFO (reading one blocks forever), socket or device without blocking.
        with open_regular(file_path, "labels file") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > LABEL_FILE_MAX_BYTES:
                raise InvalidInputError(
                    f"{shown}: labels file is {size:,} bytes, above the limit of {LABEL_FILE_MAX_BYTES:,}; is it "
                    "a labels file?"
                )
            data = handle.read(LABEL_FILE_MAX_BYTES + 1)
    except OSError as err:
        raise InvalidInputError(f"{shown}: cannot read labels file ({one_line(err.strerror or err)})") from err
    try:
        # utf-8-sig drops a byte-order mark, which str.strip() would otherwise keep inside the first label.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InvalidInputError(
            f"{shown}:{line}: labels file is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from err
    labels = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not labels:
        raise InvalidInputError(f"{shown}: labels file holds no labels; write one label per line")
    return labels


def check_label_count(count: int, *, background: bool) -> None:
    """Refuse more classes than a label PNG holds before any image is computed (issue 14: 1000 labels failed
    every image after its embedding, with exit 0). Up to 256 classes the label PNG is an 8-bit palette image,
    beyond that a 16-bit greyscale one (`render.MAX_LABEL_CLASSES`).

    Raises:
        InvalidInputError: `count` labels (plus the background class) above `render.MAX_LABEL_CLASSES`.
    """
    from talk2dino.render import MAX_LABEL_CLASSES

    classes = count + int(bool(background))
    if classes > MAX_LABEL_CLASSES:
        what = (f"{count:,} labels and the background class are {classes:,} classes" if background
                else f"{count:,} labels are {classes:,} classes")
        raise InvalidInputError(f"{what}, more than the {MAX_LABEL_CLASSES:,} a 16-bit label PNG holds; split the "
                                "labels over several runs")


def predict_each(segmenter: Segmenter, features: list[ImageFeatures]) -> list[SegmentationResult | InvalidInputError]:
    """Segment a batch's embedded images, in order: with `Segmenter.predict_features_batch` (on a GPU every window
    of the batch as one set of tensors, no wait for the device until the labels are copied), and when it refuses
    the batch with an input error, image by image with `predict_features`, so that one image's error costs that
    image only (it takes the place of its result)."""
    if len(features) > 1:
        try:
            return list(segmenter.predict_features_batch(features))
        except InvalidInputError as err:
            logger.debug("batched prediction failed (%s); predicting the %d images one by one", err, len(features))
    results: list[SegmentationResult | InvalidInputError] = []
    for feats in features:
        try:
            results.append(segmenter.predict_features(feats))
        except InvalidInputError as err:
            results.append(err)
    return results


def run(args: argparse.Namespace) -> int:
    """The ``segment`` subcommand; returns the exit code."""
    from tqdm import tqdm

    from talk2dino.cli.batch import (
        BackgroundWriter,
        ResultFiles,
        default_image_memory,
        default_workers,
        default_writers,
        parse_byte_size,
        prepared_batches,
    )
    from talk2dino.cli.output_folder import (
        check_output_folder,
        max_stem_bytes,
        output_names,
        plan_stems,
        refuse_overwrites,
        remove_if_unused,
        remove_stale_temps,
        talk2dino_outputs,
    )
    from talk2dino.data.image_lists import list_images
    from talk2dino.data.image_memory import MemoryBudget, format_bytes
    from talk2dino.errors import internal_error_guard
    from talk2dino.render import DEFAULT_OVERLAY_ALPHA

    started = time.time()  # temp files older than this are an interrupted run's, not a concurrent one's
    names = split_labels(args.labels) if args.labels is not None else read_label_file(args.labels_file)
    if args.underscores_to_spaces:
        names = [n.replace("_", " ") for n in names]
    paths = list_images(args.inputs)
    if not paths:
        raise InvalidInputError(f"no images found in {args.inputs}")
    batch_size = args.batch_size if args.batch_size is not None else 4
    alpha = args.overlay_alpha if args.overlay_alpha is not None else DEFAULT_OVERLAY_ALPHA
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--workers", args.workers), ("--writers", args.writers)):
        if value is not None and value < 0:
            raise InvalidInputError(f"{flag} must be >= 0, got {value}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"--overlay-alpha must be in [0, 1], got {alpha}")
    memory_limit = (parse_byte_size(args.max_image_memory) if args.max_image_memory is not None
                    else default_image_memory())
    # Every flag is checked before any weights are resolved or loaded (seconds to minutes): a typo fails at once.
    from talk2dino.predictor import Segmenter

    flag_config = inference_config(args)
    Segmenter.check_labels(names, background=flag_config.background)
    check_label_count(len(names), background=flag_config.background)
    check_model_flags(args)
    # So many labels that even a small image's score maps exceed --max-image-memory: say so now, not per image.
    MemoryBudget(memory_limit, len(names) + int(flag_config.background), flag_config).check_labels()
    # The output folder too (issue 14): usable, and no file there that this run did not create is written over.
    out_dir = Path(args.out or "talk2dino-out")
    created = check_output_folder(out_dir)
    ours = talk2dino_outputs(out_dir)
    out_resolved = out_dir.resolve()
    earlier = [p for p in paths if p.name in ours and p.resolve().parent == out_resolved]
    if earlier:  # segmenting a folder into itself again: our earlier outputs are not inputs
        logger.info("skipping %d earlier talk2dino output(s) in %s", len(earlier), out_dir)
        skipped = set(earlier)
        paths = [p for p in paths if p not in skipped]
        if not paths:
            raise InvalidInputError(f"no images found in {args.inputs} besides earlier talk2dino outputs")
    # Output names too long for the file system (a 250-byte image name) are shortened here, not failed later.
    used = plan_stems(paths, stem_bytes=max_stem_bytes(out_dir))
    targets = [name for stem in used.values() for name in output_names(
        stem, overlay=not args.no_overlay, save_scores=bool(args.save_scores),
        save_heatmaps=bool(args.save_heatmaps), save_attention=bool(args.save_attention))]
    refuse_overwrites(out_dir, targets, paths, overwrite=bool(args.overwrite), ours=ours)
    # Never an input or a listed output, whatever it is named (an image may be called ".t2d-0123456789ab.tmp.png").
    inputs_here = {p.name for p in paths if p.resolve().parent == out_resolved}
    stale = remove_stale_temps(out_dir, before=started, keep=ours | inputs_here)
    if stale:
        logger.info("removed %d temp file(s) left in %s by an interrupted run", len(stale), out_dir)
    try:
        segmenter = build_segmenter(args)
        segmenter.set_classes(names)
        check_label_count(len(names), background=segmenter.config.background)  # a model folder's own default
    except BaseException:
        remove_if_unused(out_dir, created)  # e.g. a mistyped --model: no empty output folder left behind
        raise
    device = segmenter.model.device
    workers = args.workers if args.workers is not None else default_workers(device)
    writers = args.writers if args.writers is not None else default_writers(device)

    failed: list[str] = []
    # Progress in images, advanced as the work is done: each backbone chunk of `window_batch_size` windows moves
    # its images by their share of the embedding (`embed_share` of an image, measured on the previous batch),
    # and the rest once the image is segmented and written. So the bar and its ETA move during a batch's one
    # backbone call, which may take a minute on a CPU.
    progress = tqdm(total=len(paths), unit="img", disable=bool(args.quiet or args.no_progress), file=sys.stderr,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    embed_share = 0.5
    # Host work overlaps the model: the next batches are decoded by `workers` processes, and each image's
    # files are written by `writers` processes (or one thread) while the next batch runs (talk2dino.cli.batch).
    # Every stage is bounded, so memory stays flat over any number of images: two batches ahead per decoding
    # worker, and at most two batches (or two jobs per writer) of results waiting to be written.
    writer = BackgroundWriter(max_pending=2 * max(batch_size, writers), processes=writers)
    # Each image's memory need is estimated from its header, before decoding, with the model's own settings.
    budget = MemoryBudget(memory_limit, len(names) + int(segmenter.config.background), segmenter.config,
                          overlay=not args.no_overlay, save_scores=bool(args.save_scores),
                          save_heatmaps=bool(args.save_heatmaps))
    logger.debug("memory limit per image: %s", format_bytes(memory_limit))
    batches = prepared_batches(paths, segmenter.config, batch_size=batch_size, workers=workers,
                               pin_memory=device.type == "cuda", budget=budget)
    # Per image only input errors (InvalidInputError); anything else becomes one InternalError and stops
    # the run here, instead of being reported against every image (issue 12; main() exits 3).
    try:
        with internal_error_guard():
            for batch in batches:
                loaded = []
                for item in batch:
                    if item.image is None:
                        logger.error("%s", item.error)
                        failed.append(str(item.path))
                        progress.update(1)
                    else:
                        loaded.append(item)
                if not loaded:
                    continue
                windows = [item.image.guides.shape[0] for item in loaded if item.image is not None]
                credited = [0.0] * len(loaded)  # progress given to each image so far

                def on_windows(index: int, count: int, share: float = embed_share, credited: list[float] = credited,
                               windows: list[int] = windows) -> None:
                    step = min(share * count / windows[index], share - credited[index])
                    credited[index] += step
                    progress.update(step)

                # One bad image in a batch does not cost the others: the segmenter retries them one by one and
                # returns the error in place of the features of each image that has one.
                t0 = time.perf_counter()
                features = segmenter.embed_images([item.image for item in loaded], progress=on_windows,
                                                  isolate_failures=True)
                batch_time = time.perf_counter() - t0
                # Seconds of backbone time per image: the batch's time split by each image's share of its windows.
                embed_times = [batch_time * n / sum(windows) for n in windows]
                t_post = time.perf_counter()
                good = [k for k, feats in enumerate(features) if not isinstance(feats, InvalidInputError)]
                results = dict(zip(good, predict_each(segmenter, [features[k] for k in good]), strict=True))
                for k, (item, feats) in enumerate(zip(loaded, features, strict=True)):
                    path, result = item.path, results.get(k, feats)
                    if isinstance(result, InvalidInputError):
                        logger.error("%s: %s", path, result)
                        failed.append(str(path))
                        progress.update(1 - credited[k])
                        continue
                    assert item.image is not None and not isinstance(feats, InvalidInputError)
                    summary = segmenter.summary(result)
                    summary["timings"]["embed_image"] = round(embed_times[k], 6)
                    writer.submit(str(path), ResultFiles.from_result(
                        out_dir, used[path], path, item.image.rgb, result, summary, overlay=not args.no_overlay,
                        alpha=alpha, save_scores=bool(args.save_scores), save_heatmaps=bool(args.save_heatmaps),
                        features=feats if args.save_attention else None),
                        on_done=functools.partial(progress.update, 1 - credited[k]))
                writer.finish_ready()
                # The next batch's split between embedding and the rest, from this one (writes overlap it).
                embed_total, post_total = sum(embed_times), time.perf_counter() - t_post
                if embed_total + post_total > 0:
                    embed_share = min(0.95, max(0.05, embed_total / (embed_total + post_total)))
            writer.close()
    except BaseException:
        writer.abort()  # the run stops: queued writes are dropped, none is reported as a failed image
        raise
    finally:
        progress.close()
    failed.extend(writer.failed)
    done = len(paths) - len(failed)
    logger.info("wrote %d of %d images to %s", done, len(paths), out_dir)
    if failed:
        # Each name escaped: a file name holding a line break must not forge a log line.
        shown = ", ".join(one_line(name, max_chars=1000) for name in failed[:10])
        shown += " ..." if len(failed) > 10 else ""
        logger.error("%d image(s) failed: %s", len(failed), shown)
        return 1
    return 0

