"""hf_distill.label_checks: label columns read as arrays, checked against the student's classes."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from hf_distill.data.label_checks import (
    check_label_range,
    check_not_empty,
    find_label_column,
    label_values,
    labelled_rows,
)


def test_find_label_column_prefers_trainers_label_names():
    assert find_label_column(["input_ids", "label"]) == "label"
    assert find_label_column(["input_ids", "labels"]) == "labels"
    assert find_label_column(["label", "target"], ["target"]) == "target"
    assert find_label_column(["input_ids"]) is None


def test_label_values_follow_a_row_selection():
    data = datasets.Dataset.from_dict({"label": list(range(10))})
    view = data.select([7, 2, 9])
    values, rows = label_values(view, "label")
    assert values.tolist() == [7, 2, 9] and rows.tolist() == [0, 1, 2]  # rows of the dataset as given


def test_label_values_flatten_token_labels_with_their_rows():
    data = datasets.Dataset.from_dict({"labels": [[0, 1], [-100, 2, 1], [3]]})
    values, rows = label_values(data, "labels")
    assert values.tolist() == [0, 1, -100, 2, 1, 3] and rows.tolist() == [0, 0, 1, 1, 1, 2]


def test_label_values_skip_floats_and_non_arrow_datasets():
    assert label_values(datasets.Dataset.from_dict({"label": [0.5, 1.5]}), "label") is None
    assert label_values([{"label": 3}], "label") is None


def test_check_label_range_names_value_and_row():
    data = datasets.Dataset.from_dict({"label": [0, 1, -100, 1, 2, 0, 5]})
    with pytest.raises(ValueError, match=r"holds 2 at row 4 \(2 value\(s\) outside \[0, 2\)"):
        check_label_range(data, "label", 2)
    check_label_range(data, "label", 6)  # -100 is allowed: the losses ignore it
    with pytest.raises(ValueError, match=r"holds -1 at row 1"):
        check_label_range(datasets.Dataset.from_dict({"labels": [[0], [1, -1]]}), "labels", 2)


def test_labelled_rows_leave_out_minus_100():
    data = datasets.Dataset.from_dict({"label": [0, -100, 1, -100]})
    assert labelled_rows(data, "label").tolist() == [0, 2]
    assert labelled_rows(datasets.Dataset.from_dict({"labels": [[0, 1]]}), "labels") is None  # token-level


def test_check_not_empty():
    check_not_empty([1], "training set", "")
    check_not_empty(None, "training set", "")
    with pytest.raises(ValueError, match=r"The quiz set is empty \(0 rows\)\. Give rows\."):
        check_not_empty(
            datasets.Dataset.from_dict({"label": np.zeros(0, dtype=int)}), "quiz set", "Give rows."
        )
