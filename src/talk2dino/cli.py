"""The ``talk2dino`` command (house-style §6). ``main(argv)`` is callable in-process; tests do that.

Exit codes: 0 every image succeeded (``serve``: stopped cleanly); 1 some images failed (the others are
written); 2 the command could not start (bad arguments, labels, limits, model or weights, missing extra);
3 the run stopped on an internal failure that is no image's fault (a bug, an unsupported torch or
transformers version, or the device out of memory), reported as one line naming the exception and the
installed versions (``-v`` adds the traceback); 130 interrupted.

Only input errors (``errors.is_input_error``: an unreadable, corrupt or oversized image) fail one image and let
the others go on; any other failure stops the run at its first occurrence (issue 12).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("talk2dino.cli")

DEFAULT_MODEL = "talk2dino-vitb14-reg"


def parse_label_list(text: str) -> list[str]:
    """Split a comma-separated label string, trimming spaces around each label; ``"..."`` quotes a label that
    holds commas (``'"cat, dog", bird'``: two labels), as `talk2dino.labels.split_labels` describes.

    Only the splitting is done here; :meth:`Segmenter.check_labels` then checks the labels themselves
    (duplicates, labels the text encoder cannot tell apart, control characters, length).

    Raises:
        InvalidInputError: when an entry is empty (``"cat,,dog"``) or nothing is given, or a quote is not
            closed; the message is one line and quotes the (escaped, shortened) string.
    """
    from talk2dino.labels import split_labels

    return split_labels(text, what="--labels")


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
    from talk2dino.errors import InvalidInputError, one_line
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


def _check_label_count(count: int, *, background: bool) -> None:
    """Refuse more classes than a label PNG holds before any image is computed (issue 14: 1000 labels failed
    every image after its embedding, with exit 0). Up to 256 classes the label PNG is an 8-bit palette image,
    beyond that a 16-bit greyscale one (`outputs.MAX_LABEL_CLASSES`).

    Raises:
        InvalidInputError: `count` labels (plus the background class) above `outputs.MAX_LABEL_CLASSES`.
    """
    from talk2dino.errors import InvalidInputError
    from talk2dino.outputs import MAX_LABEL_CLASSES

    classes = count + int(bool(background))
    if classes > MAX_LABEL_CLASSES:
        what = (f"{count:,} labels and the background class are {classes:,} classes" if background
                else f"{count:,} labels are {classes:,} classes")
        raise InvalidInputError(f"{what}, more than the {MAX_LABEL_CLASSES:,} a 16-bit label PNG holds; split the "
                                "labels over several runs")


def _add_model_args(parser: argparse.ArgumentParser, *, runtime: bool = True) -> None:
    """The "Model" flags; `runtime` adds --runtime/--onnx-dir (not for export-onnx, which always exports torch)."""
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default=None,
                       help=f"registry name, local-dir:PATH or hf-hub:ORG/REPO model folder (default {DEFAULT_MODEL})")
    group.add_argument("--backbone", default=None, help="DINOv2 source overriding the model's (hf-hub: or local-dir:)")
    group.add_argument("--text-encoder", default=None, help="CLIP text source overriding the model's")
    group.add_argument("--projection", default=None, help="psi checkpoint (.pth/.safetensors/URL/local-dir:)")
    group.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="backbone dtype (default float32)")
    group.add_argument("--cache-dir", default=None,
                       help="download cache (default $TALK2DINO_CACHE or ~/.cache/talk2dino)")
    group.add_argument("--offline", action="store_true", default=None, help="never touch the network")
    if runtime:
        group.add_argument("--runtime", default=None, choices=["torch", "onnx"],
                           help="torch (default) or onnx: run a folder written by `talk2dino export-onnx` "
                                "(--onnx-dir), which then is the whole model")
        group.add_argument("--onnx-dir", default=None, help="exported ONNX folder, with --runtime onnx")


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Inference (defaults: the model's benchmark settings)")
    group.add_argument("--background", action=argparse.BooleanOptionalAction, default=None,
                       help="add a background class: pixels whose every label scores below the threshold")
    group.add_argument("--bg-threshold", type=float, default=None, help="background threshold (0.55 ViT-B, 0.54 ViT-L)")
    group.add_argument("--bg-clean", action=argparse.BooleanOptionalAction, default=None,
                       help="background cleaning with the CLS attention heads (default: on with --background)")
    group.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                       help="PAMR mask refinement (default on; `eval` defaults to off, the paper's main rows)")
    group.add_argument("--window-batch-size", type=int, default=None, help="windows per backbone forward")
    group.add_argument("--compile", action="store_true", default=None,
                       help="run the backbone through torch.compile (slow first call per batch shape; pays off "
                            "over many images, mostly on GPU)")


def build_parser() -> argparse.ArgumentParser:
    """The parser behind ``talk2dino`` (its help is the documentation the README quotes)."""
    parser = argparse.ArgumentParser(prog="talk2dino",
                                     description="Open-vocabulary semantic segmentation with Talk2DINO.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    sub = parser.add_subparsers(dest="command")

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
    _add_model_args(seg)
    _add_inference_args(seg)
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
                          "of this machine's (or container's) memory. Images in flight together add up"),
    out.add_argument("--workers", type=int, default=None,
                     help="processes decoding and resizing the next images while the model runs (default: 0 on "
                          "CPU, up to 8 on GPU)")
    out.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    from talk2dino.config import ExtractConfig, TrainConfig
    from talk2dino.recipes import add_dataclass_arguments

    ext = sub.add_parser("extract", help="extract training features from COCO Captions",
                         description="Per image the per-head attention-weighted patch embeddings, the head-averaged "
                                     "embedding and the CLS token; per caption the raw CLIP embedding. Resumable; "
                                     "run under torchrun for several GPUs.")
    ext.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    add_dataclass_arguments(ext.add_argument_group("Extraction"), ExtractConfig)
    ext.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    train = sub.add_parser("train", help="train psi on extracted features",
                           description="Max-head InfoNCE training of psi (the text-to-DINO projection). The run "
                                       "folder loads as a model: talk2dino segment ... --model local-dir:RUN")
    train.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    add_dataclass_arguments(train.add_argument_group("Training"), TrainConfig)
    train.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    train.add_argument("--head-selection", default=None,
                       help="comma list of strategies (max,avg,cls,cls-weighted): one run each under --out/<name>, "
                            "plus a combined ablation table")
    train.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    _add_serve_parser(sub)
    from talk2dino.config import EvalConfig
    from talk2dino.evaluation import DATASET_NAMES, FOLDER_LAYOUT_HELP

    ev = sub.add_parser("eval", help="evaluate on the open-vocabulary benchmarks (mIoU)",
                        description="One benchmark (--dataset NAME --root DIR) or several (--suite all --data-root "
                                    "DIR) -> results.json and results.md with the paper's numbers beside ours. "
                                    "List-valued options (--bg-threshold 0.5,0.55) sweep. Resumable; runs under "
                                    "torchrun. Your own data: --dataset folder --root ROOT --classes-file FILE, "
                                    f"where {FOLDER_LAYOUT_HELP}. PAMR is off by default here (the paper's main "
                                    "rows; --pamr gives its '+ PAMR' rows), unlike `segment`, where it is on.")
    ev.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    ev.add_argument("--models", default=None,
                    help="comma-separated models to compare (the ablation table); overrides --model")
    ev.add_argument("--backbones", default=None,
                    help="comma-separated backbones to compare, each with the psi at the same position in "
                         "--projections (a psi is trained for one backbone)")
    ev.add_argument("--projections", default=None, help="comma-separated psi sources matching --backbones")
    add_dataclass_arguments(ev.add_argument_group("Evaluation"), EvalConfig)
    _set_help(ev, "dataset", f"one benchmark: {', '.join(DATASET_NAMES)} (folder: your own data, with --root "
                             "and --classes-file)")
    _set_help(ev, "pamr", "PAMR mask refinement (default off in eval: the paper's rows without refinement; --pamr "
                          "gives the '+ PAMR' rows. `segment` has it on by default)")
    ev.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    conv = sub.add_parser("convert", help="prepare benchmark label maps (COCO-Object/Stuff, Cityscapes, Context)")
    conv.add_argument("kind", choices=["coco-object", "coco-stuff", "cityscapes", "context"])
    conv.add_argument("source", help="raw maps folder (COCO stuffthingmaps), gtFine folder (Cityscapes), or the "
                                     "459-class annotation folder (Context)")
    conv.add_argument("--out", default=None, help="output folder (COCO; default: next to the raw maps)")
    conv.add_argument("--labels-file", default=None, help="Context: the official labels.txt of the 459 classes")
    conv.add_argument("--voc2010", default=None, help="Context: the VOCdevkit/VOC2010 folder to write into")
    conv.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")

    onnx = sub.add_parser("export-onnx", help="export the image side, text side and psi to ONNX",
                          description="Writes image_encoder.onnx, text_encoder.onnx, projection.onnx, the "
                                      "tokenizer and onnx_config.json (hashes); run them with --runtime onnx.")
    _add_model_args(onnx, runtime=False)
    onnx.add_argument("--out", required=True, help="output folder")
    onnx.add_argument("--image-size", type=int, default=None, help="window size (default: the model's, 448)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")

    sub.add_parser("models", help="list the registered models")
    for command_parser in sub.choices.values():
        _add_verbosity_args(command_parser)
    return parser


def _set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace the generated help of the flag stored in `dest` (e.g. to describe choices the config cannot)."""
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def _add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    """-v/-q after the subcommand too (``talk2dino segment x.jpg -v``). SUPPRESS: when not given there, the
    value parsed before the subcommand stands (argparse copies only what the subparser set)."""
    verbosity = parser.add_argument_group("Logging").add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="errors only, no progress bar")


def _add_serve_parser(sub: Any) -> None:
    """``talk2dino serve``: flags default to None so that `ServerConfig` (and its env overrides) decide."""
    serve = sub.add_parser(
        "serve", help="HTTP JSON API and web page over one model (needs the 'serve' extra)",
        description="Serve a model over HTTP: the web page at /, the JSON API at /v1 (schema at /openapi.json). "
                    "The model loads once; requests are queued and batched onto it. Every setting is also read "
                    "from TALK2DINO_SERVE_<NAME> (e.g. TALK2DINO_SERVE_PORT=9000); flags win.")
    _add_model_args(serve)
    _add_inference_args(serve)
    from talk2dino.server.config import ServerConfig

    d = ServerConfig()  # help shows the dataclass defaults; flags default to None so the dataclass decides
    net = serve.add_argument_group("Server")
    net.add_argument("--host", default=None, help=f"bind address (default {d.host}; 0.0.0.0 exposes it to the network)")
    net.add_argument("--port", type=int, default=None, help=f"TCP port (default {d.port})")
    net.add_argument("--max-connections", type=int, default=None,
                     help=f"concurrent connections before answering 503 (default {d.max_connections})")
    limits = serve.add_argument_group("Limits (a request over one gets a 4xx/503 answer)")
    limits.add_argument("--max-upload-bytes", type=int, default=None,
                        help=f"request body cap (default {d.max_upload_bytes})")
    limits.add_argument("--max-pixels", type=int, default=None,
                        help=f"image width x height cap (default {d.max_pixels})")
    limits.add_argument("--max-score-values", type=int, default=None,
                        help=f"image pixels x score channels cap, bounds memory (default {d.max_score_values})")
    limits.add_argument("--max-labels", type=int, default=None,
                        help=f"labels per request, at most 255 (default {d.max_labels})")
    limits.add_argument("--max-label-length", type=int, default=None,
                        help=f"characters per label (default {d.max_label_length})")
    limits.add_argument("--queue-size", type=int, default=None,
                        help=f"requests waiting for the model before answering 429 (default {d.queue_size})")
    limits.add_argument("--request-timeout", type=float, default=None,
                        help=f"seconds from arrival to answer, then 503 (default {d.request_timeout_s:g})")
    limits.add_argument("--body-timeout", type=float, default=None,
                        help=f"seconds to receive a request body, then 408 (default {d.body_timeout_s:g})")
    limits.add_argument("--shutdown-grace", type=float, default=None,
                        help=f"seconds in-flight requests get after SIGTERM, then 503 (default {d.shutdown_grace_s:g})")
    limits.add_argument("--max-batch", type=int, default=None,
                        help=f"queued requests whose images share one backbone pass (default {d.max_batch})")
    limits.add_argument("--feature-cache-size", type=int, default=None,
                        help="images whose features are kept, so a labels-only change skips the backbone "
                             f"(0: off; default {d.feature_cache_size})")
    limits.add_argument("--allow-image-url", action="store_true", default=None,
                        help="let clients send image_url for the server to fetch (default off: it fetches nothing)")
    limits.add_argument("--url-timeout", type=float, default=None,
                        help="seconds for a whole image_url fetch (lookup, connections, redirects, body), also "
                             f"within --request-timeout (default {d.url_timeout_s:g})")
    limits.add_argument("--url-allow-network", action="append", default=None, metavar="CIDR",
                        help="let image_url reach this non-public network too, e.g. 10.0.0.0/8 for a private "
                             "image store (repeatable; default: public addresses only)")


# Commands that load no model. They do not import transformers (over a second) or torch, so they start fast
# (benchmarks/bench_startup.py, tests/test_startup.py); None: no command, the help.
MODEL_FREE_COMMANDS = (None, "models", "convert")


def _configure_logging(verbose: bool, quiet: bool, command: str | None) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not verbose:
        # Third-party INFO chatter (hub downloads, weight loading) is noise for a CLI user.
        for name in ("transformers", "huggingface_hub", "urllib3", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if command in MODEL_FREE_COMMANDS:
            return
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # transformers missing is reported later, by create_model
            pass


def _create_model_from_args(args: argparse.Namespace) -> Any:
    """`create_model` from the "Model" flags (a name, or the three parts); --offline applies first."""
    from talk2dino.registry import create_model

    if args.offline:
        # huggingface_hub reads this when imported; our resolver reads TALK2DINO_OFFLINE on every call.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TALK2DINO_OFFLINE"] = "1"

    return create_model(
        args.model or (None if args.backbone and args.text_encoder and args.projection else DEFAULT_MODEL),
        device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        backbone=args.backbone, text_encoder=args.text_encoder, projection=args.projection,
    )


# The "Inference" flags and the `InferenceConfig` fields they set: a value refused by the config's own checks
# (`check_fields`, `InferenceConfig.validate`) is reported under its flag name.
_INFERENCE_FLAGS = {"background": "--background", "bg_threshold": "--bg-threshold", "bg_clean": "--bg-clean",
                    "pamr": "--pamr", "window_batch_size": "--window-batch-size"}


def _inference_config(args: argparse.Namespace, base: Any = None) -> Any:
    """The effective `InferenceConfig`: the "Inference" flags over `base`, validated.

    `base` is the loaded model's defaults; None (before loading) takes the registered model's defaults, which
    are plain data, or the dataclass defaults for a model folder, a composed model or ``--runtime onnx``. The
    flags' ranges do not depend on the base, so a bad flag fails here before any weights are resolved.

    Raises:
        InvalidInputError: an impossible value, worded with its flag (``--bg-threshold must be in (0, 1), got 2.0``).
    """
    import re

    from talk2dino.config import InferenceConfig, check_fields
    from talk2dino.errors import InvalidInputError

    if base is None:
        from talk2dino.catalog import registered_config

        onnx = getattr(args, "runtime", None) == "onnx"
        registered = None if onnx else registered_config(args.model or DEFAULT_MODEL)
        base = registered.inference if registered is not None else InferenceConfig()
    overrides = {k: getattr(args, k) for k in _INFERENCE_FLAGS if getattr(args, k, None) is not None}
    try:
        config = dataclasses.replace(base, **check_fields(InferenceConfig, overrides))
        config.validate()
    except ValueError as err:  # InvalidInputError is a ValueError too
        message = str(err).removeprefix("InferenceConfig.")
        field = re.match(r"\w+", message)
        if field is not None and field.group() in _INFERENCE_FLAGS:
            raise InvalidInputError(_INFERENCE_FLAGS[field.group()] + message[field.end():]) from err
        raise InvalidInputError(f"InferenceConfig: {message}") from err
    return config


def _check_model_flags(args: argparse.Namespace) -> None:
    """The "Model" flags that can be checked without loading anything (fail in a second, not after loading).

    Raises:
        InvalidInputError: --runtime onnx without --onnx-dir or with --compile; a --projection file that is no
            checkpoint (``it looks like a JPEG image``).
        WeightsError: a malformed --projection source.
    """
    from talk2dino.errors import InvalidInputError, one_line

    if getattr(args, "runtime", None) == "onnx":
        if not args.onnx_dir:
            raise InvalidInputError("--runtime onnx needs --onnx-dir (a folder written by `talk2dino export-onnx`)")
        if getattr(args, "compile", None):
            raise InvalidInputError("--compile applies to the torch runtime, not --runtime onnx")
        # The exported folder is the whole model: weight flags would be ignored, so they are refused.
        ignored = [flag for flag, value in (("--model", args.model), ("--backbone", args.backbone),
                                            ("--text-encoder", args.text_encoder), ("--projection", args.projection),
                                            ("--dtype", args.dtype)) if value]
        if ignored:
            raise InvalidInputError(f"{', '.join(ignored)} select torch weights; with --runtime onnx the model is "
                                    "the --onnx-dir folder (export another folder to change them)")
        return
    if args.projection:
        from talk2dino.weights import parse_source, sniff_not_checkpoint

        source = parse_source(args.projection)
        looks_like = sniff_not_checkpoint(source.location) if source.kind == "file" else None
        if looks_like is not None:
            raise InvalidInputError(f"--projection {one_line(args.projection)} is not a projection checkpoint "
                                    f"(.pth/.safetensors): it looks like {looks_like}")


def _build_segmenter(args: argparse.Namespace) -> Any:
    """The model of the "Model" flags with the "Inference" flags over its defaults, as a `Segmenter`."""
    from talk2dino.errors import InvalidInputError
    from talk2dino.predictor import Segmenter

    if args.runtime == "onnx":
        from talk2dino.models.onnx_runtime import load_onnx_model

        # `_check_model_flags`, run by every caller before anything loads, refused a missing --onnx-dir.
        model = load_onnx_model(args.onnx_dir, device=args.device or "cpu")
    else:
        model = _create_model_from_args(args)
    config = _inference_config(args, model.config.inference)
    if getattr(args, "compile", None):
        if args.runtime == "onnx":
            raise InvalidInputError("--compile applies to the torch runtime, not --runtime onnx")
        # TALK2DINO_COMPILE_BACKEND picks another torch.compile backend (e.g. aot_eager: tracing without
        # code generation, for machines without a C++ compiler, and for tests).
        model.backbone.compile_fast_path(backend=os.environ.get("TALK2DINO_COMPILE_BACKEND", "inductor"))
    return Segmenter(model, config)


def serve_config(args: argparse.Namespace) -> Any:
    """`ServerConfig` from the defaults, then ``TALK2DINO_SERVE_*`` variables, then the flags.

    Raises:
        InvalidInputError: an impossible value (named with its flag).
    """
    from talk2dino.server.config import ServerConfig

    return ServerConfig.from_env().replace(
        host=args.host, port=args.port, max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
        max_score_values=args.max_score_values, max_labels=args.max_labels, max_label_length=args.max_label_length,
        queue_size=args.queue_size, request_timeout_s=args.request_timeout, max_batch=args.max_batch,
        max_connections=args.max_connections, allow_image_url=args.allow_image_url, url_timeout_s=args.url_timeout,
        body_timeout_s=args.body_timeout, shutdown_grace_s=args.shutdown_grace,
        feature_cache_size=args.feature_cache_size,
        url_allow_networks=tuple(args.url_allow_network) if args.url_allow_network is not None else None,
    )


def run_serve(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: check the settings, load the model once, then serve until interrupted."""
    from talk2dino.errors import Talk2DinoError

    config = serve_config(args)
    _inference_config(args)  # the "Inference" and "Model" flags fail now, not after the model loaded
    _check_model_flags(args)
    try:
        from talk2dino.server.app import create_app, serve  # imports fastapi and uvicorn
    except ImportError as err:
        raise Talk2DinoError(
            f"talk2dino serve needs the 'serve' extra: pip install 'talk2dino[serve]' ({err})") from err
    segmenter = _build_segmenter(args)  # an unknown model or bad weights fail here, before the port opens
    app = create_app(segmenter, config)
    logger.info("serving %s on %s:%d (web page at /, API schema at /openapi.json)",
                segmenter.model.config.name, config.host, config.port)
    # Returns after a graceful stop on SIGTERM/SIGINT (in-flight requests finished or answered 503): exit 0.
    serve(app, log_level="warning" if args.quiet else "info")
    logger.info("server stopped")
    return 0


def run_segment(args: argparse.Namespace) -> int:
    """The ``segment`` subcommand; returns the exit code."""
    from tqdm import tqdm

    from talk2dino.data.images import list_images
    from talk2dino.errors import InvalidInputError, internal_error_guard
    from talk2dino.folder import (
        BackgroundWriter,
        MemoryBudget,
        check_output_folder,
        default_image_memory,
        default_workers,
        format_bytes,
        max_stem_bytes,
        output_names,
        parse_byte_size,
        plan_stems,
        prepared_batches,
        refuse_overwrites,
        remove_stale_temps,
        talk2dino_outputs,
    )
    from talk2dino.outputs import write_result_files
    from talk2dino.predictor import ImageFeatures

    started = time.time()  # temp files older than this are an interrupted run's, not a concurrent one's
    names = parse_label_list(args.labels) if args.labels is not None else read_label_file(args.labels_file)
    if args.underscores_to_spaces:
        names = [n.replace("_", " ") for n in names]
    paths = list_images(args.inputs)
    if not paths:
        raise InvalidInputError(f"no images found in {args.inputs}")
    batch_size = args.batch_size if args.batch_size is not None else 4
    alpha = args.overlay_alpha if args.overlay_alpha is not None else 0.5
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {batch_size}")
    if args.workers is not None and args.workers < 0:
        raise InvalidInputError(f"--workers must be >= 0, got {args.workers}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"--overlay-alpha must be in [0, 1], got {alpha}")
    memory_limit = (parse_byte_size(args.max_image_memory) if args.max_image_memory is not None
                    else default_image_memory())
    # Every flag is checked before any weights are resolved or loaded (seconds to minutes): a typo fails at once.
    from talk2dino.predictor import Segmenter

    Segmenter.check_labels(names, background=_inference_config(args).background)
    _check_label_count(len(names), background=_inference_config(args).background)
    _check_model_flags(args)
    # So many labels that even a small image's score maps exceed --max-image-memory: say so now, not per image.
    flag_config = _inference_config(args)
    MemoryBudget(memory_limit, len(names) + int(flag_config.background), flag_config).check_labels()
    # The output folder too (issue 14): usable, and no file there that this run did not create is written over.
    out_dir = Path(args.out or "talk2dino-out")
    check_output_folder(out_dir)
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
    segmenter = _build_segmenter(args)
    segmenter.set_classes(names)
    _check_label_count(len(names), background=segmenter.config.background)  # a model folder's own default
    device = segmenter.model.device
    workers = args.workers if args.workers is not None else default_workers(device)

    failed: list[str] = []
    # Progress in images, advanced as the work is done: each backbone chunk of `window_batch_size` windows moves
    # its images by their share of the embedding (`embed_share` of an image, measured on the previous batch),
    # and the rest once the image is segmented and written. So the bar and its ETA move during a batch's one
    # backbone call, which may take a minute on a CPU.
    progress = tqdm(total=len(paths), unit="img", disable=bool(args.quiet or args.no_progress), file=sys.stderr,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    embed_share = 0.5
    # Host work overlaps the model: the next batches are decoded by `workers` processes, and each image's
    # files are written on a background thread while the next batch runs (talk2dino.folder).
    writer = BackgroundWriter(max_pending=2 * batch_size)
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

                def on_windows(index: int, count: int, offset: int = 0, share: float = embed_share,
                               credited: list[float] = credited, windows: list[int] = windows) -> None:
                    step = min(share * count / windows[offset + index], share - credited[offset + index])
                    credited[offset + index] += step
                    progress.update(step)

                t0 = time.perf_counter()
                features: list[ImageFeatures | None]
                # Seconds of backbone time per image: the batch's time split by each image's share of its windows.
                embed_times = [0.0] * len(loaded)
                try:
                    features = list(segmenter.embed_images([item.image for item in loaded], progress=on_windows))
                    batch_time = time.perf_counter() - t0
                    embed_times = [batch_time * n / sum(windows) for n in windows]
                except InvalidInputError as err:  # one image's fault: find which, keep the others
                    logger.debug("batch failed (%s); retrying images one by one", err)
                    features = []
                    for k, item in enumerate(loaded):
                        t1 = time.perf_counter()
                        try:
                            features.append(segmenter.embed_images(
                                [item.image], progress=functools.partial(on_windows, offset=k))[0])
                        except InvalidInputError as one:
                            logger.error("%s: %s", item.path, one)
                            features.append(None)
                        embed_times[k] = time.perf_counter() - t1
                t_post = time.perf_counter()
                for k, (item, feats) in enumerate(zip(loaded, features, strict=True)):
                    path = item.path
                    if feats is None:
                        failed.append(str(path))
                        progress.update(1 - credited[k])
                        continue
                    try:
                        result = segmenter.predict_features(feats)
                        summary = segmenter.summary(result)
                        summary["timings"]["embed_image"] = round(embed_times[k], 6)
                    except InvalidInputError as err:
                        logger.error("%s: %s", path, err)
                        failed.append(str(path))
                        progress.update(1 - credited[k])
                        continue
                    assert item.image is not None
                    writer.submit(str(path), functools.partial(
                        write_result_files, out_dir, used[path], path, item.image.rgb, result, summary,
                        save_scores=bool(args.save_scores), overlay=not args.no_overlay, alpha=alpha,
                        features=feats, save_heatmaps=bool(args.save_heatmaps),
                        save_attention=bool(args.save_attention)),
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
        from talk2dino.errors import one_line

        # Each name escaped: a file name holding a line break must not forge a log line.
        shown = ", ".join(one_line(name, max_chars=1000) for name in failed[:10])
        shown += " ..." if len(failed) > 10 else ""
        logger.error("%d image(s) failed: %s", len(failed), shown)
        return 1
    return 0


def run_extract_command(args: argparse.Namespace) -> int:
    """The ``extract`` subcommand."""
    from talk2dino.config import ExtractConfig
    from talk2dino.extract.run import run_extract
    from talk2dino.recipes import build_config, load_recipe

    config = build_config(ExtractConfig, args, recipe=load_recipe(args.recipe) if args.recipe else None)
    out = run_extract(config, progress=not (args.quiet or args.no_progress))
    logger.info("features written to %s", out)
    return 0


def run_train_command(args: argparse.Namespace) -> int:
    """The ``train`` subcommand (one run, or one per --head-selection strategy plus a table)."""
    from talk2dino.config import TrainConfig
    from talk2dino.recipes import build_config, load_recipe
    from talk2dino.training.trainer import run_train

    config = build_config(TrainConfig, args, recipe=load_recipe(args.recipe) if args.recipe else None)
    progress = not (args.quiet or args.no_progress)
    if not args.head_selection:
        out = run_train(config, progress=progress, resume=bool(args.resume))
        logger.info("model folder written to %s (use --model local-dir:%s)", out, out)
        return 0
    from talk2dino.errors import InvalidInputError
    from talk2dino.training.ablation import ablation_table
    from talk2dino.training.targets import STRATEGIES

    strategies = parse_label_list(args.head_selection)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InvalidInputError(f"--head-selection: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    runs: dict[str, str | os.PathLike[str]] = {}
    for strategy in (s for s in STRATEGIES if s in strategies):
        run_config = dataclasses.replace(config, target_strategy=strategy, out=str(Path(config.out) / strategy))
        runs[strategy] = run_train(run_config, progress=progress, resume=bool(args.resume))
    table = ablation_table(runs)
    from talk2dino.fileio import atomic_write_bytes

    atomic_write_bytes(Path(config.out) / "ablation.md", table.encode("utf-8"))
    sys.stdout.write(table)
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand: results.json + results.md (one block per model with --models)."""
    from talk2dino.config import EvalConfig
    from talk2dino.evaluation.runner import run_eval
    from talk2dino.fileio import atomic_write_bytes
    from talk2dino.recipes import build_config, load_recipe

    config = build_config(EvalConfig, args, recipe=load_recipe(args.recipe) if args.recipe else None)
    progress = not (args.quiet or args.no_progress)
    variants: list[tuple[str, EvalConfig]] = []
    if args.backbones:
        from talk2dino.errors import InvalidInputError

        backbones = parse_label_list(args.backbones)
        projections = parse_label_list(args.projections) if args.projections else []
        if len(projections) != len(backbones):
            raise InvalidInputError(f"--backbones lists {len(backbones)} backbones but --projections "
                                    f"{len(projections)} psi files; give one psi per backbone")
        variants = [(b, dataclasses.replace(config, backbone=b, projection=p)) for b, p in zip(backbones, projections,
                                                                                             strict=True)]
    elif args.models:
        variants = [(name, dataclasses.replace(config, model=name)) for name in parse_label_list(args.models)]
    if not variants:
        sys.stdout.write(run_eval(config, progress=progress)["markdown"])
        return 0
    blocks = []
    for name, variant in variants:
        safe = name.replace("/", "_").replace(":", "_")
        result = run_eval(dataclasses.replace(variant, out=str(Path(config.out) / safe)), progress=progress)
        blocks.append(f"### {name}\n\n{result['markdown']}")
    table = "\n".join(blocks)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(config.out) / "ablation.md", table.encode("utf-8"))
    sys.stdout.write(table)
    return 0


def run_export_onnx(args: argparse.Namespace) -> int:
    """The ``export-onnx`` subcommand."""
    from talk2dino.export import export_onnx

    _check_model_flags(args)
    paths = export_onnx(_create_model_from_args(args), args.out, image_size=args.image_size, opset=args.opset)
    logger.info("exported %s", ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


def run_convert_command(args: argparse.Namespace) -> int:
    """The ``convert`` subcommand: prepare label maps in the layout `eval` reads."""
    from talk2dino.data import converters
    from talk2dino.errors import InvalidInputError

    if args.kind == "coco-object":
        counts = converters.convert_coco_object(args.source, args.out, overwrite=args.overwrite)
    elif args.kind == "coco-stuff":
        counts = converters.convert_coco_stuff(args.source, args.out, overwrite=args.overwrite)
    elif args.kind == "cityscapes":
        counts = converters.convert_cityscapes(args.source, overwrite=args.overwrite)
    else:
        if not args.labels_file or not args.voc2010:
            raise InvalidInputError(f"context needs --labels-file and --voc2010; {converters.CONTEXT_SOURCES_HELP}")
        counts = converters.convert_context(args.source, args.labels_file, args.voc2010, overwrite=args.overwrite)
    logger.info("%s: %s", args.kind, counts.describe())
    return 0


def run_models() -> int:
    """The ``models`` subcommand: print registered names and descriptions to stdout."""
    from talk2dino.catalog import describe_models  # pure data: no torch, no transformers

    for name, description in describe_models().items():
        sys.stdout.write(f"{name}\t{description}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting (so tests can call it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from talk2dino import __version__

        sys.stdout.write(f"talk2dino {__version__}\n")
        return 0
    _configure_logging(args.verbose, args.quiet, args.command)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from talk2dino.errors import InternalError, Talk2DinoError, internal_error_message, one_line

    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "extract":
            return run_extract_command(args)
        if args.command == "train":
            return run_train_command(args)
        if args.command == "eval":
            return run_eval_command(args)
        if args.command == "export-onnx":
            return run_export_onnx(args)
        if args.command == "convert":
            return run_convert_command(args)
        if args.command == "serve":
            return run_serve(args)
        return run_models()
    except InternalError as err:  # a run stopped on a failure that is no input's fault (issue 12)
        logger.debug("traceback of the internal error", exc_info=err.__cause__ or err)
        logger.error("%s", err)
        return 3
    except (Talk2DinoError, ValueError) as err:
        logger.error("%s", err)
        return 2
    except ImportError as err:
        # An optional extra that is not installed (onnxruntime, fastapi, ...): the command cannot start, and
        # the message (ours where we import it, names the extra) is the whole story.
        logger.error("%s", one_line(err))
        return 2
    except Exception as err:  # an unexpected failure outside the guarded loops: one line too, not a traceback
        if isinstance(err, OSError):
            raise  # a file or system problem (permissions, a full disk), not a bug to report
        logger.debug("traceback of the internal error", exc_info=err)
        logger.error("%s", internal_error_message(err))
        return 3
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
