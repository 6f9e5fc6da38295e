"""`talk2dino eval`: an inference setting the user gives (recipe or flag) overrides the model's own default, even
when it equals `InferenceConfig`'s default; a setting not given keeps the model's (method.md §5.1).

The ViT-L entry's θ is 0.54 and `InferenceConfig`'s 0.55: an explicit 0.55 used to be taken for "not set" and
dropped, so the run silently used 0.54.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
from conftest import tiny_model_args
from test_eval_runner import make_voc

from talk2dino.cli import main
from talk2dino.config import EVAL_INFERENCE, EvalConfig, InferenceConfig
from talk2dino.errors import InvalidInputError

VITL = "talk2dino-vitl14-reg"  # its registry θ is 0.54 (method.md §4.6)
_GEOMETRY = ["--short-side", "56", "--window", "28", "--stride", "14", "--limit", "1", "--no-progress"]


def _eval(tiny_sources: dict[str, str], data: Path, out: Path, *extra: str, recipe: str | None = None) -> dict:
    argv = ["eval", "--dataset", "voc21", "--data-root", str(data), "--out", str(out), "--model", VITL,
            *tiny_model_args(tiny_sources), *_GEOMETRY, *extra]
    if recipe is not None:
        path = out.parent / f"{out.name}.yaml"
        path.write_text(recipe, encoding="utf-8")
        argv += ["--recipe", str(path)]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), stems=("2007_000001",))


def test_the_tiny_vitl_model_has_its_own_threshold(tiny_sources) -> None:
    from talk2dino.factory import create_model

    model = create_model(VITL, device="cpu", **tiny_sources)
    assert model.config.inference.bg_threshold == 0.54 != InferenceConfig().bg_threshold


def test_recipe_value_equal_to_the_class_default_overrides_the_model(tiny_sources, voc: Path, tmp_path: Path,
                                                                     capsys) -> None:
    written = _eval(tiny_sources, voc, tmp_path / "out", recipe="inference:\n  bg_threshold: 0.55\n")
    capsys.readouterr()
    assert [r["settings"]["inference"]["bg_threshold"] for r in written["records"]] == [0.55]
    assert written["config"]["inference_overrides"] == ["bg_threshold"]


def test_unset_setting_takes_the_model_default(tiny_sources, voc: Path, tmp_path: Path, capsys) -> None:
    written = _eval(tiny_sources, voc, tmp_path / "out", recipe="inference:\n  window_batch_size: 8\n")
    capsys.readouterr()
    inference = written["records"][0]["settings"]["inference"]
    assert inference["bg_threshold"] == 0.54  # not given: the model's
    assert written["config"]["inference_overrides"] == ["window_batch_size"]


def test_flags_override_the_model_default(tiny_sources, voc: Path, tmp_path: Path, capsys) -> None:
    # A one-value list flag is a one-run sweep; it overrides the model's θ whatever its value.
    written = _eval(tiny_sources, voc, tmp_path / "out", "--bg-threshold", "0.55", "--no-bg-clean")
    capsys.readouterr()
    inference = written["records"][0]["settings"]["inference"]
    assert (inference["bg_threshold"], inference["bg_clean"]) == (0.55, False)
    assert written["config"]["inference_overrides"] == ["bg_clean"]


def test_sweep_still_wins_run_by_run(tiny_sources, voc: Path, tmp_path: Path, capsys) -> None:
    written = _eval(tiny_sources, voc, tmp_path / "out", "--bg-threshold", "0.3,0.55",
                    recipe="inference:\n  bg_threshold: 0.4\n")
    capsys.readouterr()
    assert [r["options"]["bg_threshold"] for r in written["records"]] == [0.3, 0.55]
    assert [r["settings"]["inference"]["bg_threshold"] for r in written["records"]] == [0.3, 0.55]


def test_protocol_changes_apply_the_overrides() -> None:
    library = InferenceConfig()
    given = EvalConfig().with_inference(bg_threshold=library.bg_threshold, clean_head_embedding="logits")
    assert given.inference_overrides == ("bg_threshold", "clean_head_embedding")
    assert given.protocol_changes(background=True, bg_clean=True) == {
        "bg_threshold": 0.55, "clean_head_embedding": "logits", "background": True, "pamr": False, "bg_clean": True}
    # Not listed and equal to the class default: the model's value stays (as before).
    plain = EvalConfig(inference=dataclasses.replace(EVAL_INFERENCE, bg_threshold=0.55))
    assert "bg_threshold" not in plain.protocol_changes(background=True, bg_clean=True)
    # A value that differs from the class default applies whether listed or not.
    other = EvalConfig(inference=dataclasses.replace(EVAL_INFERENCE, window_batch_size=2))
    assert other.protocol_changes(background=False, bg_clean=False)["window_batch_size"] == 2


def test_overrides_are_checked_and_kept_in_order() -> None:
    config = EvalConfig(inference_overrides=("window", "bg_threshold", "window"))  # type: ignore[arg-type]
    assert config.inference_overrides == ("bg_threshold", "window")
    with pytest.raises(InvalidInputError, match="inference_overrides.*'bg_treshold'"):
        EvalConfig(inference_overrides=("bg_treshold",)).validate()


def test_results_config_round_trips_and_old_files_still_load(tmp_path: Path) -> None:
    config = EvalConfig(dataset="voc21").with_inference(bg_threshold=0.55)
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert saved["inference_overrides"] == ["bg_threshold"]
    assert EvalConfig.from_dict(saved) == config
    # A results.json written before the overrides were recorded: every inference value is listed, none was
    # marked, so it means what it meant then (only values unlike the class defaults apply).
    old = {key: value for key, value in saved.items() if key != "inference_overrides"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = EvalConfig.from_dict(old)
    assert loaded.inference_overrides == () and loaded.inference.bg_threshold == 0.55
    assert "bg_threshold" not in loaded.protocol_changes(background=True, bg_clean=True)


def test_eval_help_has_no_flag_for_the_record(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--inference-overrides" not in capsys.readouterr().out
