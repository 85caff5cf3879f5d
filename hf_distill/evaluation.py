"""Task-agnostic evaluation: accuracy and F1 for any classification dataset, as a `Trainer` ``compute_metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

F1_AVERAGES = ("binary", "macro", "micro", "weighted")


def classification_compute_metrics(
    f1_average: str | None = None, positive_label: int = 1
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for `transformers.Trainer` (and every hf_distill trainer) that reports
    ``accuracy`` and ``f1`` of a classifier.

    The prediction of each row is the argmax of its logits; rows (or, for token classification, positions)
    labelled -100 are left out. ``f1`` is scikit-learn's ``f1_score`` with ``average=f1_average``:
    by default "binary" (the F1 of ``positive_label``) for two classes and "macro" (the unweighted mean
    over the classes present) for more.

    Args:
        f1_average: One of "binary", "macro", "micro", "weighted", or None for the default above.
        positive_label: The class whose F1 "binary" reports.

    Example:
        ```python
        trainer = DistillationTrainer(..., compute_metrics=classification_compute_metrics())
        trainer.evaluate()  # {"eval_accuracy": ..., "eval_f1": ..., ...}
        ```
    """
    if f1_average is not None and f1_average not in F1_AVERAGES:
        raise ValueError(f"f1_average={f1_average!r} is unknown; choose one of {F1_AVERAGES} or None.")

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted, labels, num_classes = _classes(prediction.predictions, prediction.label_ids)
        average = f1_average or ("binary" if num_classes <= 2 else "macro")
        f1 = f1_score(
            labels,
            predicted,
            average=average,
            pos_label=positive_label if average == "binary" else 1,
            zero_division=0.0,
        )
        return {"accuracy": float((predicted == labels).mean()), "f1": float(f1)}

    return compute_metrics


def _classes(predictions: Any, label_ids: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(predicted classes, labels) as flat arrays of the rows or positions whose label is not -100, and
    the number of classes."""
    logits = predictions[0] if isinstance(predictions, (tuple, list)) else predictions
    logits, labels = np.asarray(logits), np.asarray(label_ids)
    if logits.shape[:-1] == labels.shape:
        if logits.shape[-1] == 1:
            raise ValueError(
                "classification_compute_metrics got one output per row (a regression head); it needs class "
                "logits."
            )
        predicted, num_classes = logits.argmax(-1), logits.shape[-1]
    elif logits.shape == labels.shape:  # already classes (e.g. from preprocess_logits_for_metrics)
        predicted, num_classes = logits, int(max(logits.max(initial=0), labels.max(initial=0))) + 1
    else:
        raise ValueError(
            f"Predictions of shape {logits.shape} do not match labels of shape {labels.shape}: expected "
            "logits with one more (class) dimension than the labels."
        )
    keep = labels != -100
    return predicted[keep].astype(np.int64), labels[keep].astype(np.int64), num_classes
