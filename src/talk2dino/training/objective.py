"""What psi is trained against: the contrastive loss of a batch and the validation (method.md §3.4–3.6).

`ContrastiveObjective` is the loss function `talk2dino.training.loop.Trainer` calls per batch of caption
indices; `Validator` computes the val loss and text→image recall@K with the same strategy. Both index the
features directly (no DataLoader): on CPU they are in RAM anyway; on a GPU they are moved there once when
they fit, else each batch is gathered on the host and copied. Float16 features are cast to float32 per
batch, on the compute device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from talk2dino.config import TargetStrategy
from talk2dino.data.features import FeatureSet
from talk2dino.training.loop import epoch_permutation
from talk2dino.training.loss import infonce_loss
from talk2dino.training.strategies import STRATEGIES, batch_image_embeddings, unit

EVAL_CHUNK_BYTES = 256 * 2**20  # bound on the [captions, images(, heads)] score block of recall@K
TABLE_CHUNK_IMAGES = 4096  # images per chunk when precomputing strategy image embeddings


def strategy_images(features: FeatureSet, strategy: TargetStrategy) -> torch.Tensor:
    """What `ContrastiveObjective` indexes per image for `strategy`.

    For ``max`` the per-head embeddings as stored (the head choice depends on psi, so it is made per
    batch). For the other strategies the image embedding does not depend on psi, so it is computed
    once, with `batch_image_embeddings`, on the features' device.

    Returns:
        ``max``: ``[I, M, D]`` the stored heads (float16 as stored). Otherwise ``[I, D]`` float32 unit vectors.
    """
    if strategy == "max":
        return features.heads
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown target strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    parts = []
    for start in range(0, features.heads.shape[0], TABLE_CHUNK_IMAGES):
        rows = slice(start, start + TABLE_CHUNK_IMAGES)
        embedding, _ = batch_image_embeddings(strategy, heads=features.heads[rows],
                                              mean_heads=features.mean_heads[rows], cls=features.cls[rows])
        parts.append(embedding)
    return torch.cat(parts)


class ContrastiveObjective:
    """The loss of one batch of caption indices (method.md §3.4 with a §3.6 strategy).

    Row i of a batch is caption i with its own image. Captions and images are gathered on the
    features' device, moved to the compute device and cast to float32 there.

    Args:
        psi: the projection being trained (on `device`).
        text: ``[K, 512]`` raw CLIP caption embeddings, float16 or float32.
        caption_image: ``[K]`` int64 image row of each caption.
        images: `strategy_images` output: ``[I, M, D]`` heads for ``max``, else ``[I, D]`` unit embeddings.
        strategy: the target strategy.
        temperature: τ, method.md §3.4.
        divide_by_batch_squared: divide each batch loss by B², pitfall P12.
        device: the compute device.

    Attributes:
        head_counts: ``[M]`` int64 chosen-head counts since `reset_stats` (``max`` only, else None).
        infonce_sum: ``[]`` float64 sum of the batch losses *before* the B² division since `reset_stats`.
    """

    def __init__(self, psi: nn.Module, *, text: torch.Tensor, caption_image: torch.Tensor, images: torch.Tensor,
                 strategy: TargetStrategy, temperature: float, divide_by_batch_squared: bool,
                 device: torch.device) -> None:
        self.psi = psi
        self.text = text
        self.caption_image = caption_image
        self.images = images
        self.strategy = strategy
        self.temperature = temperature
        self.divide_by_batch_squared = divide_by_batch_squared
        self.device = device
        self.head_counts: torch.Tensor | None = None
        self.infonce_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero `head_counts` and `infonce_sum`."""
        if self.strategy == "max":
            self.head_counts = torch.zeros(self.images.shape[1], dtype=torch.long, device=self.device)
        self.infonce_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Loss of the captions `index` (``[B]`` int64 on the features' device); returns a ``[]`` float32 loss."""
        index = index.to(self.text.device)
        image_rows = self.caption_image[index]
        return self.loss_for(self.text[index], image_rows)

    def loss_for(self, text: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """Loss of a batch given its captions' text embeddings and image rows.

        Args:
            text: ``[B, 512]`` raw CLIP embeddings (any float dtype, any device).
            image_rows: ``[B]`` int64 image row of each caption.

        Returns:
            ``[]`` float32 loss (divided by B² when configured).
        """
        text_unit = unit(self.psi(text.to(self.device, non_blocking=True)))
        gathered = self.images[image_rows.to(self.images.device)].to(self.device, non_blocking=True)
        if self.strategy == "max":
            image_unit, chosen = batch_image_embeddings("max", heads=gathered, text_unit=text_unit)
            assert chosen is not None and self.head_counts is not None
            # one_hot + sum instead of bincount: deterministic on every device
            self.head_counts += nn.functional.one_hot(chosen, self.head_counts.shape[0]).sum(0)
        else:
            image_unit = gathered.float()
        loss = infonce_loss(text_unit, image_unit, temperature=self.temperature, divide_by_batch_squared=False)
        self.infonce_sum += loss.detach().double()
        if self.divide_by_batch_squared:  # the same operation as infonce_loss(..., divide_by_batch_squared=True)
            batch = text_unit.shape[0]
            loss = loss / (batch * batch)
        return loss


def subset_images(features: FeatureSet, max_images: int | None) -> FeatureSet:
    """The first `max_images` images of `features` and the captions of those images (all when None)."""
    if max_images is None or max_images >= features.heads.shape[0]:
        return features
    keep = features.caption_image < max_images
    return FeatureSet(
        image_ids=features.image_ids[:max_images], heads=features.heads[:max_images],
        mean_heads=features.mean_heads[:max_images], cls=features.cls[:max_images],
        caption_ids=features.caption_ids[keep], caption_image=features.caption_image[keep],
        text=features.text[keep], manifest=features.manifest,
    )


class Validator:
    """Val loss and text→image recall@K with the training strategy.

    Score of caption t against image j: for ``max``, max_m ⟨t̂, v̂_{j,m}⟩ (the head the caption
    would pick); otherwise ⟨t̂, v̂_j⟩ with the strategy's single embedding. A caption's rank is the
    number of images scoring strictly higher than its own image; recall@K is the fraction of
    captions with rank < K. The val loss is the training loss over the val captions in a fixed
    seeded order, batch size as in training (it uses the training strategy, unlike the reference's
    head-averaged val target, pitfall P21). Scores are computed in chunks of captions, so the
    ``[captions, images, heads]`` block stays under `EVAL_CHUNK_BYTES`.

    Args:
        psi: the projection (evaluated under ``no_grad``).
        features: the val features (already subset; see `subset_images`), on any device.
        strategy, temperature, divide_by_batch_squared, batch_size, seed: as in training.
        ks: the K of recall@K.
        device: the compute device.
    """

    def __init__(self, psi: nn.Module, features: FeatureSet, *, strategy: TargetStrategy, temperature: float,
                 divide_by_batch_squared: bool, batch_size: int, ks: Sequence[int], seed: int,
                 device: torch.device) -> None:
        self.psi = psi
        self.ks = tuple(ks)
        self.batch_size = batch_size
        self.device = device
        self.strategy = strategy
        self.text = features.text.to(device)
        self.caption_image = features.caption_image.to(device)
        table = strategy_images(features.to(device), strategy)
        self.image_unit = unit(table)  # [I, M, D] for max, [I, D] otherwise; float32 unit
        self.num_images = int(self.image_unit.shape[0])
        self.objective = ContrastiveObjective(psi, text=self.text, caption_image=self.caption_image,
                                              images=self.image_unit, strategy=strategy, temperature=temperature,
                                              divide_by_batch_squared=divide_by_batch_squared, device=device)
        self.order = epoch_permutation(int(self.text.shape[0]), seed=seed, epoch=0).to(device)

    @torch.no_grad()
    def __call__(self) -> dict[str, Any]:
        """Evaluate psi now.

        Returns:
            ``{"loss", "infonce", "recall@K"..., "images", "captions", "seconds"}``.
        """
        start = time.perf_counter()
        self.objective.reset_stats()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = self.order.split(self.batch_size)
        for index in batches:
            loss_sum += self.objective(index).double()
        num_captions = int(self.text.shape[0])
        hits = torch.zeros(len(self.ks), dtype=torch.long, device=self.device)
        per_caption_bytes = self.image_unit[..., 0].numel() * 4
        chunk = max(1, EVAL_CHUNK_BYTES // max(1, per_caption_bytes))
        flat = self.image_unit.reshape(-1, self.image_unit.shape[-1])
        ks = torch.tensor(self.ks, device=self.device)
        for start_row in range(0, num_captions, chunk):
            rows = slice(start_row, start_row + chunk)
            text_unit = unit(self.psi(self.text[rows]))
            scores = text_unit @ flat.t()
            if self.strategy == "max":
                scores = scores.view(scores.shape[0], self.num_images, -1).amax(dim=2)
            own = scores.gather(1, self.caption_image[rows, None])
            rank = (scores > own).sum(dim=1)
            hits += (rank[:, None] < ks[None, :]).sum(dim=0)
        result: dict[str, Any] = {
            "loss": float(loss_sum.item()) / len(batches),
            "infonce": float(self.objective.infonce_sum.item()) / len(batches),
        }
        for k, count in zip(self.ks, hits.tolist(), strict=True):
            result[f"recall@{k}"] = count / num_captions
        result.update(images=self.num_images, captions=num_captions, seconds=time.perf_counter() - start)
        return result

