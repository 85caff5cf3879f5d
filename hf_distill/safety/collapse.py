"""A classifier that predicts one class on every row: detected and reported, whatever the task."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    # Only needed for annotations; keeps importing this module from loading transformers.
    pass


logger = logging.getLogger(__name__)


def single_predicted_class(predictions: Any) -> int | None:
    """The class predicted on every row, or None when several are (or the output is not a classifier's).

    ``predictions`` are classification logits of shape (n, classes) with at least two classes (the first
    element of a tuple is taken), or one-dimensional integer class ids; regression outputs, token-level
    logits and fewer than two rows give None.
    """
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    if predictions is None:
        return None
    array = np.asarray(predictions)
    if array.ndim == 2 and array.shape[1] >= 2:
        ids = array.argmax(axis=-1)
    elif array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        ids = array
    else:
        return None
    if len(ids) < 2 or not np.all(ids == ids[0]):
        return None
    return int(ids[0])


def warn_if_collapsed(predictions: Any, label_ids: Any = None, what: str = "The model") -> int | None:
    """Log a warning when ``what`` predicted one class on every evaluation row; returns that class or None.

    A classifier that collapsed to one class scores the share of that class and nothing more, which a
    summary of scores alone hides. With ``label_ids`` the warning gives that share and the majority-class
    baseline.
    """
    only = single_predicted_class(predictions)
    if only is None:
        return None
    rows = len(np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions))
    message = f"{what} predicted class {only} on all {rows} evaluation rows: it has collapsed to one class"
    labels = None if label_ids is None else np.asarray(label_ids).reshape(-1)
    if labels is not None and labels.size == rows and np.issubdtype(labels.dtype, np.integer):
        labelled = labels[labels >= 0]
        if labelled.size:
            share = float(np.mean(labelled == only))
            majority = float(np.bincount(labelled).max() / labelled.size)
            message += f" (accuracy {share:.4f}; always predicting the majority class scores {majority:.4f})"
    logger.warning(
        "%s. Its scores say nothing about the task: train longer or with another learning rate, and check "
        "the labels and the teacher.",
        message,
    )
    return only
