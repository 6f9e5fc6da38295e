"""The "Model" and "Inference" flags shared by ``segment``, ``serve`` and ``export-onnx``, and the model and
`Segmenter` they build.

The "Inference" flags are generated from `InferenceConfig` (`talk2dino.cli.flags`); they override the loaded
model's own defaults (its registry entry or model folder), never restate them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from talk2dino.cli.flags import add_config_flags
from talk2dino.config import DEFAULT_MODEL, InferenceConfig
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.settings import check_fields, field_flag

INFERENCE_FIELDS = ("background", "bg_threshold", "bg_clean", "pamr", "window_batch_size")
"""The `InferenceConfig` fields ``segment`` and ``serve`` have flags for (``--bg-threshold`` ...)."""
_FLAGS = {f.name: field_flag(f) for f in dataclasses.fields(InferenceConfig)}


def add_model_flags(parser: argparse.ArgumentParser, *, runtime: bool = True) -> None:
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


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """The "Inference" flags: `INFERENCE_FIELDS` of `InferenceConfig`, and --compile."""
    title = "Inference (defaults: the model's benchmark settings)"
    add_config_flags(parser, InferenceConfig, title=title, only=INFERENCE_FIELDS)
    group = next(g for g in parser._action_groups if g.title == title)
    group.add_argument("--compile", action="store_true", default=None,
                       help="run the backbone through torch.compile (slow first call per batch shape; pays off "
                            "over many images, mostly on GPU)")


def create_model_from_args(args: argparse.Namespace) -> Any:
    """`create_model` from the "Model" flags (a name, or the three parts); --offline applies first."""
    from talk2dino.factory import create_model

    if args.offline:
        # huggingface_hub reads this when imported; our resolver reads TALK2DINO_OFFLINE on every call.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TALK2DINO_OFFLINE"] = "1"

    return create_model(
        args.model or (None if args.backbone and args.text_encoder and args.projection else DEFAULT_MODEL),
        device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        backbone=args.backbone, text_encoder=args.text_encoder, projection=args.projection,
    )


def inference_config(args: argparse.Namespace, base: InferenceConfig | None = None) -> InferenceConfig:
    """The effective `InferenceConfig`: the "Inference" flags over `base`, validated.

    `base` is the loaded model's defaults; None (before loading) takes the registered model's defaults, which
    are plain data, or the dataclass defaults for a model folder, a composed model or ``--runtime onnx``. The
    flags' ranges do not depend on the base, so a bad flag fails here before any weights are resolved.

    Raises:
        InvalidInputError: an impossible value, worded with its flag (``--bg-threshold must be in (0, 1), got 2.0``).
    """
    if base is None:
        from talk2dino.catalog import registered_config

        onnx = getattr(args, "runtime", None) == "onnx"
        registered = None if onnx else registered_config(args.model or DEFAULT_MODEL)
        base = registered.inference if registered is not None else InferenceConfig()
    overrides = {k: getattr(args, k) for k in INFERENCE_FIELDS if getattr(args, k, None) is not None}
    try:
        config = dataclasses.replace(base, **check_fields(InferenceConfig, overrides))
        config.validate()
    except ValueError as err:  # InvalidInputError is a ValueError too
        # A value refused by the config's own checks is reported under its flag name.
        message = str(err).removeprefix("InferenceConfig.")
        field = re.match(r"\w+", message)
        if field is not None and field.group() in INFERENCE_FIELDS:
            raise InvalidInputError(_FLAGS[field.group()] + message[field.end():]) from err
        raise InvalidInputError(f"InferenceConfig: {message}") from err
    return config


def check_model_flags(args: argparse.Namespace) -> None:
    """The "Model" flags that can be checked without loading anything (fail in a second, not after loading).

    Raises:
        InvalidInputError: --runtime onnx without --onnx-dir or with --compile; a --projection file that is no
            checkpoint (``it looks like a JPEG image``).
        WeightsError: a malformed --projection source.
    """
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


def build_segmenter(args: argparse.Namespace) -> Any:
    """The model of the "Model" flags with the "Inference" flags over its defaults, as a `Segmenter`."""
    from talk2dino.predictor import Segmenter

    if args.runtime == "onnx":
        from talk2dino.factory import load_onnx_model

        # `check_model_flags`, run by every caller before anything loads, refused a missing --onnx-dir.
        model = load_onnx_model(args.onnx_dir, device=args.device or "cpu")
    else:
        model = create_model_from_args(args)
    config = inference_config(args, model.config.inference)
    if getattr(args, "compile", None):
        if args.runtime == "onnx":
            raise InvalidInputError("--compile applies to the torch runtime, not --runtime onnx")
        # TALK2DINO_COMPILE_BACKEND picks another torch.compile backend (e.g. aot_eager: tracing without
        # code generation, for machines without a C++ compiler, and for tests).
        model.backbone.compile_fast_path(backend=os.environ.get("TALK2DINO_COMPILE_BACKEND", "inductor"))
    return Segmenter(model, config)
