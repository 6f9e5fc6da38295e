"""`talk2dino segment --out`: checked before the model loads, and never written over by surprise (issue 14)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_model_args as _model_args
from conftest import write_noise_image as _write_image

from talk2dino.cli import main


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is created: the out-folder checks must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("talk2dino.factory.create_model", refuse)


def _segment(image: Path, out: Path, tiny_sources: dict[str, str], *extra: str) -> int:
    return main(["segment", str(image), "--labels", "cat,dog", "--no-pamr", "--no-progress", "--out", str(out),
                 *extra, *_model_args(tiny_sources)])


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("ERROR")]


def test_out_naming_a_file_is_refused_before_loading(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    image = _write_image(tmp_path / "a.png")
    target = tmp_path / "out.txt"
    target.write_text("mine")
    assert _segment(image, target, tiny_sources) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(target) in lines[0] and "is a file, not a folder" in lines[0]
    assert target.read_text() == "mine"


def test_out_under_a_file_is_refused_before_loading(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    image = _write_image(tmp_path / "a.png")
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" / "sub"
    assert _segment(image, out, tiny_sources) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(out) in lines[0] and "cannot create the folder" in lines[0]


def test_unwritable_out_is_refused_before_loading(tiny_sources, no_model, tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    image = _write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()

    def denied(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, where chmod does not stop writes: the write probe itself is made to fail.
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert _segment(image, out, tiny_sources) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(out) in lines[0] and "not writable (Permission denied)" in lines[0]


def test_missing_out_is_created_and_probe_removed(tiny_sources, tmp_path: Path) -> None:
    image = _write_image(tmp_path / "a.png")
    out = tmp_path / "new" / "deeper"
    assert _segment(image, out, tiny_sources) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_labels.png", "a_legend.png", "a_overlay.png"]


def test_a_run_failing_before_any_output_leaves_no_new_folder(tiny_sources, tmp_path: Path, capsys) -> None:
    """A mistyped model fails after the folder check; the folder that check created is removed again (not its
    parents, and never a folder that was already there)."""
    image = _write_image(tmp_path / "a.png")
    out = tmp_path / "new" / "out"
    assert main(["segment", str(image), "--labels", "cat", "--out", str(out), "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "new").is_dir()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["segment", str(image), "--labels", "cat", "--out", str(existing), "--model", "no-such-model"]) == 2
    assert existing.is_dir()


def test_in_place_run_refuses_to_overwrite_user_files(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "inplace"
    folder.mkdir()
    _write_image(folder / "a.png")
    (folder / "a.json").write_text('{"mine": true}\n')
    assert main(["segment", str(folder), "--labels", "cat,dog", "--no-progress", "--out", str(folder),
                 *_model_args(tiny_sources)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "talk2dino did not write" in lines[0] and "a.json" in lines[0]
    assert "--overwrite" in lines[0]
    assert (folder / "a.json").read_text() == '{"mine": true}\n'


def test_input_image_is_never_written_over(tiny_sources, no_model, tmp_path: Path, capsys) -> None:
    # The case: the user's own a_labels.png beside a.png is an input, and a.png's label map would
    # replace it. Refused even with --overwrite.
    folder = tmp_path / "inplace"
    folder.mkdir()
    _write_image(folder / "a.png")
    user = _write_image(folder / "a_labels.png", seed=3)
    before = user.read_bytes()
    assert main(["segment", str(folder), "--labels", "cat,dog", "--no-progress", "--out", str(folder),
                 "--overwrite", *_model_args(tiny_sources)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "input image(s) a_labels.png" in lines[0]
    assert user.read_bytes() == before


def test_overwrite_replaces_user_files(tiny_sources, tmp_path: Path) -> None:
    image = _write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_legend.png").write_bytes(b"not ours")
    assert _segment(image, out, tiny_sources) == 2
    assert (out / "a_legend.png").read_bytes() == b"not ours"
    assert _segment(image, out, tiny_sources, "--overwrite") == 0
    assert (out / "a_legend.png").read_bytes() != b"not ours"


def test_rerun_into_same_folder_works_and_skips_earlier_outputs(tiny_sources, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "inplace"
    folder.mkdir()
    _write_image(folder / "a.png")
    argv = ["segment", str(folder), "--labels", "cat,dog", "--no-pamr", "--no-progress", "--out", str(folder),
            *_model_args(tiny_sources)]
    assert main(argv) == 0
    first = sorted(p.name for p in folder.iterdir())
    assert first == ["a.json", "a.png", "a_labels.png", "a_legend.png", "a_overlay.png"]
    # Again, in place, without --overwrite: the outputs are recognised as ours, and are not taken as inputs.
    assert main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == first
    assert json.loads((folder / "a.json").read_text())["image"].endswith("a.png")
    assert "skipping 3 earlier talk2dino output(s)" in capsys.readouterr().err


def test_same_stem_in_two_folders_is_planned_before_loading(tiny_sources, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _write_image(tmp_path / "x" / "p.png")
    b = _write_image(tmp_path / "y" / "p.png", seed=2)
    out = tmp_path / "out"
    assert main(["segment", str(a), str(b), "--labels", "cat,dog", "--no-pamr", "--no-progress", "--no-overlay",
                 "--out", str(out), *_model_args(tiny_sources)]) == 0
    assert json.loads((out / "p.json").read_text())["image"] == str(a)
    assert json.loads((out / "p_1.json").read_text())["image"] == str(b)
