"""A dataset checked against the models that will read it, when a trainer is built: its labels' kind and
range for the student's head, and its longest row against each model's position limit.

Each check reads one Arrow column at a time (milliseconds for 400k rows), so a fault that would stop
training at its first batch, or an evaluation after the whole run, is refused before any training work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..distributed import unwrap_model
from ..teacher.loading import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, max_input_positions, task_type
from .batch import TEACHER_PREFIX, dataset_columns
from .label_checks import check_input_length, check_label_range, check_label_type, find_label_column


def is_regression(model: nn.Module) -> bool:
    """Whether a sequence-classification model has a regression head (one output, or problem_type)."""
    config = getattr(unwrap_model(model), "config", None)
    return task_type(model) == SEQUENCE_CLASSIFICATION and (
        getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 0) == 1
    )


def expected_label_kind(model: nn.Module) -> str | None:
    """The label kind the model's head reads (see `check_label_type`); None for language models, whose
    labels a collator often makes."""
    task = task_type(model)
    problem = getattr(getattr(unwrap_model(model), "config", None), "problem_type", None)
    if task == SEQUENCE_CLASSIFICATION and problem == "multi_label_classification":
        return None  # a float vector per row, checked by the head itself
    if task == SEQUENCE_CLASSIFICATION:
        return "float" if is_regression(model) else "integer"
    if task == TOKEN_CLASSIFICATION:
        return "list of integer"
    return None


def check_labels_for(
    model: nn.Module, dataset: Any, description: str, label_names: Sequence[str] = ()
) -> None:
    """The label column holds what ``model``'s head reads: its kind, then (classifiers) its range."""
    column = find_label_column(dataset_columns(dataset), label_names)
    expected = expected_label_kind(model)
    if column is None or expected is None:
        return
    check_label_type(dataset, column, expected, description)
    num_labels = getattr(getattr(unwrap_model(model), "config", None), "num_labels", None)
    if expected != "float" and num_labels:
        check_label_range(dataset, column, num_labels, description)


def check_input_lengths_for(
    student: nn.Module, teachers: Sequence[nn.Module], dataset: Any, description: str
) -> None:
    """No row is longer than the student's or a teacher's position limit (a teacher with its own
    tokenizer reads the ``teacher_input_ids`` column)."""
    columns = dataset_columns(dataset)
    check_input_length(dataset, max_input_positions(student), "student", description)
    teacher_column = TEACHER_PREFIX + "input_ids" if TEACHER_PREFIX + "input_ids" in columns else "input_ids"
    for position, teacher in enumerate(teachers):
        role = "teacher" if len(teachers) == 1 else f"teacher_model[{position}]"
        check_input_length(dataset, max_input_positions(teacher), role, description, teacher_column)


def evaluation_sets(eval_dataset: Any) -> list[tuple[Any, str]]:
    """(dataset, description) of each evaluation set (a dict of them, as `Trainer` accepts, or one)."""
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(dataset, f"evaluation ('{name}')") for name, dataset in eval_dataset.items()]
    return [(eval_dataset, "evaluation")]
