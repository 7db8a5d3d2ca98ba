"""Classification metrics of the general-ability tasks (torchmetrics, functional)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (
    binary_f1_score,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
)

#: Names accepted in ``GeneralTask.metrics`` and by :func:`classification_metrics`.
METRICS: tuple[str, ...] = ("accuracy", "f1", "mcc")


def matthews_corrcoef(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Matthews correlation coefficient, 0 where it is undefined (constant preds or targets).

    The 0 follows GLUE and scikit-learn. torchmetrics 1.x special-cases a zero denominator in the
    binary case and returns ±1 or an epsilon-scaled value instead (0.41 for preds ``[1, 1, 1]``
    against targets ``[1, 0, 1]``), which would make a model that collapsed onto one answer look
    correlated.
    """
    confusion = multiclass_confusion_matrix(preds, target, num_classes=num_classes)
    if (confusion.sum(0) > 0).sum() < 2 or (confusion.sum(1) > 0).sum() < 2:
        return 0.0
    return float(multiclass_matthews_corrcoef(preds, target, num_classes=num_classes))


def classification_metrics(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    positive: int | None = None,
    metrics: Sequence[str] = ("accuracy", "f1"),
) -> dict[str, float]:
    """Accuracy, F1 and MCC of class predictions.

    Args:
        preds: Predicted class indices, shape ``(N,)``.
        target: True class indices, shape ``(N,)``.
        num_classes: Number of classes (options of the task).
        positive: The positive class of a binary task; F1 is then the F1 of that class. ``None``
            gives the macro F1 over the classes that occur in ``preds`` or ``target`` (classes
            absent from both are left out of the mean, as torchmetrics does).
        metrics: Which of ``"accuracy"``, ``"f1"``, ``"mcc"`` to compute.

    Returns:
        ``{name: value}`` for each requested metric, in the order asked.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; expected some of {list(METRICS)}")
    if positive is not None and not 0 <= positive < num_classes:
        raise ValueError(f"`positive` should be in [0, {num_classes}), got {positive}")
    preds, target = preds.long().flatten(), target.long().flatten()
    if preds.shape != target.shape or preds.numel() == 0:
        raise ValueError(
            f"preds and target should be non-empty and of one shape, got {tuple(preds.shape)} "
            f"and {tuple(target.shape)}"
        )
    values: dict[str, float] = {}
    for name in metrics:
        if name == "accuracy":
            values[name] = float(
                multiclass_accuracy(preds, target, num_classes=num_classes, average="micro")
            )
        elif name == "f1" and positive is not None:
            values[name] = float(
                binary_f1_score((preds == positive).long(), (target == positive).long())
            )
        elif name == "f1":
            values[name] = float(
                multiclass_f1_score(preds, target, num_classes=num_classes, average="macro")
            )
        else:
            values[name] = matthews_corrcoef(preds, target, num_classes)
    return values
