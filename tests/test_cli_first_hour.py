"""The CLI's first hour (issue 13, points 10 and 12): mistakes a new user makes fail fast and read well.

Every flag is checked before a model loads, worded with the flag's name; -v/-q go after the subcommand too;
'#' lines in a labels file are comments; a photo passed as --projection is "not a checkpoint"; two inputs with
the same file name are renamed with a warning; the offline hint names ``hf download``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk2dino.cli import main
from talk2dino.cli.main import build_parser
from talk2dino.cli.segment import read_label_file
from talk2dino.errors import WeightsError


def _write_image(path: Path, h: int = 32, w: int = 40, seed: int = 0, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail the test if the CLI resolves or loads any model (factory.create_model or factory.load_onnx_model)."""
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("a model was loaded although a flag was invalid")

    monkeypatch.setattr("talk2dino.factory.create_model", refuse)
    monkeypatch.setattr("talk2dino.factory.load_onnx_model", refuse)
    return calls


# --------------------------------------------------------------------------- 1. flags checked before loading

@pytest.mark.parametrize("flags, message", [
    (["--bg-threshold", "2"], "--bg-threshold must be in (0, 1), got 2.0"),
    (["--bg-threshold", "-0.5", "--background"], "--bg-threshold must be in (0, 1), got -0.5"),
    (["--bg-threshold", "inf"], "--bg-threshold: expected a finite number, got inf"),
    (["--window-batch-size", "0"], "--window-batch-size must be positive, got 0"),
])
@pytest.mark.parametrize("command", ["segment", "serve"])
def test_bad_inference_flag_fails_before_any_model_loads(tmp_path: Path, capsys, no_model_load: list[object],
                                                         command: str, flags: list[str], message: str) -> None:
    img = _write_image(tmp_path / "x.png")
    head = ["segment", str(img), "--labels", "cat", "--out", str(tmp_path / "o")] if command == "segment" \
        else ["serve"]
    code = main([*head, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert no_model_load == []
    assert message in err
    assert "bg_threshold" not in err and "window_batch_size" not in err  # the flag's name, not the field's
    assert len(err.strip().splitlines()) == 1


def test_compile_with_onnx_runtime_fails_before_loading(tmp_path: Path, capsys, no_model_load: list[object]) -> None:
    img = _write_image(tmp_path / "x.png")
    code = main(["segment", str(img), "--labels", "cat", "--runtime", "onnx", "--onnx-dir", str(tmp_path),
                 "--compile"])
    assert code == 2 and no_model_load == []
    assert "--compile applies to the torch runtime, not --runtime onnx" in capsys.readouterr().err


def test_background_label_clash_fails_before_loading(tmp_path: Path, capsys, no_model_load: list[object]) -> None:
    img = _write_image(tmp_path / "x.png")
    code = main(["segment", str(img), "--labels", "background, cat", "--background"])
    assert code == 2 and no_model_load == []
    assert "clashes with the background channel" in capsys.readouterr().err


# --------------------------------------------------------------------------- 2. -v/-q after the subcommand

def test_verbosity_flags_after_the_subcommand(capsys) -> None:
    for argv, level in [
        (["models", "-v"], logging.DEBUG),
        (["models", "--quiet"], logging.ERROR),
        (["-q", "models"], logging.ERROR),  # before the subcommand still works: the subparser does not reset it
        (["models"], logging.INFO),
    ]:
        assert main(argv) == 0, argv
        assert logging.getLogger().level == level, argv
        assert "talk2dino-vitb14-reg" in capsys.readouterr().out


def test_verbose_after_segment_is_parsed(tmp_path: Path) -> None:
    args = build_parser().parse_args(["segment", str(tmp_path / "x.jpg"), "--labels", "cat", "-v"])
    assert args.verbose is True and args.quiet is False


# --------------------------------------------------------------------------- 3. '#' comments in labels files

def test_labels_file_hash_lines_are_comments(tmp_path: Path, capsys) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# animals\ncat\n   # an indented comment\nC# code\ndog # kept, not a comment\n#\n",
                    encoding="utf-8")
    assert read_label_file(str(path)) == ["cat", "C# code", "dog # kept, not a comment"]
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no labels"):
        read_label_file(str(only_comments))
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "lines starting with '#'" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- 4. a photo as --projection

def test_jpeg_as_projection_is_not_a_checkpoint(tiny_sources: dict[str, str], tmp_path: Path, capsys,
                                                no_model_load: list[object]) -> None:
    img = _write_image(tmp_path / "x.png")
    photo = _write_image(tmp_path / "photo.jpg", fmt="JPEG")
    code = main(["segment", str(img), "--labels", "cat", "--backbone", tiny_sources["backbone"],
                 "--text-encoder", tiny_sources["text_encoder"], "--projection", str(photo)])
    err = capsys.readouterr().err
    assert code == 2 and no_model_load == []
    assert f"--projection {photo} is not a projection checkpoint (.pth/.safetensors): it looks like a JPEG image" \
        in err
    assert "unpickle" not in err


@pytest.mark.parametrize("name, fmt, what", [
    ("photo.jpg", "JPEG", "a JPEG image"), ("psi.pth", "PNG", "a PNG image"), ("psi.safetensors", "JPEG",
                                                                                "a JPEG image"),
])
def test_load_state_dict_names_the_format_of_a_non_checkpoint(tmp_path: Path, name: str, fmt: str,
                                                              what: str) -> None:
    from talk2dino.weights import load_state_dict

    path = _write_image(tmp_path / name, fmt=fmt)
    with pytest.raises(WeightsError, match=f"is not a checkpoint .*: it looks like {what}") as info:
        load_state_dict(path)
    assert "unpickle" not in str(info.value)


# --------------------------------------------------------------------------- 5. same file name twice

def test_same_file_name_twice_warns_once_naming_both(tiny_sources: dict[str, str], tmp_path: Path,
                                                     capsys) -> None:
    first = _write_image(tmp_path / "a" / "x.png")
    second = _write_image(tmp_path / "b" / "x.png", seed=1)
    third = _write_image(tmp_path / "c" / "y.png", seed=2)
    out = tmp_path / "out"
    code = main(["segment", str(first), str(second), str(third), "--labels", "cat, dog", "--no-pamr",
                 "--no-progress", "--out", str(out), "--backbone", tiny_sources["backbone"],
                 "--text-encoder", tiny_sources["text_encoder"], "--projection", tiny_sources["projection"],
                 "--device", "cpu"])
    assert code == 0
    assert (out / "x.json").is_file() and (out / "x_1.json").is_file() and (out / "y.json").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, warnings
    assert str(first) in warnings[0] and str(second) in warnings[0] and "x_1" in warnings[0]


# --------------------------------------------------------------------------- 6. the offline hint

def test_offline_hint_names_hf_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from talk2dino.weights import resolve_model_dir

    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        resolve_model_dir("hf-hub:someorg/somerepo@v1", what="backbone", cache_dir=tmp_path)
    message = str(info.value)
    assert f"`hf download someorg/somerepo --revision v1 --cache-dir {tmp_path / 'hf'}`" in message
    assert "huggingface-cli" not in message


@pytest.mark.parametrize("flags", [["--model", "talk2dino-vitb14-reg"], ["--backbone", "local-dir:/x"],
                                   ["--projection", "psi.pth", "--dtype", "bfloat16"]])
def test_weight_flags_with_the_onnx_runtime_are_refused_not_ignored(tmp_path: Path, capsys, flags: list[str],
                                                                     no_model_load: list[object]) -> None:
    img = _write_image(tmp_path / "x.png")
    code = main(["segment", str(img), "--labels", "cat", "--runtime", "onnx", "--onnx-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and no_model_load == []
    assert "with --runtime onnx the model is the --onnx-dir folder" in err and flags[0] in err


def test_export_onnx_offers_no_runtime_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export-onnx", "--help"])
    help_text = capsys.readouterr().out
    assert "--runtime {" not in help_text and "--onnx-dir ONNX_DIR" not in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export-onnx", "--out", "x", "--runtime", "onnx"])


def test_onnx_export_silences_the_optimiser_info_logs() -> None:
    """onnx_ir / onnxscript log each pass at INFO (368 lines per export): off during an export, restored after."""
    pytest.importorskip("torch")
    from talk2dino.onnx.export import _quiet_exporter

    chatty = logging.getLogger("onnx_ir.passes.common")
    before = {name: logging.getLogger(name).level for name in ("onnx_ir", "onnxscript")}
    logging.getLogger("onnx_ir").setLevel(logging.INFO)
    try:
        with _quiet_exporter():
            assert not chatty.isEnabledFor(logging.INFO)
            assert not logging.getLogger("onnxscript.optimizer").isEnabledFor(logging.INFO)
        assert chatty.isEnabledFor(logging.INFO)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
