"""Checks of a dataset's label column made when a trainer is built, vectorised over the column.

A `datasets.Dataset` keeps its columns in Arrow: a label column is read as one numpy array (through the
row selection of ``select``/``train_test_split`` when there is one), so checking 400k rows takes milliseconds
(benchmarks/label_check.py) rather than a pass over Python rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IGNORE_INDEX = -100  # the label `Trainer`'s losses (torch's cross-entropy) skip
LABEL_COLUMNS = ("label", "labels", "label_ids")


def find_label_column(columns: Iterable[str], label_names: Sequence[str] = ()) -> str | None:
    """The column holding the labels: one of ``label_names`` (Trainer's ``args.label_names``), else the first
    of ``label``, ``labels``, ``label_ids`` present; None when there is none."""
    present = set(columns)
    return next((c for c in (*label_names, *LABEL_COLUMNS) if c in present), None)


def label_values(dataset: Any, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, row of each value) of an integer label column, token-level lists flattened; None when
    ``dataset`` is not an Arrow-backed `datasets.Dataset` or the column does not hold integers."""
    table = getattr(dataset, "data", None)
    if table is None or not hasattr(table, "column") or column not in getattr(table, "column_names", ()):
        return None
    values = table.column(column)
    indices = getattr(dataset, "_indices", None)  # the row selection of select()/shuffle(), if any
    if indices is not None:
        values = values.take(indices.column(0))
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        rows = pc.list_parent_indices(values).to_numpy()
        values = pc.list_flatten(values)
    else:
        rows = None
    if not pa.types.is_integer(values.type) or values.null_count:
        return None
    flat = values.to_numpy()
    return flat, (np.arange(len(flat)) if rows is None else rows)


def check_label_range(dataset: Any, column: str, num_labels: int, description: str = "training") -> None:
    """Refuse labels outside ``[0, num_labels)`` (``-100``, ignored by the losses, is allowed), naming the
    first offending value and its row."""
    found = label_values(dataset, column)
    if found is None:
        return
    values, rows = found
    bad = np.flatnonzero(((values < 0) & (values != IGNORE_INDEX)) | (values >= num_labels))
    if bad.size:
        first = bad[0]
        raise ValueError(
            f"The {description} data's '{column}' column holds {int(values[first])} at row {int(rows[first])} "
            f"({bad.size} value(s) outside [0, {num_labels}) in all), but the student predicts {num_labels} "
            f"classes. Map the labels to 0..{num_labels - 1} (or -100 for rows to ignore), or load the models "
            "with the matching num_labels."
        )


def labelled_rows(dataset: Any, column: str) -> np.ndarray | None:
    """Indices of the rows whose (sequence-level) label is not ``-100``; None when they cannot be read."""
    found = label_values(dataset, column)
    if found is None or len(found[0]) != len(dataset):
        return None
    return np.flatnonzero(found[0] != IGNORE_INDEX)


def check_not_empty(dataset: Any, description: str, fix: str) -> None:
    """Refuse a sized dataset with no rows, before any training work."""
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"The {description} is empty (0 rows). {fix}")
