"""Checks of a dataset's label and input columns made when a trainer is built, vectorised over the column.

A `datasets.Dataset` keeps its columns in Arrow: a label column is read as one numpy array (through the
row selection of ``select``/``train_test_split`` when there is one), so checking 400k rows takes milliseconds
(see the label-check figures on the benchmarks page) rather than a pass over Python rows.
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


def _arrow_column(dataset: Any, column: str) -> pa.Array | None:
    """The column of an Arrow-backed `datasets.Dataset` (through its row selection), else None."""
    table = getattr(dataset, "data", None)
    if table is None or not hasattr(table, "column") or column not in getattr(table, "column_names", ()):
        return None
    values = table.column(column)
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        values = values.take(indices.column(0))
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _python_kind(value: Any) -> str:
    """The kind of one label value of a map-style dataset, in the words of `check_label_type`."""
    if hasattr(value, "tolist"):  # a numpy or torch scalar or array
        value = value.tolist()
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list of " + (_python_kind(value[0]) if value else "integer")
    return type(value).__name__


def label_kind(dataset: Any, column: str) -> str | None:
    """What the label column holds: "integer", "float", "boolean", "string", or "list of <kind>" (per-token
    labels); None when it cannot be read without a pass over the data (iterable datasets)."""
    values = _arrow_column(dataset, column)
    if values is None:
        try:
            return _python_kind(dataset[0][column])
        except Exception:  # not indexable, or no such key: nothing to check up front
            return None
    arrow_type = values.type
    prefix = ""
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        prefix, arrow_type = prefix + "list of ", arrow_type.value_type
    if pa.types.is_integer(arrow_type):
        kind = "integer"
    elif pa.types.is_floating(arrow_type):
        kind = "float"
    elif pa.types.is_boolean(arrow_type):
        kind = "boolean"
    elif pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        kind = "string"
    else:
        kind = str(arrow_type)
    return prefix + kind


# What each head needs, and the fix for each kind of column that it cannot read.
_LABEL_FIXES = {
    "string": "encode the names as class ids: dataset = dataset.class_encode_column({column!r}) (then load the "
    "models with num_labels, label2id and id2label from dataset.features[{column!r}])",
    "boolean": "cast them to class ids: dataset = dataset.cast_column({column!r}, datasets.Value('int64'))",
    "float": "cast whole-number labels to class ids with dataset.cast_column({column!r}, "
    "datasets.Value('int64')); for a regression target load the models with num_labels=1",
    "list of integer": "keep one class id per row: dataset = dataset.map(lambda row: {{{column!r}: "
    "row[{column!r}][0]}})",
}


def check_label_type(dataset: Any, column: str, expected: str, description: str = "training") -> None:
    """Refuse a label column of the wrong kind before training: ``expected`` is "integer" (a
    sequence classifier), "list of integer" (a token classifier) or "float" (a regression head, which also
    takes integers). The message names the column's kind and the fix."""
    kind = label_kind(dataset, column)
    if kind is None or kind == expected or (expected == "float" and kind == "integer"):
        return
    head = {
        "integer": "a sequence-classification head needs one integer class id per row",
        "list of integer": "a token-classification head needs a list of integer class ids per row",
        "float": "a regression head needs one number per row",
    }[expected]
    fix = _LABEL_FIXES.get(kind, "convert the column to " + expected + " values").format(column=column)
    raise ValueError(f"The {description} data's '{column}' column holds {kind} values, but {head}: {fix}.")


def longest_row(dataset: Any, column: str = "input_ids") -> tuple[int, int] | None:
    """(length, row) of the longest token list in ``column``; None when the column is absent, is not a list
    column, or cannot be read without a pass over the data."""
    values = _arrow_column(dataset, column)
    if values is None or not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        return None
    if len(values) == 0:
        return None
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    row = int(np.argmax(lengths))
    return int(lengths[row]), row


def check_input_length(
    dataset: Any, limit: int | None, role: str, description: str = "training", column: str = "input_ids"
) -> None:
    """Refuse rows longer than a model's position limit (``limit``, e.g. from
    `hf_distill.teacher.loading.max_input_positions`) before training, rather than a size mismatch inside
    attention at the first such batch (for evaluation data: after the whole training run)."""
    if limit is None:
        return
    found = longest_row(dataset, column)
    if found is None or found[0] <= limit:
        return
    length, row = found
    raise ValueError(
        f"The {description} data's row {row} has {length} tokens in '{column}', but the {role} accepts at most "
        f"{limit} positions. Truncate when tokenising (tokenizer(..., truncation=True, max_length={limit})), or "
        "drop the longer rows."
    )
