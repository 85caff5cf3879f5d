"""Offline GLUE metrics.

``evaluate.load("glue", task)`` downloads its script from the Hugging Face Hub, which fails without
network access. This module computes the same numbers with scikit-learn and scipy and returns exactly
the same keys as the ``glue`` metric of ``evaluate``:

- cola: ``matthews_correlation``
- stsb: ``pearson``, ``spearmanr``
- mrpc, qqp: ``accuracy``, ``f1``
- sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans: ``accuracy``

``f1`` is the binary F1 score of label 1. Undefined values are reported as 0.0 instead of NaN (see
:func:`glue_metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

if TYPE_CHECKING:
    # Only needed for annotations; keeps importing this module from loading transformers.
    from transformers import EvalPrediction


__all__ = [
    "GLUE_TASKS",
    "glue_compute_metrics",
    "glue_metrics",
    "is_regression_task",
    "majority_class_metrics",
]


GLUE_TASKS: tuple[str, ...] = (
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "hans",
)


_ACC_AND_F1_TASKS = frozenset({"mrpc", "qqp"})


def _check_task(task_name: str) -> None:
    if task_name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task_name!r}; supported tasks are: {', '.join(GLUE_TASKS)}.")


def is_regression_task(task_name: str) -> bool:
    """Return True if ``task_name`` is a regression task (only ``stsb``); raise ValueError if unknown."""
    _check_task(task_name)
    return task_name == "stsb"


def _as_1d(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    # A trailing axis of size 1 is the (n, 1) output of a single-label regression head.
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{what} must be one-dimensional, got shape {array.shape}; pass class ids rather than logits "
            "(glue_compute_metrics does the argmax)."
        )
    return array


def _correlation(statistic: Callable[..., Any], x: np.ndarray, y: np.ndarray) -> float:
    # The correlation of a constant vector is undefined: scipy warns and returns NaN. A model that
    # predicts a constant carries no ranking information, so report 0.0 instead of a NaN that would
    # break "best model" selection and averaging.
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        value = float(statistic(x, y)[0])
    return 0.0 if np.isnan(value) else value


def glue_metrics(task_name: str, predictions: Any, references: Any) -> dict[str, float]:
    """Compute the GLUE metric of ``task_name``; same keys and values as ``evaluate``'s ``glue`` metric.

    ``predictions`` are class ids (floats for ``stsb``), ``references`` the gold labels; both are
    one-dimensional array-likes of equal, non-zero length. All values are plain Python floats.

    Undefined values are 0.0 rather than NaN: ``pearson`` and ``spearmanr`` are 0.0 when the
    predictions or the references are constant (scipy would warn and return NaN), the Matthews
    correlation is 0.0 when all predictions or all labels are one class, and ``f1`` is 0.0 when there
    is no positive prediction and no positive label. Non-finite ``stsb`` values raise ValueError.
    """
    _check_task(task_name)
    preds = _as_1d(predictions, "predictions")
    refs = _as_1d(references, "references")
    if len(preds) != len(refs):
        raise ValueError(
            f"predictions and references must have the same length, got {len(preds)} predictions and "
            f"{len(refs)} references."
        )
    if len(preds) == 0:
        raise ValueError("Cannot compute GLUE metrics on empty predictions and references.")

    if task_name == "cola":
        with warnings.catch_warnings():
            # sklearn warns when y_true and y_pred hold a single shared label; the result is still 0.0.
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}

    if task_name == "stsb":
        preds = preds.astype(np.float64)
        refs = refs.astype(np.float64)
        if not (np.all(np.isfinite(preds)) and np.all(np.isfinite(refs))):
            # Mapping these to 0.0 would hide a diverged model; the correlation is simply not defined.
            raise ValueError("stsb predictions and references must be finite (found NaN or inf).")
        if len(preds) < 2:
            raise ValueError(f"stsb correlations need at least 2 examples, got {len(preds)}.")
        return {
            "pearson": _correlation(pearsonr, preds, refs),
            "spearmanr": _correlation(spearmanr, preds, refs),
        }

    accuracy = float(np.mean(preds == refs))
    if task_name in _ACC_AND_F1_TASKS:
        # zero_division=0.0 is sklearn's default value, minus its UndefinedMetricWarning.
        f1 = float(f1_score(refs, preds, zero_division=0.0))
        return {"accuracy": accuracy, "f1": f1}
    return {"accuracy": accuracy}


def glue_compute_metrics(task_name: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """Return a ``compute_metrics`` function for ``transformers.Trainer`` on the GLUE task ``task_name``.

    The returned function takes an :class:`~transformers.EvalPrediction`. If its ``predictions`` is a
    tuple (a model that also returns hidden states or attentions), the first element is taken as the
    logits. Classification logits are argmaxed over the last axis; ``stsb`` outputs of shape (n, 1)
    are squeezed to (n,). The result is :func:`glue_metrics` of those predictions and ``label_ids``.
    Unknown task names raise ValueError here, not at evaluation time.
    """
    _check_task(task_name)
    regression = is_regression_task(task_name)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        if regression:
            if predictions.ndim > 1 and predictions.shape[-1] == 1:
                predictions = np.squeeze(predictions, axis=-1)
        else:
            predictions = np.argmax(predictions, axis=-1)
        return glue_metrics(task_name, predictions, eval_pred.label_ids)

    return compute_metrics


def majority_class_metrics(task_name: str, references: Any) -> dict[str, float] | None:
    """`glue_metrics` of a model that always predicts the most frequent label of ``references`` (the
    floor a classifier must beat); None for the regression task stsb. Unlabelled rows (-1) are ignored."""
    if is_regression_task(task_name):
        return None
    refs = _as_1d(references, "references").astype(np.int64)
    refs = refs[refs >= 0]
    if len(refs) == 0:
        return None
    majority = int(np.bincount(refs).argmax())
    return glue_metrics(task_name, np.full_like(refs, majority), refs)
