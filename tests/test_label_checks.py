"""hf_distill.label_checks: label columns read as arrays, checked against the student's classes."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from hf_distill.data.label_checks import (
    check_input_length,
    check_label_range,
    check_label_type,
    check_not_empty,
    find_label_column,
    label_kind,
    label_values,
    labelled_rows,
    longest_row,
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


# ----- the label column's kind and the inputs' length --------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([0, 1, 1], "integer"),
        ([0.0, 1.0, 1.0], "float"),
        ([True, False, True], "boolean"),
        (["neg", "pos", "pos"], "string"),
        ([[0], [1], [1]], "list of integer"),
        ([[0, -100], [1, 1], [1]], "list of integer"),
    ],
)
def test_label_kind_is_read_from_arrow_and_from_python_rows(values, kind):
    assert label_kind(datasets.Dataset.from_dict({"label": values}), "label") == kind
    assert label_kind([{"label": v} for v in values], "label") == kind


@pytest.mark.parametrize(
    ("values", "expected", "fix"),
    [
        (["neg", "pos"], "integer", r"class_encode_column\('label'\)"),
        ([True, False], "integer", r"cast_column\('label', datasets.Value\('int64'\)\)"),
        ([0.0, 1.0], "integer", "num_labels=1"),
        ([[0], [1]], "integer", r"row\['label'\]\[0\]"),
        ([0, 1], "list of integer", "convert the column to list of integer"),
        (["a", "b"], "float", "class_encode_column"),
    ],
)
def test_a_label_column_of_the_wrong_kind_is_refused_with_its_fix(values, expected, fix):
    dataset = datasets.Dataset.from_dict({"label": values})
    with pytest.raises(ValueError, match=f"'label' column holds .* values, but .*{fix}"):
        check_label_type(dataset, "label", expected, "training")


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0, 1], "integer"), ([[0, 1], [1]], "list of integer"), ([0.5, 1.0], "float"), ([0, 3], "float")],
)
def test_labels_a_head_can_read_pass(values, expected):
    check_label_type(datasets.Dataset.from_dict({"label": values}), "label", expected)


def test_the_longest_row_is_found_through_a_row_selection():
    dataset = datasets.Dataset.from_dict({"input_ids": [[1] * 3, [1] * 9, [1] * 5]})
    assert longest_row(dataset) == (9, 1)
    assert longest_row(dataset.select([0, 2])) == (5, 1)
    assert longest_row(datasets.Dataset.from_dict({"text": ["a"]})) is None


def test_rows_longer_than_the_position_limit_are_refused_naming_row_and_fix():
    dataset = datasets.Dataset.from_dict({"input_ids": [[1] * 3, [1] * 9]})
    check_input_length(dataset, 9, "teacher")
    check_input_length(dataset, None, "teacher")  # no limit (rotary positions)
    with pytest.raises(
        ValueError, match=r"evaluation data's row 1 has 9 tokens .* teacher accepts at most 8 .*max_length=8"
    ):
        check_input_length(dataset, 8, "teacher", "evaluation")
