"""mIoU from a confusion matrix, as mmsegmentation defines it (method.md §5.4)."""

from __future__ import annotations

import math

import pytest
import torch

from talk2dino.errors import InvalidInputError
from talk2dino.evaluation.metric import ConfusionMatrix

IGNORE = 255


def _random_pair(seed: int, num_classes: int, *, used: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [H, W] prediction and target over the first `used` classes, with ~10 % ignore pixels."""
    generator = torch.Generator().manual_seed(seed)
    high = num_classes if used is None else used
    pred = torch.randint(0, high, (37, 53), generator=generator)
    target = torch.randint(0, high, (37, 53), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = IGNORE
    return pred, target


def test_equals_torchmetrics_jaccard_index() -> None:
    torchmetrics = pytest.importorskip("torchmetrics.classification")
    num_classes = 7
    matrix = ConfusionMatrix(num_classes)
    preds, targets = [], []
    for seed in range(3):
        # Classes 0-5 only: class 6 is absent from both prediction and ground truth.
        pred, target = _random_pair(seed, num_classes, used=6)
        matrix.update(pred, target)
        preds.append(pred.reshape(-1))
        targets.append(target.reshape(-1))
    pred_all, target_all = torch.cat(preds), torch.cat(targets)
    per_class = torchmetrics.MulticlassJaccardIndex(num_classes, average="none", ignore_index=IGNORE)(
        pred_all, target_all).double() * 100
    macro = torchmetrics.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE)(
        pred_all, target_all).item() * 100
    results = matrix.results()
    ours = torch.tensor(results["IoU"], dtype=torch.float64)
    # torchmetrics reports 0 (its zero_division) for a class absent from both maps, where mmsegmentation has NaN and
    # leaves the class out of the mean; compare the classes present, and check the absent one separately.
    present = ~torch.isnan(ours)
    assert present.tolist() == [True] * 6 + [False]
    torch.testing.assert_close(ours[present], per_class[present], rtol=0, atol=1e-4)
    assert per_class[6].item() == 0.0
    # torchmetrics' macro average also skips classes absent from both, so it equals the NaN-aware mean.
    assert results["mIoU"] == pytest.approx(macro, abs=1e-4)
    assert results["mIoU"] == pytest.approx(ours[present].mean().item(), abs=1e-9)
    assert results["num_pixels"] == int((target_all != IGNORE).sum())


def test_hand_computed_case_with_an_absent_class() -> None:
    # 3 classes; class 2 never occurs in the ground truth nor in the prediction.
    target = torch.tensor([[0, 0, 0, 1], [1, 1, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 0, 2, 0]])  # predictions at ignore pixels do not count
    matrix = ConfusionMatrix(3)
    matrix.update(pred, target)
    assert matrix.state.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    results = matrix.results()
    # class 0: intersection 2, union 3 + 3 - 2 = 4; class 1: intersection 2, union 3 + 3 - 2 = 4.
    assert results["IoU"][:2] == pytest.approx([50.0, 50.0])
    assert math.isnan(results["IoU"][2]) and math.isnan(results["Acc"][2])
    assert results["mIoU"] == pytest.approx(50.0)
    assert results["Acc"][:2] == pytest.approx([200 / 3, 200 / 3])
    assert results["mAcc"] == pytest.approx(200 / 3)
    assert results["aAcc"] == pytest.approx(400 / 6)
    assert results["num_pixels"] == 6


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    results = matrix.results()
    assert results["IoU"][0] == pytest.approx(50.0) and results["IoU"][2] == 0.0 and math.isnan(results["IoU"][1])
    assert results["mIoU"] == pytest.approx(25.0)  # mean over classes 0 and 2
    assert math.isnan(results["Acc"][2])  # no ground-truth pixel of class 2


def test_merge_equals_one_matrix_over_both() -> None:
    first, second = _random_pair(10, 5), _random_pair(11, 5)
    together = ConfusionMatrix(5)
    together.update(*first)
    together.update(*second)
    left, right = ConfusionMatrix(5), ConfusionMatrix(5)
    left.update(*first)
    right.update(*second)
    assert left.merge(right) is left
    assert torch.equal(left.state, together.state)
    assert left.results() == together.results()
    assert left.all_reduce() is left  # not distributed: unchanged
    assert torch.equal(left.state, together.state)
    with pytest.raises(InvalidInputError, match="cannot merge"):
        left.merge(ConfusionMatrix(4))


def test_out_of_range_and_bad_inputs_raise() -> None:
    matrix = ConfusionMatrix(3)
    with pytest.raises(InvalidInputError, match=r"target holds values \[3\]"):
        matrix.update(torch.tensor([[0, 1]]), torch.tensor([[3, 0]]))
    with pytest.raises(InvalidInputError, match=r"prediction holds values \[-1, 5\]"):
        matrix.update(torch.tensor([[-1, 5]]), torch.tensor([[0, IGNORE]]))
    with pytest.raises(InvalidInputError, match="differs"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="integer"):
        matrix.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    assert int(matrix.state.sum()) == 0  # failed updates add nothing
    with pytest.raises(InvalidInputError, match="class index"):
        ConfusionMatrix(300, ignore_index=255)


def test_empty_matrix_and_dtypes() -> None:
    matrix = ConfusionMatrix(2)
    results = matrix.results()
    assert math.isnan(results["mIoU"]) and math.isnan(results["aAcc"]) and results["num_pixels"] == 0
    matrix.update(torch.tensor([[1, 0]], dtype=torch.uint8), torch.tensor([[1, IGNORE]], dtype=torch.uint8))
    assert matrix.state.dtype == torch.int64 and matrix.state.tolist() == [[0, 0], [0, 1]]
    matrix.reset()
    assert int(matrix.state.sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counts_on_the_gpu_equal_cpu() -> None:
    pred, target = _random_pair(3, 9)
    cpu = ConfusionMatrix(9)
    cpu.update(pred, target)
    gpu = ConfusionMatrix(9)  # follows the inputs' device
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.state.cpu(), cpu.state)


def test_image_counts_of_a_batch_equal_per_image_updates() -> None:
    pairs = [_random_pair(seed, 5) for seed in range(3)]
    pairs[1] = (pairs[1][0][:20, :11].to(torch.uint8), pairs[1][1][:20, :11])  # another size and dtype
    batch = ConfusionMatrix(5)
    counts = batch.image_counts([p for p, _ in pairs], [t for _, t in pairs])
    assert counts.shape == (3, 5, 5) and counts.dtype == torch.int64
    for (pred, target), image in zip(pairs, counts, strict=True):
        alone = ConfusionMatrix(5)
        alone.update(pred, target)
        assert torch.equal(image, alone.state)
    assert int(batch.state.sum()) == 0  # counted, not added
    batch.add(counts).add(counts[0])
    assert torch.equal(batch.state, counts.sum(0) + counts[0])
    assert batch.image_counts([], []).shape == (0, 5, 5)


def test_image_counts_refuse_values_out_of_range_naming_the_image() -> None:
    matrix = ConfusionMatrix(4)
    good = (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
    bad_target = torch.tensor([[0, 7, IGNORE]])
    with pytest.raises(InvalidInputError, match=r"^image 1: target holds values \[7\]"):
        matrix.image_counts([good[0], torch.zeros(1, 3, dtype=torch.int64)], [good[1], bad_target])
    # A prediction out of range is refused even on an ignored pixel, as `update` does.
    with pytest.raises(InvalidInputError, match=r"^image 0: prediction holds values \[9\]"):
        matrix.image_counts([torch.tensor([[9]])], [torch.tensor([[IGNORE]])])
    with pytest.raises(InvalidInputError, match="2 predictions for 1 targets"):
        matrix.image_counts([good[0], good[0]], [good[1]])
    with pytest.raises(InvalidInputError, match="do not fit"):
        matrix.add(torch.zeros(3, 3, dtype=torch.int64))
    assert int(matrix.state.sum()) == 0
