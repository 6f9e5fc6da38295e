"""``talk2dino segment-dataset``: a folder, glob, list file or Parquet/CSV table of images -> a Parquet dataset of
label maps, on a local Ray runtime or a Ray cluster (issue 17; `talk2dino.scale`, extra ``talk2dino[ray]``).

The labels and every flag are checked before Ray starts; the model loads once per actor. Ray's progress is shown
while the run goes; a final line gives the images, the failures and the images per second. A rerun with the same
--out skips the images already there (same path, size and modification time).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from talk2dino.cli.model_flags import INFERENCE_FIELDS, add_inference_flags, add_model_flags, check_model_flags
from talk2dino.config import DEFAULT_MODEL
from talk2dino.errors import InvalidInputError

logger = logging.getLogger("talk2dino.cli")


def add_parser(sub: Any) -> None:
    """``talk2dino segment-dataset`` and its flags."""
    cmd = sub.add_parser(
        "segment-dataset", help="segment a large image collection on Ray Data into a Parquet dataset",
        description="Segment a folder, glob, list file (@list.txt) or Parquet/CSV table of image paths on a local "
                    "Ray runtime or a Ray cluster. Writes a Parquet dataset (a folder of part files), one row per "
                    "image: size, class names, pixel counts and shares, the label PNG, model and settings, error. "
                    "Needs the extra: pip install 'talk2dino[ray]'. See docs/scale.md.")
    cmd.add_argument("inputs", nargs="+", help="folders, globs, list files, .parquet/.csv tables or s3://, gs:// URIs")
    labels = cmd.add_argument_group("Labels").add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", default=None, help='comma-separated labels, e.g. "cat, sofa, window"')
    labels.add_argument("--labels-file", default=None, help="a text file with one label per line")
    cmd.add_argument("--underscores-to-spaces", action="store_true", help="read '_' in labels as spaces")
    cmd.add_argument("--path-column", default="path", help="the image-path column of a .parquet/.csv input "
                                                            "(default path)")
    add_model_flags(cmd, runtime=False)
    add_inference_flags(cmd)
    ray = cmd.add_argument_group("Ray")
    ray.add_argument("--out", required=True, help="output Parquet dataset (a folder; local or a URI)")
    ray.add_argument("--address", default="local",
                     help="'local' (default): start a Ray runtime on this machine; 'auto': join the running "
                          "cluster; or ray://HOST:10001")
    ray.add_argument("--workers", type=int, default=1, help="segmenting actors, one model each (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=None,
                     help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="logical CPUs of a local runtime (default: the machine's, at least 4, so that decode "
                          "tasks are not starved by the actors)")
    ray.add_argument("--batch-size", type=int, default=4, help="images per actor call (default 4)")
    ray.add_argument("--rows-per-file", type=int, default=64, help="rows per Parquet part file (default 64)")
    ray.add_argument("--no-resume", action="store_true",
                     help="segment every image again, even those already in --out")
    ray.add_argument("--retry-errors", action="store_true",
                     help="try the images whose row in --out holds an error again (a new row is added)")


def run(args: argparse.Namespace) -> int:
    """The ``segment-dataset`` subcommand; returns the exit code (1 when some images failed)."""
    from talk2dino.cli.segment import read_label_file
    from talk2dino.labels import split_labels

    names = split_labels(args.labels) if args.labels is not None else read_label_file(args.labels_file)
    if args.underscores_to_spaces:
        names = [n.replace("_", " ") for n in names]
    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size),
                        ("--rows-per-file", args.rows_per_file)):
        if value < 1:
            raise InvalidInputError(f"{flag} must be >= 1, got {value}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise InvalidInputError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    check_model_flags(args)
    from talk2dino.scale import require_ray

    ray = require_ray()  # before anything else: without the extra, one line naming it
    from talk2dino.scale import init_ray, run_segment_dataset

    overrides = {k: getattr(args, k) for k in INFERENCE_FIELDS if getattr(args, k, None) is not None}

    started_here = not ray.is_initialized()  # a caller's own Ray session (tests, notebooks) is left running
    init_ray(args.address, num_cpus=args.num_cpus)

    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if args.quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_segment_dataset(
            args.inputs, names, args.out, model=args.model or (
                None if args.backbone and args.text_encoder and args.projection else DEFAULT_MODEL),
            backbone=args.backbone, text_encoder=args.text_encoder, projection=args.projection, device=args.device,
            dtype=args.dtype, cache_dir=args.cache_dir, offline=bool(args.offline), workers=args.workers,
            gpus_per_worker=gpus, cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
            rows_per_file=args.rows_per_file, path_column=args.path_column, resume=not args.no_resume,
            retry_errors=bool(args.retry_errors),
            compile_backbone=bool(args.compile), **overrides)
    finally:
        if started_here:
            ray.shutdown()
    logger.info("%d images segmented (%d skipped as already in %s), %d failed, %.2f images/s over %.1f s",
                summary.images, summary.skipped, args.out, summary.failures, summary.images_per_second,
                summary.seconds)
    if summary.failures:
        logger.error("%d image(s) failed; their rows in %s hold the error", summary.failures, args.out)
        return 1
    return 0
