"""Accuracy, F1 and MCC of the general tasks: by hand and against a plain-Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from sphere_lightning.general import classification_metrics, matthews_corrcoef


def test_binary_metrics_by_hand():
    preds = torch.tensor([1, 1, 1, 0, 1, 0])
    target = torch.tensor([1, 0, 1, 1, 1, 0])
    # With 1 positive: TP = 3 (items 0, 2, 4), FP = 1 (item 1), FN = 1 (item 3), TN = 1 (item 5).
    # accuracy = (3 + 1) / 6 = 2/3; F1 = 2·3 / (2·3 + 1 + 1) = 0.75;
    # MCC = (3·1 − 1·1) / √((3+1)(3+1)(1+1)(1+1)) = 2 / 8 = 0.25.
    values = classification_metrics(preds, target, 2, positive=1, metrics=("accuracy", "f1", "mcc"))
    assert values == pytest.approx({"accuracy": 2 / 3, "f1": 0.75, "mcc": 0.25})
    # With 0 positive: TP = 1, FP = 1 (item 3), FN = 1 (item 1): F1 = 2 / (2 + 1 + 1) = 0.5.
    assert classification_metrics(preds, target, 2, positive=0)["f1"] == pytest.approx(0.5)


def test_macro_f1_by_hand():
    preds = torch.tensor([0, 1, 2, 3, 0, 1])
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    # class 0: TP 1, FP 1 (item 4), FN 1 (item 5) → F1 = 2/4 = 0.5; class 1 likewise 0.5;
    # classes 2 and 3: F1 = 1. Macro F1 = (0.5 + 0.5 + 1 + 1) / 4 = 0.75; accuracy = 4/6.
    values = classification_metrics(preds, target, 4)
    assert values == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})


def test_mcc_is_zero_for_constant_predictions():
    # The denominator (TP+FP)(TP+FN)(TN+FP)(TN+FN) is 0; torchmetrics 1.x would say 0.41 here.
    assert matthews_corrcoef(torch.tensor([1, 1, 1]), torch.tensor([1, 0, 1]), 2) == 0.0
    assert matthews_corrcoef(torch.tensor([0, 1, 0]), torch.tensor([1, 1, 1]), 2) == 0.0
    assert matthews_corrcoef(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 2) == 1.0


def _confusion(preds: list[int], target: list[int], k: int) -> list[list[int]]:
    matrix = [[0] * k for _ in range(k)]
    for p, t in zip(preds, target, strict=True):
        matrix[t][p] += 1
    return matrix


def _reference_f1(matrix: list[list[int]], cls: int) -> float:
    tp = matrix[cls][cls]
    fp = sum(matrix[t][cls] for t in range(len(matrix))) - tp
    fn = sum(matrix[cls]) - tp
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _reference_mcc(matrix: list[list[int]]) -> float:
    k = len(matrix)
    s = sum(map(sum, matrix))
    c = sum(matrix[i][i] for i in range(k))
    t = [sum(matrix[i]) for i in range(k)]  # true counts
    p = [sum(matrix[i][j] for i in range(k)) for j in range(k)]  # predicted counts
    denominator = math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))
    covariance = c * s - sum(a * b for a, b in zip(t, p, strict=True))
    return 0.0 if denominator == 0 else covariance / denominator


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [2, 4])
def test_f1_and_mcc_against_confusion_matrix(seed, num_classes):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(num_classes, (50,), generator=g)
    # Predictions that agree with the target more often than chance, so MCC is not ≈ 0.
    preds = torch.where(
        torch.rand(50, generator=g) < 0.5, target, torch.randint(num_classes, (50,), generator=g)
    )
    matrix = _confusion(preds.tolist(), target.tolist(), num_classes)
    positive = 1 if num_classes == 2 else None
    values = classification_metrics(
        preds, target, num_classes, positive=positive, metrics=("accuracy", "f1", "mcc")
    )
    if positive is not None:
        expected_f1 = _reference_f1(matrix, positive)
    else:  # macro over the classes that occur in preds or target
        present = [
            c
            for c in range(num_classes)
            if sum(matrix[c]) + sum(matrix[t][c] for t in range(num_classes)) > 0
        ]
        expected_f1 = sum(_reference_f1(matrix, c) for c in present) / len(present)
    assert values["f1"] == pytest.approx(expected_f1, abs=1e-6)
    assert values["mcc"] == pytest.approx(_reference_mcc(matrix), abs=1e-6)
    assert values["accuracy"] == pytest.approx((preds == target).float().mean().item())


def test_bad_arguments_are_rejected():
    x = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="Unknown metric.*'auc'"):
        classification_metrics(x, x, 2, metrics=("auc",))
    with pytest.raises(ValueError, match="one shape"):
        classification_metrics(x, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="`positive` should be in"):
        classification_metrics(x, x, 2, positive=2)
