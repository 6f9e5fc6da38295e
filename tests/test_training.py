"""Training psi (method.md §3.4–3.6): targets, loss, learnability, resume, run folder, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from talk2dino.config import TrainConfig
from talk2dino.data.features import FEATURE_FORMAT, FeatureFormatError
from talk2dino.training.loop import Callback, EpochStats, Trainer
from talk2dino.training.loss import infonce_loss
from talk2dino.training.run import run_train
from talk2dino.training.run_folder import CHECKPOINT_FILE, LOG_FILE, TrainingError
from talk2dino.training.strategies import batch_image_embeddings, cls_weighted, select_heads, unit

TAU = 0.07


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def write_features(folder: Path, *, heads: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor,
                   cls: torch.Tensor | None = None, backbone: str = "local-dir:/nonexistent/dino",
                   text_source: str = "local-dir:/nonexistent/clip", shard_images: int = 64,
                   shard_captions: int = 200, id_offset: int = 1000) -> Path:
    """Write a features folder in the ``talk2dino-features/1`` layout (shards + manifest)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    num_images, num_heads, dim = heads.shape
    image_ids = torch.arange(num_images, dtype=torch.long) + id_offset
    mean_heads = heads.float().mean(1)
    cls = torch.randn(num_images, dim, generator=torch.Generator().manual_seed(7)) if cls is None else cls
    image_shards, caption_shards = [], []
    for s, start in enumerate(range(0, num_images, shard_images)):
        rows = slice(start, start + shard_images)
        name = f"images-000-{s:05d}.safetensors"
        save_file({"image_ids": image_ids[rows].contiguous(), "heads": heads[rows].half().contiguous(),
                   "mean_heads": mean_heads[rows].half().contiguous(), "cls": cls[rows].half().contiguous()},
                  str(folder / name))
        image_shards.append({"file": name, "count": len(image_ids[rows])})
    caption_ids = torch.arange(len(text), dtype=torch.long)
    for s, start in enumerate(range(0, len(text), shard_captions)):
        rows = slice(start, start + shard_captions)
        name = f"captions-000-{s:05d}.safetensors"
        save_file({"caption_ids": caption_ids[rows].contiguous(),
                   "image_ids": image_ids[caption_image[rows]].contiguous(), "text": text[rows].half().contiguous()},
                  str(folder / name))
        caption_shards.append({"file": name, "count": len(caption_ids[rows])})
    manifest = {
        "format": FEATURE_FORMAT, "complete": True,
        "backbone": {"source": backbone, "embed_dim": dim, "num_heads": num_heads},
        "text": {"source": text_source, "embed_dim": int(text.shape[1])},
        "images": num_images, "captions": len(text),
        "image_shards": image_shards, "caption_shards": caption_shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def synthetic_split(num_images: int, *, num_heads: int, dim: int, captions_per_image: int, seed: int,
                    mapping_seed: int = 0, noise: float = 0.05) -> dict[str, torch.Tensor]:
    """Heads at random; each caption is a fixed nonlinear map of one "true" head of its image, plus noise.

    text = tanh(A · v̂_{i,h(i)}) + noise, with A ``[512, D]`` fixed by `mapping_seed` (shared by splits).
    """
    g = torch.Generator().manual_seed(seed)
    heads = torch.randn(num_images, num_heads, dim, generator=g)
    true_head = torch.randint(0, num_heads, (num_images,), generator=g)
    mapping = torch.randn(512, dim, generator=torch.Generator().manual_seed(mapping_seed)) / math.sqrt(dim) * 2.0
    caption_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    target = unit(heads[caption_image, true_head[caption_image]])
    text = torch.tanh(target @ mapping.t()) + noise * torch.randn(len(caption_image), 512, generator=g)
    return {"heads": heads, "text": text, "caption_image": caption_image, "true_head": true_head}


def without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text(encoding="utf-8").splitlines()]


def load_psi(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "projection.safetensors"))


@pytest.fixture(scope="module")
def small_features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small train/val pair (D=8, M=3) for the run-folder tests: seconds per run."""
    root = tmp_path_factory.mktemp("features")
    train = synthetic_split(40, num_heads=3, dim=8, captions_per_image=3, seed=1)
    val = synthetic_split(12, num_heads=3, dim=8, captions_per_image=2, seed=2)
    return {
        "train": write_features(root / "train", heads=train["heads"], text=train["text"],
                                caption_image=train["caption_image"], shard_images=16, shard_captions=50),
        "val": write_features(root / "val", heads=val["heads"], text=val["text"], caption_image=val["caption_image"],
                              id_offset=50_000),
    }


def small_config(folders: dict[str, Path], out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(features=str(folders["train"]), val_features=str(folders["val"]), out=str(out),
                                  epochs=3, batch_size=16, lr=1e-3, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C between epochs."""


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer: Trainer, stats: EpochStats) -> None:
        if stats.epoch + 1 == self.epochs:
            raise Interrupt


# ----------------------------------------------------------------------------------------------
# targets and loss on hand-computed cases
# ----------------------------------------------------------------------------------------------


def ce_rows(scores: np.ndarray) -> float:
    """Mean over rows of −log softmax(scores/τ)[i, i]."""
    logits = scores / TAU
    top = logits.max(axis=1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_z - np.diag(logits)))


@pytest.mark.parametrize("divide", [False, True])
def test_loss_2x2_by_hand_with_head_choice(divide: bool) -> None:
    # Caption 0 = e1 picks head 1 of image 0; caption 1 = e2 picks head 0 of image 1 (0.8 > 0).
    # Caption 0 alone would pick head 1 of image 1 ((1, 0): similarity 1 > 0.6), but column 1 must use
    # the head chosen by caption 1, so S[0, 1] = 0.6, not 1.
    text_unit = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    heads = torch.tensor([[[0.0, 2.0], [3.0, 0.0]], [[0.6, 0.8], [5.0, 0.0]]])
    image_unit, chosen = batch_image_embeddings("max", heads=heads, text_unit=text_unit)
    assert chosen is not None and chosen.tolist() == [1, 0]
    torch.testing.assert_close(image_unit, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    # S = [[1, 0.6], [0, 0.8]]; each CE row is log(1 + exp((S_other - S_own) / τ)).
    rows = (math.log1p(math.exp(-0.4 / TAU)) + math.log1p(math.exp(-0.8 / TAU))) / 2
    cols = (math.log1p(math.exp(-1.0 / TAU)) + math.log1p(math.exp(-0.2 / TAU))) / 2
    expected = 0.5 * (rows + cols) / (4 if divide else 1)
    loss = infonce_loss(text_unit, image_unit, temperature=TAU, divide_by_batch_squared=divide)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("divide", [False, True])
def test_loss_3x3_against_numpy_with_head_choice(divide: bool) -> None:
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, 4, generator=g)
    heads = torch.randn(3, 5, 4, generator=g) * torch.rand(3, 5, 1, generator=g) * 3  # varied norms
    text_unit = unit(text)
    image_unit, chosen = batch_image_embeddings("max", heads=heads, text_unit=text_unit)
    loss = infonce_loss(text_unit, image_unit, temperature=TAU, divide_by_batch_squared=divide)

    t = text.double().numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    h = heads.double().numpy()
    h = h / np.linalg.norm(h, axis=2, keepdims=True)
    own_choice = [int(np.argmax(h[i] @ t[i])) for i in range(3)]  # each image's head, chosen by its own caption
    scores = np.array([[t[i] @ h[j, own_choice[j]] for j in range(3)] for i in range(3)])
    expected = 0.5 * (ce_rows(scores) + ce_rows(scores.T)) / (9 if divide else 1)
    assert chosen is not None and chosen.tolist() == own_choice
    # the case is not degenerate: some caption would pick another head of a negative image
    assert any(int(np.argmax(h[j] @ t[i])) != own_choice[j] for i in range(3) for j in range(3) if i != j)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_gradient_reaches_text_only() -> None:
    text = torch.randn(4, 8, requires_grad=True)
    heads = torch.randn(4, 3, 8, requires_grad=True)
    text_unit = unit(text)
    image_unit, _ = batch_image_embeddings("max", heads=heads, text_unit=text_unit)
    infonce_loss(text_unit, image_unit.detach(), temperature=TAU, divide_by_batch_squared=True).backward()
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_head_ties_go_to_lowest_index() -> None:
    text_unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    heads_unit = torch.tensor([
        [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],  # heads 1 and 2 tie -> 1
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # all tie -> 0
        [[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]],  # heads 0 and 2 tie -> 0
    ])
    assert select_heads(text_unit, heads_unit).tolist() == [1, 0, 0]


def test_strategies_on_a_tiny_example() -> None:
    heads = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    mean_heads = torch.tensor([[1.0, 1.0]])
    cls = torch.tensor([[5.0, 0.0]])
    text_unit = torch.tensor([[0.0, 1.0]])

    v, chosen = batch_image_embeddings("max", heads=heads, text_unit=text_unit)
    assert chosen is not None and chosen.tolist() == [1]
    torch.testing.assert_close(v, torch.tensor([[0.0, 1.0]]))

    v, chosen = batch_image_embeddings("avg", mean_heads=mean_heads)
    assert chosen is None
    torch.testing.assert_close(v, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))

    v, chosen = batch_image_embeddings("cls", cls=cls)
    assert chosen is None
    torch.testing.assert_close(v, torch.tensor([[1.0, 0.0]]))

    # w = softmax(<ĉ, v̂_m>) = softmax([1, 0]); v = w_0 (1, 0) + w_1 (0, 1)
    e = math.e
    weighted = torch.tensor([[e / (e + 1), 1 / (e + 1)]])
    torch.testing.assert_close(cls_weighted(heads, cls), weighted)
    v, chosen = batch_image_embeddings("cls-weighted", heads=heads, cls=cls)
    assert chosen is None
    torch.testing.assert_close(v, weighted / weighted.norm())
    assert v.dtype == torch.float32

    with pytest.raises(ValueError, match="needs `cls`"):
        batch_image_embeddings("cls")
    with pytest.raises(ValueError, match="unknown target strategy"):
        batch_image_embeddings("best", cls=cls)  # type: ignore[arg-type]


def test_generic_trainer_runs_callbacks_in_order() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    x = torch.randn(20, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    events: list[str] = []

    class Recorder(Callback):
        def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
            events.append(f"start{epoch}")

        def on_batch_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            events.append("batch")

        def on_epoch_end(self, trainer: Trainer, stats: EpochStats) -> None:
            events.append(f"end{stats.epoch}:{stats.steps}:{stats.global_step}")

    trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1),
                      lambda index: torch.nn.functional.mse_loss(module(x[index]), y[index]), callbacks=[Recorder()])
    trainer.fit(lambda epoch: torch.arange(20).split(8), epochs=2)
    assert events == ["start0", "batch", "batch", "batch", "end0:3:3", "start1", "batch", "batch", "batch", "end1:3:6"]


# ----------------------------------------------------------------------------------------------
# training end to end
# ----------------------------------------------------------------------------------------------


def test_learnability_max_heads(tmp_path: Path) -> None:
    """Captions are a fixed nonlinear map of one head per image: recall@1 must go far above chance."""
    train = synthetic_split(1024, num_heads=4, dim=16, captions_per_image=2, seed=1)
    val = synthetic_split(256, num_heads=4, dim=16, captions_per_image=1, seed=2)
    write_features(tmp_path / "train", heads=train["heads"], text=train["text"], caption_image=train["caption_image"],
                   shard_images=512, shard_captions=1024)
    write_features(tmp_path / "val", heads=val["heads"], text=val["text"], caption_image=val["caption_image"],
                   id_offset=10**6)
    config = TrainConfig(features=str(tmp_path / "train"), val_features=str(tmp_path / "val"),
                         out=str(tmp_path / "run"), epochs=8, batch_size=32, lr=1e-3, device="cpu")
    out = run_train(config, progress=False)
    log = read_log(out)
    chance = 1 / 256
    assert log[-1]["val"]["recall@1"] >= 0.9 > 100 * chance
    assert log[-1]["val"]["recall@10"] >= log[-1]["val"]["recall@1"]
    assert log[-1]["train_infonce"] < log[0]["train_infonce"]
    # psi learned to pick each image's true head, on unseen val images
    from talk2dino.models.projection import Projection

    psi = Projection(512, 16)
    psi.load_state_dict(load_psi(out))
    with torch.no_grad():
        chosen = select_heads(unit(psi(val["text"].half().float())), unit(val["heads"].half()))
    assert (chosen == val["true_head"]).float().mean().item() >= 0.95


@pytest.mark.parametrize("strategy", ["avg", "cls", "cls-weighted"])
def test_ablation_strategies_train(small_features: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    out = run_train(small_config(small_features, tmp_path / "run", epochs=1, target_strategy=strategy),
                    progress=False)
    (record,) = read_log(out)
    assert record["head_histogram"] is None
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val"]["loss"])


def test_log_and_run_folder_contents(small_features: dict[str, Path], tmp_path: Path) -> None:
    config = small_config(small_features, tmp_path / "run", epochs=2, eval_every=2, val_max_images=5)
    out = run_train(config, progress=False)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["step"] for r in log] == [8, 16]  # 120 captions, batch 16: 7 full batches + 1 of 8
    assert log[0]["val"] is None  # eval_every=2
    assert set(log[1]["val"]) >= {"loss", "recall@1", "recall@5", "recall@10"}
    assert (log[1]["val"]["images"], log[1]["val"]["captions"]) == (5, 10)  # the first 5 val images, 2 captions each
    assert log[1]["val"]["recall@5"] == 1.0  # K >= number of images
    assert all(sum(r["head_histogram"]) == 120 and len(r["head_histogram"]) == 3 for r in log)
    # B² division by default: the logged loss is the InfoNCE value over ~B²
    assert log[0]["train_loss"] < log[0]["train_infonce"] / 60
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["target_strategy"] == "max" and saved["betas"] == [0.9, 0.999]
    model = json.loads((out / "talk2dino.json").read_text())
    assert model["backbone"]["source"] == "local-dir:/nonexistent/dino"
    assert model["text"]["source"] == "local-dir:/nonexistent/clip"
    info = json.loads((out / "projection.json").read_text())
    assert info["epoch"] == 2 and info["train_config"]["seed"] == 123 and info["features"]["images"] == 40
    checkpoint = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 16
    for key, value in load_psi(out).items():
        assert torch.equal(value, checkpoint["psi"][key])
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def uninterrupted(small_features: dict[str, Path], root: Path) -> Path:
    return run_train(small_config(small_features, root / "full"), progress=False)


def assert_same_run(a: Path, b: Path) -> None:
    psi_a, psi_b = load_psi(a), load_psi(b)
    assert psi_a.keys() == psi_b.keys() and all(torch.equal(psi_a[k], psi_b[k]) for k in psi_a)
    ckpt_a = torch.load(a / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    ckpt_b = torch.load(b / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    for state_a, state_b in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values(),
                                strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert without_seconds(read_log(a)) == without_seconds(read_log(b))


def test_resume_after_interruption_equals_uninterrupted(small_features: dict[str, Path], tmp_path: Path) -> None:
    full = uninterrupted(small_features, tmp_path)
    config = small_config(small_features, tmp_path / "resumed")
    with pytest.raises(Interrupt):
        run_train(config, progress=False, callbacks=[StopAfter(1)])
    assert len(read_log(tmp_path / "resumed")) == 1
    run_train(config, resume=True, progress=False)
    assert_same_run(full, tmp_path / "resumed")


def test_resume_extends_a_shorter_run(small_features: dict[str, Path], tmp_path: Path) -> None:
    full = uninterrupted(small_features, tmp_path)
    run_train(small_config(small_features, tmp_path / "short", epochs=1), progress=False)
    run_train(small_config(small_features, tmp_path / "short", epochs=3), resume=True, progress=False)
    assert_same_run(full, tmp_path / "short")


def test_finished_run_is_left_as_is(small_features: dict[str, Path], tmp_path: Path) -> None:
    out = run_train(small_config(small_features, tmp_path / "run", epochs=1), progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    run_train(small_config(small_features, tmp_path / "run", epochs=1), resume=True, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    # the finished model folder stays valid when the run is extended later
    run_train(small_config(small_features, tmp_path / "run", epochs=2), resume=True, progress=False)
    assert [r["epoch"] for r in read_log(out)] == [1, 2]
    with pytest.raises(TrainingError, match="already has 2 epochs"):
        run_train(small_config(small_features, tmp_path / "run", epochs=1), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------
# bad input: the run folder, features, full disk
# ----------------------------------------------------------------------------------------------


def test_refuses_existing_run_foreign_files_and_other_configs(small_features: dict[str, Path],
                                                              tmp_path: Path) -> None:
    out = run_train(small_config(small_features, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        run_train(small_config(small_features, out, epochs=1), progress=False)
    with pytest.raises(TrainingError, match="lr: run 0.001 vs now 0.01"):
        run_train(small_config(small_features, out, epochs=2, lr=1e-2), resume=True, progress=False)
    with pytest.raises(TrainingError, match="target_strategy"):
        run_train(small_config(small_features, out, epochs=2, target_strategy="avg"), resume=True, progress=False)

    released = tmp_path / "weights"
    released.mkdir()
    (released / "vitb_mlp_infonce.pth").write_bytes(b"released")
    for resume in (False, True):
        with pytest.raises(TrainingError, match="not written by `talk2dino train`"):
            run_train(small_config(small_features, released, epochs=1), resume=resume, progress=False)
    assert [p.name for p in released.iterdir()] == ["vitb_mlp_infonce.pth"]
    assert (released / "vitb_mlp_infonce.pth").read_bytes() == b"released"

    model_folder = tmp_path / "model"  # a model folder someone else wrote: no train_config.json
    model_folder.mkdir()
    (model_folder / "talk2dino.json").write_text("{}")
    with pytest.raises(TrainingError, match="not written by `talk2dino train`"):
        run_train(small_config(small_features, model_folder, epochs=1), resume=True, progress=False)
    with pytest.raises(TrainingError, match="holds files not written"):  # the features folder itself
        run_train(small_config(small_features, small_features["train"], epochs=1), progress=False)


def test_refuses_val_features_from_another_backbone(small_features: dict[str, Path], tmp_path: Path) -> None:
    other = synthetic_split(8, num_heads=3, dim=12, captions_per_image=1, seed=5)
    write_features(tmp_path / "wide", heads=other["heads"], text=other["text"], caption_image=other["caption_image"])
    with pytest.raises(FeatureFormatError, match="embed_dim=12"):
        run_train(small_config(small_features, tmp_path / "run", val_features=str(tmp_path / "wide")),
                  progress=False)
    same_size = synthetic_split(8, num_heads=3, dim=8, captions_per_image=1, seed=5)
    write_features(tmp_path / "other", heads=same_size["heads"], text=same_size["text"],
                   caption_image=same_size["caption_image"], backbone="hf-hub:facebook/dinov2-small")
    with pytest.raises(FeatureFormatError, match="dinov2-small"):
        run_train(small_config(small_features, tmp_path / "run", val_features=str(tmp_path / "other")),
                  progress=False)
    assert not (tmp_path / "run").exists()  # nothing written before the inputs were checked


def test_resume_refuses_features_of_another_backbone(small_features: dict[str, Path], tmp_path: Path) -> None:
    out = run_train(small_config(small_features, tmp_path / "run", epochs=1), progress=False)
    data = synthetic_split(40, num_heads=3, dim=8, captions_per_image=3, seed=1)
    write_features(tmp_path / "moved", heads=data["heads"], text=data["text"], caption_image=data["caption_image"],
                   backbone="hf-hub:facebook/dinov2-with-registers-small")
    with pytest.raises(FeatureFormatError, match="dinov2-with-registers-small"):
        run_train(small_config(small_features, out, epochs=2, features=str(tmp_path / "moved")), resume=True,
                  progress=False)
    assert len(read_log(out)) == 1


def test_corrupt_shard_is_reported_and_nothing_is_lost(small_features: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    features = tmp_path / "features"
    shutil.copytree(small_features["train"], features)
    out = run_train(small_config(small_features, tmp_path / "run", epochs=1, features=str(features)),
                    progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = features / "images-000-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(FeatureFormatError, match="images-000-00001.safetensors"):
        run_train(small_config(small_features, out, epochs=2, features=str(features)), resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FeatureFormatError, match="corrupt or truncated"):
        run_train(small_config(small_features, tmp_path / "fresh", features=str(features)), progress=False)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("target", ["checkpoint", "model"])
def test_disk_full_mid_run_keeps_the_last_epoch_and_resumes(small_features: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    import errno

    import talk2dino.training.run_folder as run_folder_module

    full = uninterrupted(small_features, tmp_path)
    calls = {"n": 0}
    if target == "checkpoint":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"partial bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        expected = CHECKPOINT_FILE
    else:
        real_folder = run_folder_module.save_model_folder

        def save_folder(folder: Any, *args: Any, **kwargs: Any) -> Path:
            calls["n"] += 1
            if calls["n"] == 2:
                # What a hard kill mid-write leaves behind: a temp file of the model folder.
                (Path(folder) / ".projection.0123456789ab.tmp.safetensors").write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_folder(folder, *args, **kwargs)

        monkeypatch.setattr(run_folder_module, "save_model_folder", save_folder)
        expected = "model files"
    config = small_config(small_features, tmp_path / "run")
    with pytest.raises(TrainingError, match=expected) as info:
        run_train(config, progress=False)
    assert "No space left on device" in str(info.value) and "--resume" in str(info.value)
    out = tmp_path / "run"
    committed = 1 if target == "checkpoint" else 2  # the model folder is written after the checkpoint
    assert torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["epoch"] == committed
    monkeypatch.undo()
    run_train(config, resume=True, progress=False)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # leftovers of the failed write are cleared
    assert_same_run(full, out)


def test_run_folder_loads_with_create_model(tiny_sources: dict[str, str], tmp_path: Path) -> None:
    from talk2dino import create_model

    data = synthetic_split(16, num_heads=4, dim=32, captions_per_image=2, seed=3)  # the tiny DINOv2: D=32, M=4
    write_features(tmp_path / "features", heads=data["heads"], text=data["text"],
                   caption_image=data["caption_image"], backbone=tiny_sources["backbone"],
                   text_source=tiny_sources["text_encoder"])
    out = run_train(TrainConfig(features=str(tmp_path / "features"), out=str(tmp_path / "run"), epochs=1,
                                batch_size=8, device="cpu"), progress=False)
    model = create_model(f"local-dir:{out}", device="cpu")
    checkpoint = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    state = model.projection.state_dict()
    assert state.keys() == checkpoint["psi"].keys()
    assert all(torch.equal(state[k], checkpoint["psi"][k]) for k in state)
    assert model.config.backbone.source == tiny_sources["backbone"]
    assert model.config.text.source == tiny_sources["text_encoder"]
    assert model.encode_text(["a cat"]).shape == (1, 512)
