"""Untrusted files: malicious pickles, broken safetensors, hostile configs, zip bombs, hash pins, traversal.

Every loading entry point must refuse a bad file with a one-line `Talk2DinoError` (house-style §11)
and never run code from it: each malicious pickle below would create a marker file if unpickled.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_tiny_dinov2, save_tiny_projection

from talk2dino.config import ModelConfig, ProjectionConfig
from talk2dino.errors import Talk2DinoError, WeightsError
from talk2dino.factory import load_projection
from talk2dino.models.projection import PROJECTION_FILE, Projection, projection_dims
from talk2dino.registry import (
    MODEL_CONFIG_FILE,
    _check_folder_sources,
    get_model_config,
    save_model_folder,
)
from talk2dino.weights import load_state_dict, parse_source, resolve_file, url_file_name

SRC = Path(__file__).resolve().parents[1] / "src" / "talk2dino"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "talk2dino-weights"


def assert_one_line(err: BaseException) -> None:
    """The house rule for error messages: one actionable line."""
    message = str(err)
    assert message and "\n" not in message, repr(message)


# ---------------------------------------------------------------------------------------------------
# 1. Static audit: no unsafe deserialisation anywhere in the package.
# ---------------------------------------------------------------------------------------------------

def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                base = func.value
                prefix = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                out.append((f"{prefix}.{func.attr}", node))
            elif isinstance(func, ast.Name):
                out.append((func.id, node))
    return out


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<non-constant>"
    return None


_FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
    "marshal.load", "marshal.loads", "shelve.open", "joblib.load", "yaml.load", "yaml.unsafe_load",
    "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all", "yaml.full_load_all", "os.system", "os.popen",
    "eval", "exec", "compile", "__import__", "tarfile.open", "zipfile.extractall", "extractall", "extract",
}


def test_static_audit_no_unsafe_deserialisation() -> None:
    problems: list[str] = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "marshal", "shelve"):
                problems.append(f"{rel}:{node.lineno}: from {node.module} import ...")
            if isinstance(node, ast.ImportFrom) and node.module == "yaml" and any(
                    a.name in ("load", "unsafe_load", "full_load", "Loader", "UnsafeLoader") for a in node.names):
                problems.append(f"{rel}:{node.lineno}: from yaml import an unsafe loader")
        for name, call in _calls(tree):
            where = f"{rel}:{call.lineno}: {name}"
            short = name.split(".")[-1]
            if name in _FORBIDDEN_CALLS or (short in ("extractall",) and name.endswith("extractall")):
                problems.append(where)
            if name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (None, False):
                problems.append(f"{where} with allow_pickle")
            if _keyword(call, "trust_remote_code") not in (None, False):
                problems.append(f"{where} with trust_remote_code")
            if name.startswith("subprocess.") and (_keyword(call, "shell") not in (None, False)
                                                   or (call.args and not isinstance(call.args[0], ast.List))):
                problems.append(f"{where} with a shell or a non-literal command")
    assert not problems, "unsafe deserialisation or execution in the package:\n" + "\n".join(problems)


def test_static_audit_catches_a_regression(tmp_path: Path) -> None:
    """The scanner itself works: it flags a torch.load without weights_only and a yaml.load."""
    tree = ast.parse("import torch, yaml\nx = torch.load('a')\ny = yaml.load('b')\n"
                     "z = torch.load('c', weights_only=True)")
    names = [(n, _keyword(c, "weights_only")) for n, c in _calls(tree)]
    assert ("torch.load", None) in names and ("yaml.load", None) in names and ("torch.load", True) in names


# ---------------------------------------------------------------------------------------------------
# 2. Malicious pickles at every loading entry point.
# ---------------------------------------------------------------------------------------------------

class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Tensorish:
    """A payload hidden next to real tensors, the way a trojaned state dict would carry it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_malicious(path: Path, marker: Path, variant: str) -> Path:
    """Write a checkpoint whose unpickling would create `marker`."""
    good = {"linear_layer.weight": torch.zeros(32, 512), "linear_layer.bias": torch.zeros(32)}
    if variant == "torch-zip-system":
        torch.save({**good, "hidden_layers.0.weight": _System(marker)}, path)
    elif variant == "torch-zip-exec":
        torch.save({**good, "x": _Exec(marker)}, path)
    elif variant == "torch-legacy":
        torch.save({**good, "x": _Tensorish(marker)}, path, _use_new_zipfile_serialization=False)
    elif variant == "raw-pickle-p0":
        path.write_bytes(pickle.dumps(_System(marker), protocol=0))
    elif variant == "raw-pickle-p5":
        path.write_bytes(pickle.dumps({"w": _Exec(marker)}, protocol=5))
    else:  # pragma: no cover
        raise AssertionError(variant)
    # Prove the file is live: a plain unsafe unpickle in a throw-away check would fire (not done here).
    return path


VARIANTS = ["torch-zip-system", "torch-zip-exec", "torch-legacy", "raw-pickle-p0", "raw-pickle-p5"]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a malicious checkpoint ran code"


def test_payload_is_real(tmp_path: Path) -> None:
    """The payload does fire under an unsafe load, so the refusals below are meaningful."""
    marker = tmp_path / "fired"
    path = make_malicious(tmp_path / "evil.pth", marker, "torch-zip-system")
    torch.load(path, weights_only=False)  # noqa: S614 - deliberately unsafe, on our own payload
    assert marker.exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_malicious_checkpoint_refused_by_load_state_dict(tmp_path: Path, marker: Path, variant: str) -> None:
    path = make_malicious(tmp_path / "evil.pth", marker, variant)
    with pytest.raises(WeightsError, match="not a loadable checkpoint") as info:
        load_state_dict(path)
    assert_one_line(info.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_malicious_checkpoint_refused_as_projection_file_and_url(tmp_path: Path, marker: Path, variant: str) -> None:
    path = make_malicious(tmp_path / "evil.pth", marker, variant)
    for source, pin in ((str(path), None), (path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest())):
        with pytest.raises(WeightsError) as info:
            load_projection(ProjectionConfig(source=source, sha256=pin), out_dim=32, pretrained=True,
                             cache_dir=tmp_path / "cache")
        assert_one_line(info.value)


def test_malicious_projection_refused_by_create_model(tiny_sources: dict[str, str], tmp_path: Path,
                                                      marker: Path) -> None:
    """The --projection path of every CLI command goes through create_model(projection=...)."""
    from talk2dino import create_model

    path = make_malicious(tmp_path / "evil.pth", marker, "torch-zip-system")
    with pytest.raises(WeightsError, match="refused to unpickle") as info:
        create_model(None, device="cpu", backbone=tiny_sources["backbone"],
                     text_encoder=tiny_sources["text_encoder"], projection=str(path))
    assert_one_line(info.value)


def test_malicious_training_checkpoint_refused(tmp_path: Path, marker: Path) -> None:
    from talk2dino.training.run_folder import load_checkpoint

    path = make_malicious(tmp_path / "checkpoint.pt", marker, "torch-zip-system")
    with pytest.raises(Talk2DinoError) as info:
        load_checkpoint(path)
    assert_one_line(info.value)


def _model_folder(folder: Path, backbone: str = "hf-hub:facebook/dinov2-with-registers-base") -> Path:
    config = ModelConfig.from_dict({
        "name": "x", "backbone": {"source": backbone}, "text": {"source": "hf-hub:openai/clip-vit-base-patch16"},
        "projection": {"source": None}})
    psi = Projection(512, 32)
    save_model_folder(folder, config, psi)
    return folder


def test_malicious_files_in_local_dir_model_folder(tmp_path: Path, marker: Path) -> None:
    folder = _model_folder(tmp_path / "model")
    assert get_model_config(f"local-dir:{folder}").name == "x"  # the honest folder loads
    # psi replaced by a pickle under the safetensors name: safetensors refuses it, no unpickling.
    make_malicious(folder / PROJECTION_FILE, marker, "torch-zip-system")
    config = get_model_config(f"local-dir:{folder}")
    with pytest.raises(WeightsError) as info:
        load_projection(config.projection, out_dim=32, pretrained=True, cache_dir=tmp_path / "cache")
    assert_one_line(info.value)
    # the config itself replaced by a pickle
    make_malicious(folder / MODEL_CONFIG_FILE, marker, "raw-pickle-p0")
    with pytest.raises(WeightsError, match="invalid model configuration") as info:
        get_model_config(f"local-dir:{folder}")
    assert_one_line(info.value)


def test_malicious_backbone_and_text_weights_in_local_dir(tmp_path: Path, marker: Path) -> None:
    """transformers folders whose weights are a pickled payload (pytorch_model.bin): never unpickled."""
    from conftest import save_tiny_clip

    from talk2dino.factory import load_backbone, load_text_encoder

    folder = save_tiny_dinov2(tmp_path / "dino")
    (folder / "model.safetensors").unlink()
    make_malicious(folder / "pytorch_model.bin", marker, "torch-zip-system")
    with pytest.raises(WeightsError, match="GLOBAL") as info:
        load_backbone(f"local-dir:{folder}", dtype=torch.float32, cache_dir=tmp_path / "cache")
    assert_one_line(info.value)
    clip = save_tiny_clip(tmp_path / "clip")
    (clip / "model.safetensors").unlink()
    make_malicious(clip / "pytorch_model.bin", marker, "torch-zip-exec")
    with pytest.raises(WeightsError, match="GLOBAL") as info:
        load_text_encoder(f"local-dir:{clip}", context_length=77, cache_dir=tmp_path / "cache")
    assert_one_line(info.value)


# ---------------------------------------------------------------------------------------------------
# 3. Broken safetensors and state dicts.
# ---------------------------------------------------------------------------------------------------

def _psi_state(out_dim: int = 32, in_dim: int = 512) -> dict[str, torch.Tensor]:
    return {"linear_layer.weight": torch.randn(out_dim, in_dim), "linear_layer.bias": torch.randn(out_dim),
            "hidden_layers.0.weight": torch.randn(out_dim, out_dim), "hidden_layers.0.bias": torch.randn(out_dim)}


def _load_psi(path: Path, tmp_path: Path) -> Projection:
    psi, _ = load_projection(ProjectionConfig(source=str(path)), out_dim=32, pretrained=True,
                              cache_dir=tmp_path / "cache")
    return psi


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def test_valid_safetensors_and_pth_load(tmp_path: Path) -> None:
    (tmp_path / "ok.safetensors").write_bytes(_safetensors_bytes(_psi_state()))
    _load_psi(tmp_path / "ok.safetensors", tmp_path)
    _load_psi(save_tiny_projection(tmp_path / "ok.pth"), tmp_path)


def _bad_safetensors(kind: str) -> bytes:
    good = _safetensors_bytes(_psi_state())
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    if kind == "random":
        return os.urandom(256)
    if kind == "empty":
        return b""
    if kind == "header-too-long":
        return struct.pack("<Q", 1 << 40) + good[8:]
    if kind == "header-not-json":
        return struct.pack("<Q", 16) + b"{not json at all" + good[8 + n:]
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind in ("offsets-outside", "bad-dtype-name", "shape-lies"):
        key = "linear_layer.weight"
        if kind == "offsets-outside":
            header[key]["data_offsets"] = [0, 1 << 40]
        elif kind == "bad-dtype-name":
            header[key]["dtype"] = "PICKLE"
        else:
            header[key]["shape"] = [64, 512]
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n:]
    state = _psi_state()
    if kind == "int-dtype":
        state = {k: (v * 100).to(torch.int64) for k, v in state.items()}
    elif kind == "bool-dtype":
        state = {k: v > 0 for k, v in state.items()}
    elif kind == "wrong-shape":
        state["hidden_layers.0.weight"] = torch.randn(32, 16)
    elif kind == "other-backbone":
        state = _psi_state(out_dim=48)
    elif kind == "extra-key":
        state["evil"] = torch.zeros(1)
    elif kind == "missing-key":
        del state["hidden_layers.0.bias"]
    elif kind == "nan":
        state["linear_layer.bias"][3] = float("nan")
    elif kind == "inf":
        state["hidden_layers.0.weight"][0, 0] = float("inf")
    elif kind == "legacy-duplicate":
        state["linear_layer2.weight"] = state["hidden_layers.0.weight"].clone()
    elif kind == "vector-weight":
        state["linear_layer.weight"] = torch.randn(512)
    elif kind == "zero-size":
        state = {k: v[:0] for k, v in state.items()}
    else:  # pragma: no cover
        raise AssertionError(kind)
    return _safetensors_bytes(state)


SAFETENSORS_CASES = ["random", "empty", "header-too-long", "header-not-json", "truncated", "offsets-outside",
                     "bad-dtype-name", "shape-lies", "int-dtype", "bool-dtype", "wrong-shape", "other-backbone",
                     "extra-key", "missing-key", "nan", "inf", "legacy-duplicate", "vector-weight", "zero-size"]


@pytest.mark.parametrize("kind", SAFETENSORS_CASES)
def test_bad_safetensors_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "psi.safetensors"
    path.write_bytes(_bad_safetensors(kind))
    with pytest.raises(WeightsError) as info:
        _load_psi(path, tmp_path)
    assert_one_line(info.value)


@pytest.mark.parametrize("state", [
    [torch.zeros(2)], {"a": 1}, {1: torch.zeros(2)}, {"a": {"b": torch.zeros(2)}}, torch.zeros(3), "text", None,
    {"a": torch.zeros(2).to_sparse()}, {"linear_layer.weight": torch.zeros(3, 0)},
])
def test_bad_pth_state_refused(tmp_path: Path, state: Any) -> None:
    path = tmp_path / "psi.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        projection_dims(load_state_dict(path))
    assert_one_line(info.value)


# ---------------------------------------------------------------------------------------------------
# Zip bombs and truncated zip checkpoints.
# ---------------------------------------------------------------------------------------------------

def _zip_bomb(path: Path, size: int = 200 << 20) -> Path:
    """A torch-shaped zip whose storage entry inflates to `size` bytes of zeros."""
    good = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, good)
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as src, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(entry, "w", force_zip64=True) as out:
                    chunk = bytes(1 << 20)
                    for _ in range(size >> 20):
                        out.write(chunk)
            else:
                dst.writestr(info.filename, src.read(info.filename))
    return path


def test_zip_bomb_refused_before_inflating(tmp_path: Path) -> None:
    path = _zip_bomb(tmp_path / "bomb.pth")
    assert path.stat().st_size < 2 << 20
    with pytest.raises(WeightsError, match="zip bomb") as info:
        load_state_dict(path)
    assert_one_line(info.value)


def test_truncated_zip_checkpoints_refused(tmp_path: Path) -> None:
    good = save_tiny_projection(tmp_path / "good.pth").read_bytes()
    for i, cut in enumerate([10, 100, len(good) // 3, len(good) // 2, len(good) - 30, len(good) - 1]):
        path = tmp_path / f"cut{i}.pth"
        path.write_bytes(good[:cut])
        with pytest.raises(WeightsError) as info:
            load_state_dict(path)
        assert_one_line(info.value)


# ---------------------------------------------------------------------------------------------------
# Hostile model configs (talk2dino.json).
# ---------------------------------------------------------------------------------------------------

def _valid_config() -> dict[str, Any]:
    return ModelConfig.from_dict({"name": "x", "backbone": {"source": "hf-hub:facebook/dinov2-small"},
                                  "text": {"source": "hf-hub:openai/clip-vit-base-patch16"},
                                  "projection": {"source": None}}).to_dict()


def _mutate(path: str, value: Any) -> dict[str, Any]:
    config = _valid_config()
    *parents, last = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value
    return config


BAD_CONFIGS: dict[str, Any] = {
    "list": [1, 2],
    "string": "x",
    "null": None,
    "missing-text": {"name": "x", "backbone": {"source": "a"}},
    "unknown-top": {**_valid_config(), "evil": 1},
    "unknown-nested": _mutate("inference.evil", 1),
    "name-int": _mutate("name", 5),
    "source-int": _mutate("backbone.source", 5),
    "source-list": _mutate("text.source", ["a"]),
    "backbone-list": _mutate("backbone", [1]),
    "short-side-str": _mutate("inference.short_side", "448"),
    "short-side-float": _mutate("inference.short_side", 4.5),
    "short-side-bool": _mutate("inference.short_side", True),
    "short-side-huge": _mutate("inference.short_side", 10**30),
    "in-dim-huge": _mutate("projection.in_dim", 10**9),
    "in-dim-zero": _mutate("projection.in_dim", 0),
    "context-huge": _mutate("text.context_length", 1 << 40),
    "threshold-nan": _mutate("inference.bg_threshold", float("nan")),
    "threshold-inf": _mutate("inference.bg_threshold", float("inf")),
    "threshold-big-int": _mutate("inference.bg_threshold", 10**400),
    "mean-short": _mutate("backbone.image_mean", [0.5, 0.5]),
    "mean-nan": _mutate("backbone.image_mean", [0.5, float("nan"), 0.5]),
    "dilations-str": _mutate("inference.pamr_dilations", "1,2"),
    "dilations-huge": _mutate("inference.pamr_dilations", [10**9]),
    "profile-bad": _mutate("profile", "1999"),
    "rope-bad": _mutate("backbone.logits_rope", 1),
    "pin-traversal": _mutate("projection.sha256", "../../../../../../tmp/" + "a" * 43),
    "pin-short": _mutate("projection.git_blob_sha1", "abc"),
    "nul-in-source": _mutate("backbone.source", "hf-hub:a/b\0"),
    "templates-nested": _mutate("text.templates", [["a"]]),
    "bg-clean-str": _mutate("inference.bg_clean", "yes"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_model_config_refused(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    # allow_nan: Python's json writes NaN/Infinity tokens, which json.loads accepts: exactly the hostile case
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(BAD_CONFIGS[name]), encoding="utf-8")
    with pytest.raises(WeightsError, match="invalid model configuration") as info:
        get_model_config(f"local-dir:{folder}")
    assert_one_line(info.value)


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00garbage", b"[" * 100_000, b"{", b"", b"1e999999", b" " * (2 << 20)])
def test_unparseable_model_config_refused(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / MODEL_CONFIG_FILE).write_bytes(raw)
    with pytest.raises(WeightsError) as info:
        get_model_config(f"local-dir:{tmp_path}")
    assert_one_line(info.value)


def test_valid_model_config_round_trips(tmp_path: Path) -> None:
    (tmp_path / MODEL_CONFIG_FILE).write_text(json.dumps(_valid_config()), encoding="utf-8")
    config = get_model_config(f"local-dir:{tmp_path}")
    assert config.to_dict()["inference"] == _valid_config()["inference"]


# ---------------------------------------------------------------------------------------------------
# 3. Hash pins (file:// URLs: no network).
# ---------------------------------------------------------------------------------------------------

def test_url_download_with_wrong_pin_is_refused_and_deleted(tmp_path: Path) -> None:
    src = save_tiny_projection(tmp_path / "psi.pth")
    actual = hashlib.sha256(src.read_bytes()).hexdigest()
    wrong = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        resolve_file(src.as_uri(), what="projection", cache_dir=cache, sha256=wrong)
    assert wrong in str(info.value) and actual in str(info.value)
    assert_one_line(info.value)
    assert not [p for p in cache.rglob("*") if p.is_file()], "a file failing its pin stayed in the cache"


def test_url_download_with_wrong_git_blob_pin_is_refused(tmp_path: Path) -> None:
    src = save_tiny_projection(tmp_path / "psi.pth")
    with pytest.raises(WeightsError, match="expected " + "1" * 40):
        resolve_file(src.as_uri(), what="projection", cache_dir=tmp_path / "c", git_blob_sha1="1" * 40)


def test_tampered_cache_file_is_deleted_and_refetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_tiny_projection(tmp_path / "psi.pth")
    pin = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    dest, digest = resolve_file(src.as_uri(), what="projection", cache_dir=cache, sha256=pin)
    assert digest == pin and dest.is_relative_to(cache)
    dest.write_bytes(dest.read_bytes()[:-1] + b"X")  # a bit-rotted or swapped cache entry
    dest2, digest2 = resolve_file(src.as_uri(), what="projection", cache_dir=cache, sha256=pin)
    assert digest2 == pin and dest2.read_bytes() == src.read_bytes()
    # offline: a tampered cache entry is deleted and reported, never used
    dest2.write_bytes(b"tampered")
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")
    with pytest.raises(WeightsError, match="offline") as info:
        resolve_file(src.as_uri(), what="projection", cache_dir=cache, sha256=pin)
    assert_one_line(info.value)
    assert not dest2.exists()


def test_local_file_with_wrong_pin_is_refused_but_not_deleted(tmp_path: Path) -> None:
    src = save_tiny_projection(tmp_path / "psi.pth")
    with pytest.raises(WeightsError, match="expected " + "a" * 64):
        resolve_file(str(src), what="projection", sha256="a" * 64)
    assert src.exists()  # the user's own file is never deleted


@pytest.mark.reference
@pytest.mark.parametrize("name", ["talk2dino-vitb14-reg", "talk2dino-vitb14-reg.2024", "talk2dinov3-vitb16"])
def test_registry_pins_match_the_authors_files(name: str) -> None:
    files = {"talk2dino-vitb14-reg": "vitb_mlp_infonce.pth", "talk2dinov3-vitb16": "dinov3_vitb_mlp_infonce.pth",
             "talk2dino-vitb14-reg.2024": "superseded_2024-11-21_d354136/vitb_mlp_infonce.pth"}
    path = REFERENCE / files[name]
    if not path.is_file():
        pytest.skip(f"reference weights absent: {path}")
    config = get_model_config(name).projection
    assert config.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_registry_entry_is_pinned() -> None:
    from talk2dino.registry import list_models

    for name in list_models():
        psi = get_model_config(name).projection
        assert (psi.sha256 and len(psi.sha256) == 64) or (psi.git_blob_sha1 and len(psi.git_blob_sha1) == 40), name


# ---------------------------------------------------------------------------------------------------
# 4. Path traversal.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    "hf-hub:../..", "hf-hub:org/..", "hf-hub:../repo", "hf-hub:/etc/passwd", "hf-hub:/etc", "hf-hub:a/b/c",
    "hf-hub:a/b@../../x", "hf-hub:a/b@main/../../x", "hf-hub:a/b@/abs", "hf-hub:a/b@x//y", "hf-hub:a/b@.",
    "hf-hub:a\\b/c", "hf-hub:a/b\0", "hf-hub:.hidden/x", "hf-hub:a/b@-rf",
])
def test_traversing_hub_ids_and_revisions_refused(spec: str) -> None:
    with pytest.raises(WeightsError) as info:
        parse_source(spec)
    assert_one_line(info.value)


@pytest.mark.parametrize("spec", ["hf-hub:facebook/dinov2-small", "hf-hub:facebook/dinov2-small@main",
                                  "hf-hub:openai/clip-vit-base-patch16@refs/pr/1",
                                  "hf-hub:a/b@4918c2df1d00c644ecc7f34de070694af1a8bc69"])
def test_honest_hub_ids_accepted(spec: str) -> None:
    assert parse_source(spec).kind == "hf-hub"


@pytest.mark.parametrize("url", [
    "file:///tmp/..", "https://h/a/..", "https://h/a/%2e%2e", "https://h/a/..%2f..%2fetc%2fpasswd",
    "https://h/a/x?name=../../y", "https://h/a/#../../z", "https://h/", "https://h/a/.hidden", "https://h/a/%00",
])
def test_url_names_never_leave_the_pin_folder(url: str) -> None:
    name = url_file_name(url)
    assert "/" not in name and ".." not in name and not name.startswith(".") and "\0" not in name


def test_url_with_traversing_name_stays_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALK2DINO_OFFLINE", "1")  # no network: the error names where the file would go
    cache = tmp_path / "cache"
    for url in ("https://h/a/..", "https://h/a/%2e%2e", "https://h/a/..%2f..%2f..%2fx"):
        with pytest.raises(WeightsError, match="offline") as info:
            resolve_file(url, what="projection", cache_dir=cache)
        where = Path(str(info.value).split(" is not cached at ")[1].split(" and offline")[0])
        assert where.resolve().is_relative_to(cache.resolve()) and where.name == "weights.bin"


@pytest.mark.parametrize("pin", ["../../../../tmp/" + "a" * 49, "/" + "a" * 63, "g" * 64, "a" * 63])
def test_malformed_pins_refused(tmp_path: Path, pin: str) -> None:
    src = save_tiny_projection(tmp_path / "psi.pth")
    with pytest.raises(WeightsError, match="bad hash pin"):
        resolve_file(src.as_uri(), what="projection", cache_dir=tmp_path / "cache", sha256=pin)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("backbone", ["local-dir:../../outside", "local-dir:sub/../../x", "../weights/dino"])
def test_local_model_folder_config_cannot_climb_out(tmp_path: Path, backbone: str) -> None:
    folder = _model_folder(tmp_path / "model", backbone=backbone)
    with pytest.raises(WeightsError, match="climbs out") as info:
        get_model_config(f"local-dir:{folder}")
    assert_one_line(info.value)


def test_local_model_folder_may_name_absolute_local_dirs(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model", backbone=f"local-dir:{tmp_path / 'dino'}")
    assert get_model_config(f"local-dir:{folder}").backbone.source == f"local-dir:{tmp_path / 'dino'}"


@pytest.mark.parametrize("backbone", ["local-dir:/etc", "/etc/passwd", "https://evil.example/x.pth",
                                      "hf-hub:a/b@../../x"])
def test_hub_model_folder_config_may_only_name_hub_sources(tmp_path: Path, backbone: str) -> None:
    folder = _model_folder(tmp_path / "model", backbone=backbone)
    config = ModelConfig.from_dict(json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    with pytest.raises(WeightsError) as info:
        _check_folder_sources(config, folder / MODEL_CONFIG_FILE, from_hub=True)
    assert_one_line(info.value)
    _check_folder_sources(ModelConfig.from_dict(_valid_config()), folder, from_hub=True)  # honest one passes
