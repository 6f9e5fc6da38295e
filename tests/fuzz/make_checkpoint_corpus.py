"""Regenerate the regression corpus of bad checkpoints, model configs and recipes (issue 8).

Run from the repository root: ``python tests/fuzz/make_checkpoint_corpus.py``. The inputs are derived
from fixed seeds, so a rerun gives the same cases (torch's zip writer adds its own serialisation id, so
``.pth`` bytes may differ, not their content). Every file must load to a valid object or be refused
with a one-line ``Talk2DinoError``; ``test_checkpoints_props.py`` and ``test_recipes_props.py`` check that.
Malicious pickles here only *name* a harmless global (``builtins.print``): they are refused all the same.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import struct
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent / "corpus"
CHECKPOINTS = ROOT / "checkpoints"
CONFIGS = CHECKPOINTS / "model-configs"
RECIPES = ROOT / "recipes"


class _Payload:
    """Names builtins.print as a global: a stand-in for os.system that is harmless if ever run."""

    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("corpus payload ran",))


def _psi(out_dim: int = 8, in_dim: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"linear_layer.weight": torch.randn(out_dim, in_dim, generator=g),
            "linear_layer.bias": torch.randn(out_dim, generator=g),
            "hidden_layers.0.weight": torch.randn(out_dim, out_dim, generator=g),
            "hidden_layers.0.bias": torch.randn(out_dim, generator=g)}


def _torch_bytes(obj: object, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def _st_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def checkpoint_cases() -> dict[str, bytes]:
    """Name (with suffix) -> bytes of each checkpoint case."""
    rng = random.Random(8)
    good_pth = _torch_bytes(_psi())
    good_st = _st_bytes(_psi())
    (n,) = struct.unpack("<Q", good_st[:8])
    header = json.loads(good_st[8:8 + n])
    cases: dict[str, bytes] = {"valid.pth": good_pth, "valid.safetensors": good_st}
    cases["empty.pth"] = b""
    cases["empty.safetensors"] = b""
    cases["pickle-global.pth"] = pickle.dumps(_Payload(), protocol=2)
    cases["pickle-global-p0.pth"] = pickle.dumps({"w": _Payload()}, protocol=0)
    cases["torch-zip-global.pth"] = _torch_bytes({**_psi(), "x": _Payload()})
    cases["torch-legacy-global.pth"] = _torch_bytes({"x": _Payload()}, _use_new_zipfile_serialization=False)
    cases["torch-legacy-valid.pth"] = _torch_bytes(_psi(), _use_new_zipfile_serialization=False)
    cases["pickle-deep-list.pth"] = b"\x80\x02" + b"]" * 5000 + b"."
    cases["pickle-int.pth"] = pickle.dumps(7, protocol=2)
    for i, cut in enumerate((1, 8, 30, 100, len(good_pth) // 4, len(good_pth) // 2, len(good_pth) - 22,
                             len(good_pth) - 1)):
        cases[f"truncated-{i}.pth"] = good_pth[:cut]
    for i, cut in enumerate((4, 8, 9, n + 4, n + 8, len(good_st) // 2, len(good_st) - 1)):
        cases[f"truncated-{i}.safetensors"] = good_st[:cut]
    for i in range(10):  # random bit flips in the zip checkpoint
        data = bytearray(good_pth)
        for _ in range(1 + i):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        cases[f"bitflip-{i}.pth"] = bytes(data)
    for i in range(6):  # random bit flips in the safetensors header
        data = bytearray(good_st)
        data[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        cases[f"header-bitflip-{i}.safetensors"] = bytes(data)
    for i in range(4):
        cases[f"random-{i}.pth"] = rng.randbytes(64 << i)
        cases[f"random-{i}.safetensors"] = rng.randbytes(64 << i)
    cases["header-len-huge.safetensors"] = struct.pack("<Q", 1 << 62) + good_st[8:]
    cases["header-len-zero.safetensors"] = struct.pack("<Q", 0) + good_st[8:]

    def with_header(change: dict[str, object]) -> bytes:
        new = json.loads(json.dumps(header))
        new["linear_layer.weight"].update(change)
        raw = json.dumps(new).encode()
        return struct.pack("<Q", len(raw)) + raw + good_st[8 + n:]

    cases["offsets-outside.safetensors"] = with_header({"data_offsets": [0, 1 << 40]})
    cases["offsets-reversed.safetensors"] = with_header({"data_offsets": [100, 0]})
    cases["dtype-unknown.safetensors"] = with_header({"dtype": "PICKLE"})
    cases["shape-lies.safetensors"] = with_header({"shape": [16, 512]})
    cases["shape-negative.safetensors"] = with_header({"shape": [-8, 512]})
    variants: dict[str, dict[str, torch.Tensor]] = {
        "int64": {k: (v * 10).long() for k, v in _psi().items()},
        "bool": {k: v > 0 for k, v in _psi().items()},
        "float16": {k: v.half() for k, v in _psi().items()},
        "complex": {k: v.to(torch.complex64) for k, v in _psi().items()},
        "extra-key": {**_psi(), "evil": torch.zeros(1)},
        "missing-key": {k: v for k, v in _psi().items() if k != "linear_layer.bias"},
        "wrong-shape": {**_psi(), "hidden_layers.0.weight": torch.zeros(8, 3)},
        "nan": {**_psi(), "linear_layer.bias": torch.full((8,), float("nan"))},
        "inf": {**_psi(), "linear_layer.bias": torch.full((8,), float("inf"))},
        "legacy-name": {("linear_layer2" + k[len("hidden_layers.0"):] if k.startswith("hidden") else k): v
                        for k, v in _psi().items()},
        "legacy-duplicate": {**_psi(), "linear_layer2.weight": torch.zeros(8, 8)},
        "vector-weight": {**_psi(), "linear_layer.weight": torch.zeros(512)},
        "zero-size": {k: v[:0] for k, v in _psi().items()},
        # A placeholder psi (issue 14): every text would get the same embedding; refused at load.
        "all-zeros": {k: torch.zeros_like(v) for k, v in _psi().items()},
        "zero-first-weight": {**_psi(), "linear_layer.weight": torch.zeros(8, 512)},
        "zero-second-weight": {**_psi(), "hidden_layers.0.weight": torch.zeros(8, 8)},
        "zero-legacy-weight": {**{k: v for k, v in _psi().items() if not k.startswith("hidden")},
                               "linear_layer2.weight": torch.zeros(8, 8), "linear_layer2.bias": torch.ones(8)},
        "scalar": {"linear_layer.weight": torch.tensor(1.0)},
        "empty-dict": {},
    }
    for name, state in variants.items():
        cases[f"{name}.safetensors"] = _st_bytes(state)
        cases[f"{name}.pth"] = _torch_bytes(state)
    for name, obj in {"list": [torch.zeros(2)], "nested": {"a": {"b": torch.zeros(2)}}, "int-key": {1: torch.zeros(2)},
                      "str-value": {"a": "b"}, "tensor": torch.zeros(3), "none": None,
                      "sparse": {"a": torch.zeros(2).to_sparse()}}.items():
        cases[f"not-state-dict-{name}.pth"] = _torch_bytes(obj)
    bomb = io.BytesIO()  # a torch-shaped zip whose storage inflates to 100 MiB of zeros
    with zipfile.ZipFile(io.BytesIO(_torch_bytes({"w": torch.zeros(4)}))) as src, \
            zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(entry, "w", force_zip64=True) as out:
                    for _ in range(100):
                        out.write(bytes(1 << 20))
            else:
                dst.writestr(info.filename, src.read(info.filename))
    cases["zip-bomb.pth"] = bomb.getvalue()
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("hello.txt", "not a checkpoint")
    cases["foreign-zip.pth"] = plain_zip.getvalue()
    return cases


def _valid_config() -> dict[str, object]:
    return {"name": "x", "backbone": {"source": "hf-hub:facebook/dinov2-small"},
            "text": {"source": "hf-hub:openai/clip-vit-base-patch16"}, "projection": {"source": None},
            "inference": {"short_side": 448}, "profile": "2025"}


def config_cases() -> dict[str, bytes]:
    """Name -> bytes of each talk2dino.json case."""
    rng = random.Random(9)
    cases: dict[str, bytes] = {"valid.json": json.dumps(_valid_config()).encode()}
    raw = {"empty": b"", "not-utf8": b"\xff\xfe\x00{", "truncated": json.dumps(_valid_config()).encode()[:40],
           "deep": b"[" * 50_000, "deep-objects": b'{"a":' * 20_000, "nan-token": b"NaN", "huge-exp": b"1e99999",
           "bom": b"\xef\xbb\xbf" + json.dumps(_valid_config()).encode(), "nul": b"\x00" * 64,
           # A key given twice (issue 14): json keeps the last silently, so the hidden one would win.
           "duplicate-std": json.dumps(_valid_config()).encode().replace(
               b'"backbone": {', b'"backbone": {"image_std": [0.229, 0.224, 0.225], "image_std": [0, 0, 0], ', 1),
           "duplicate-top": json.dumps(_valid_config()).encode()[:-1] + b', "name": "y"}',
           "duplicate-inference": json.dumps(_valid_config()).encode().replace(
               b'"inference": {', b'"inference": {"bg_threshold": 0.55, "bg_threshold": 0.99, ', 1)}
    for name, data in raw.items():
        cases[f"{name}.json"] = data
    mutations: list[tuple[str, str, object]] = [
        ("list", "", [1, 2]), ("string", "", "x"), ("null", "", None), ("int", "", 5),
        ("unknown-top", "evil", 1), ("unknown-nested", "inference.evil", 1), ("name-int", "name", 5),
        ("name-null", "name", None), ("source-int", "backbone.source", 5), ("source-list", "text.source", ["a"]),
        ("backbone-list", "backbone", [1]), ("backbone-null", "backbone", None), ("text-str", "text", "x"),
        ("short-side-str", "inference.short_side", "448"), ("short-side-float", "inference.short_side", 4.5),
        ("short-side-bool", "inference.short_side", True), ("short-side-huge", "inference.short_side", 10**30),
        ("short-side-negative", "inference.short_side", -1), ("in-dim-huge", "projection.in_dim", 10**9),
        ("in-dim-zero", "projection.in_dim", 0), ("context-huge", "text.context_length", 1 << 40),
        ("batch-zero", "text.batch_size", 0), ("threshold-nan", "inference.bg_threshold", float("nan")),
        ("threshold-inf", "inference.bg_threshold", float("-inf")), ("threshold-one", "inference.bg_threshold", 1),
        ("threshold-big-int", "inference.bg_threshold", 10**400), ("mean-short", "backbone.image_mean", [0.5, 0.5]),
        ("mean-nan", "backbone.image_mean", [0.5, float("nan"), 0.5]), ("mean-str", "backbone.image_mean", "0.5"),
        ("dilations-str", "inference.pamr_dilations", "1,2"), ("dilations-huge", "inference.pamr_dilations", [10**9]),
        ("dilations-empty", "inference.pamr_dilations", []), ("dilations-long", "inference.pamr_dilations", [1] * 5000),
        ("profile-bad", "profile", "1999"), ("profile-int", "profile", 2025), ("rope-bad", "backbone.logits_rope", 1),
        ("pin-traversal", "projection.sha256", "../../../../../../tmp/" + "a" * 43),
        ("pin-short", "projection.git_blob_sha1", "abc"), ("pin-int", "projection.sha256", 5),
        ("nul-in-source", "backbone.source", "hf-hub:a/b\x00"), ("templates-nested", "text.templates", [["a"]]),
        ("templates-str", "text.templates", "a {}"), ("bg-clean-str", "inference.bg_clean", "yes"),
        ("stride-over-window", "inference.stride", 10_000), ("long-name", "name", "x" * 10_000),
        ("hub-traversal", "backbone.source", "hf-hub:../.."), ("revision-traversal", "text.source", "hf-hub:a/b@../x"),
        ("local-climb", "backbone.source", "local-dir:../../outside"), ("file-climb", "backbone.source", "../x.pth"),
        ("lambda-negative", "inference.clean_lambda", -1.0), ("pamr-negative", "inference.pamr_iterations", -3),
        ("head-embedding-bad", "inference.clean_head_embedding", "max"),
        # Normalisation and context values that run but give garbage (issue 14).
        ("std-zero", "backbone.image_std", [0, 0, 0]), ("std-negative", "backbone.image_std", [-0.229, 0.224, 0.225]),
        ("std-tiny", "backbone.image_std", [1e-30, 1e-30, 1e-30]), ("std-huge", "backbone.image_std", [1e6, 1, 1]),
        ("std-inf", "backbone.image_std", [float("inf"), 0.2, 0.2]), ("mean-huge", "backbone.image_mean", [1e6, 0, 0]),
        ("mean-inf", "backbone.image_mean", [float("-inf"), 0.5, 0.5]), ("context-one", "text.context_length", 1),
        ("context-two", "text.context_length", 2), ("context-zero", "text.context_length", 0),
    ]
    for name, path, value in mutations:
        config: object = json.loads(json.dumps(_valid_config()))
        if path == "":
            config = value
        else:
            *parents, last = path.split(".")
            node = config
            for p in parents:
                node = node[p]  # type: ignore[index]
            node[last] = value  # type: ignore[index]
        cases[f"{name}.json"] = json.dumps(config).encode()
    for i in range(6):  # random byte damage
        data = bytearray(json.dumps(_valid_config()).encode())
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases[f"damaged-{i}.json"] = bytes(data)
    return cases


def recipe_cases() -> dict[str, bytes]:
    """Name -> bytes of each YAML recipe case (read as a TrainConfig recipe)."""
    rng = random.Random(10)
    valid = "features: feats\nout: run\nepochs: 2\nlr: 1.0e-4\nbetas: [0.9, 0.999]\nrecall_ks: [1, 5]\n"
    texts = {
        "valid": valid, "valid-yaml11-float": "features: f\nout: o\nlr: 1e-4\n", "empty": "", "comment-only": "# x\n",
        "list": "- a\n- b\n", "scalar": "42\n", "string": "hello\n", "null": "~\n",
        "python-object": "!!python/object/apply:os.system ['touch /tmp/PWNED']\n",
        "python-name": "x: !!python/name:os.system\n", "python-module": "x: !!python/module:os\n",
        "python-tuple": "betas: !!python/tuple [0.9, 0.99]\n", "binary": "features: !!binary aGVsbG8=\nout: o\n",
        "set": "features: !!set {a, b}\nout: o\n", "timestamp": "features: !!timestamp 2001-12-14\nout: o\n",
        "unknown-key": valid + "evil: 1\n", "int-key": valid + "1: 2\n", "null-key": valid + "~: 2\n",
        "list-key": "? [a, b]\n: 1\n", "epochs-str": "features: f\nout: o\nepochs: ten\n",
        "epochs-float": "features: f\nout: o\nepochs: 2.5\n", "epochs-bool": "features: f\nout: o\nepochs: yes\n",
        "epochs-huge": "features: f\nout: o\nepochs: " + "9" * 400 + "\n", "lr-nan": "features: f\nout: o\nlr: .nan\n",
        "lr-inf": "features: f\nout: o\nlr: .inf\n", "lr-str": "features: f\nout: o\nlr: fast\n",
        "lr-list": "features: f\nout: o\nlr: [1]\n", "betas-short": "features: f\nout: o\nbetas: [0.9]\n",
        "betas-str": "features: f\nout: o\nbetas: 0.9\n", "betas-nested": "features: f\nout: o\nbetas: [[1], [2]]\n",
        "recall-str": "features: f\nout: o\nrecall_ks: [a]\n", "recall-long": "features: f\nout: o\nrecall_ks: ["
        + ",".join(["1"] * 3000) + "]\n", "strategy-bad": "features: f\nout: o\ntarget_strategy: best\n",
        "strategy-int": "features: f\nout: o\ntarget_strategy: 1\n", "features-int": "features: 1\nout: o\n",
        "features-null": "features: ~\nout: o\n", "features-map": "features: {a: 1}\nout: o\n",
        "missing-required": "epochs: 2\n", "tab-indent": "features: f\n\tout: o\n", "bad-indent": "a:\n b: 1\n  c: 2\n",
        "unclosed-flow": "features: [a, b\n", "unclosed-quote": "features: 'abc\n", "duplicate-anchor-alias": "a: *x\n",
        "billion-laughs": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "features: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nout: o\n",
        "deep-flow": "features: " + "[" * 3000 + "]" * 3000 + "\nout: o\n",
        "deep-block": "".join("  " * i + f"k{i}:\n" for i in range(300)),
        "multi-doc": valid + "---\n" + valid, "nul-byte": "features: f\x00\nout: o\n",
        "on-device-str": "features: f\nout: o\non_device: maybe\n",
        "seed-negative-str": "features: f\nout: o\nseed: '-1'\n",
        "merge-key": "base: &b {epochs: 2}\n<<: *b\nfeatures: f\nout: o\n",
        "long-string": "features: " + "x" * 5000 + "\nout: o\n",
        # Issue 14: duplicate keys at any depth (PyYAML keeps the last silently).
        "duplicate-key": valid + "epochs: 100000000\n", "duplicate-key-first": "epochs: 1\n" + valid,
        "duplicate-key-quoted": valid + "'epochs': 3\n", "duplicate-key-flow": "{features: f, out: o, features: g}\n",
        "duplicate-key-nested": valid + "betas2: {a: 1, a: 2}\n", "duplicate-key-in-list": "features: f\nout: o\n"
        "recall_ks: [{k: 1, k: 2}]\n", "duplicate-key-same-value": valid + "lr: 1.0e-4\n",
        "merge-explicit": "? !!merge <<\n: {epochs: 2}\nfeatures: f\nout: o\n",
        # YAML 1.1 scalars that PyYAML reads as numbers, booleans or dates: strings here, refused by type.
        "yaml11-sexagesimal": "features: f\nout: o\nseed: 1:20\n", "yaml11-octal": "features: f\nout: o\nseed: 010\n",
        "yaml11-hex": "features: f\nout: o\nseed: 0x1F\n", "yaml11-binary": "features: f\nout: o\nseed: 0b101\n",
        "yaml11-underscore": "features: f\nout: o\nbatch_size: 1_000\n",
        "yaml11-on": "features: f\nout: o\non_device: on\n", "yaml11-off": "features: f\nout: o\non_device: off\n",
        "yaml11-y": "features: f\nout: o\non_device: y\n", "yaml11-no": "features: f\nout: o\non_device: no\n",
        "yaml11-inf": "features: f\nout: o\nepochs: .inf\n", "yaml11-nan": "features: f\nout: o\ntemperature: .nan\n",
        "yaml11-date-seed": "features: f\nout: o\nseed: 2001-12-14\n",
        "yaml11-sexagesimal-float": "features: f\nout: o\nlr: 1:20.5\n",
        "yaml11-on-key": "features: f\nout: o\non: 1\n",
        "tagged-int-hex": "features: f\nout: o\nseed: !!int 0x1F\n",
        "tagged-bool-yes": "features: f\nout: o\non_device: !!bool yes\n",
        "tagged-float-inf": "features: f\nout: o\nlr: !!float .inf\n",
        "lr-quoted": "features: f\nout: o\nlr: '1e-4'\n",
        "lr-exponent-overflow": "features: f\nout: o\nlr: 1e400\n",
        # Numbers of the right type outside the documented ranges (the `range` metadata of the config fields).
        "epochs-1e8": "features: f\nout: o\nepochs: 100000000\n", "epochs-zero": "features: f\nout: o\nepochs: 0\n",
        "epochs-negative": "features: f\nout: o\nepochs: -5\n",
        "epochs-10e12": "features: f\nout: o\nepochs: 1000000000000\n",
        "batch-huge": "features: f\nout: o\nbatch_size: 1000000000000\n",
        "lr-zero": "features: f\nout: o\nlr: 0.0\n", "lr-negative": "features: f\nout: o\nlr: -1.0e-4\n",
        "lr-huge": "features: f\nout: o\nlr: 1.0e+10\n", "seed-negative": "features: f\nout: o\nseed: -1\n",
        "temperature-zero": "features: f\nout: o\ntemperature: 0.0\n",
        "betas-one": "features: f\nout: o\nbetas: [0.9, 1.0]\n", "recall-zero": "features: f\nout: o\nrecall_ks: [0]\n",
        "max-steps-huge": "features: f\nout: o\nmax_steps: 100000000000000\n",
        "eval-every-zero": "features: f\nout: o\neval_every: 0\n",
        # Valid under the YAML 1.2 rules: a date-like or yes-like folder name is text.
        "valid-date-is-text": "features: 2001-12-14\nout: 'yes'\n",
        "valid-yaml12-scalars": "features: f\nout: o\non_device: True\nloss_divide_by_batch_squared: false\n"
        "lr: 1e-4\nseed: 0\nepochs: 100000\nmax_steps: ~\n",
    }
    cases = {f"{name}.yaml": text.encode("utf-8") for name, text in texts.items()}
    cases["not-utf8.yaml"] = b"features: \xff\xfe\nout: o\n"
    cases["utf16.yaml"] = valid.encode("utf-16")
    for i in range(6):
        data = bytearray(valid.encode())
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(32, 127)
        cases[f"damaged-{i}.yaml"] = bytes(data)
    return cases


def write_all() -> dict[str, int]:
    """Write every case under ``corpus/``; returns the count per folder."""
    counts = {}
    for folder, cases in ((CHECKPOINTS, checkpoint_cases()), (CONFIGS, config_cases()), (RECIPES, recipe_cases())):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
        for name, data in cases.items():
            (folder / name).write_bytes(data)
        counts[str(folder.relative_to(ROOT))] = len(cases)
    return counts


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder, count in write_all().items():
        logger.info("%s: %d files", folder, count)
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    logger.info("total %d bytes", total)
