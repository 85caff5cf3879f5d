"""Batch layout for distillation: teacher inputs, cached teacher logits and row ids.

A batch may carry, beside the student's inputs:
- ``teacher_<name>`` columns (e.g. ``teacher_input_ids``) for a teacher with its own tokenizer;
- ``teacher_logits``: precomputed teacher outputs (the teacher is then not run);
- ``teacher_topk_ids``, ``teacher_topk_logprobs``, ``teacher_tail_logprob``: a top-k cache of a language
  model teacher (its K most likely tokens per position, their log-probabilities and the tail's);
- ``idx``: dataset row ids, kept so that per-sample records can name their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

TEACHER_PREFIX = "teacher_"


TEACHER_LOGITS = "teacher_logits"

TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_TAIL_LOGPROB = "teacher_tail_logprob"
TEACHER_TOPK_COLUMNS = (TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS, TEACHER_TAIL_LOGPROB)
# Columns that hold the teacher's outputs rather than its inputs.
CACHED_TEACHER_COLUMNS = (TEACHER_LOGITS, *TEACHER_TOPK_COLUMNS)

ROW_ID = "idx"


@dataclass
class TopKTeacherTargets:
    """A top-k cache's soft labels for one batch: ``ids`` and ``logprobs`` ``(B, T, K)`` (the teacher's K most
    likely tokens and their log-probabilities at temperature 1), ``tail_logprob`` ``(B, T)`` (the log of
    the mass outside them)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    def detach(self) -> torch.Tensor:
        """The log-probabilities, for the finiteness checks that watch the teacher's targets."""
        return self.logprobs.detach()


@dataclass
class DistillationBatch:
    """A collated batch split once into what each model reads.

    ``student``: the student's inputs, ``labels`` included; ``teacher``: the ``teacher_`` columns without
    their prefix (empty when the teacher reads the student's inputs); ``cached_teacher_logits`` and
    ``row_ids``: the ``teacher_logits`` and ``idx`` columns, or ``None``; ``cached_teacher_topk``: the top-k
    cache's columns, or ``None``. ``step_batches`` is set on the
    first micro-batch of an optimisation step only: every (collated, unprepared) micro-batch of that step,
    this one first, for a teacher that steps once per optimisation step on all of them. ``after_backward``:
    work a teacher step leaves for after the student's backward of this micro-batch (it needs the
    student's gradient).
    """

    student: dict[str, Any]
    teacher: dict[str, Any] = field(default_factory=dict)
    cached_teacher_logits: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None
    step_batches: list[dict[str, Any]] | None = None
    after_backward: list[Callable[[], None]] = field(default_factory=list)
    cached_teacher_topk: TopKTeacherTargets | None = None

    @classmethod
    def from_collated(
        cls, batch: Mapping[str, Any], step_batches: list[dict[str, Any]] | None = None
    ) -> DistillationBatch:
        """Split a collated batch (a `DistillationBatch` is returned as it is)."""
        if isinstance(batch, DistillationBatch):
            return batch
        student, teacher = {}, {}
        for key, value in batch.items():
            if key in (*CACHED_TEACHER_COLUMNS, ROW_ID):
                continue
            if key.startswith(TEACHER_PREFIX):
                teacher[key[len(TEACHER_PREFIX) :]] = value
            else:
                student[key] = value
        topk = None
        if TEACHER_TOPK_IDS in batch:
            topk = TopKTeacherTargets(*(batch[name] for name in TEACHER_TOPK_COLUMNS))
        return cls(
            student,
            teacher,
            batch.get(TEACHER_LOGITS),
            batch.get(ROW_ID),
            step_batches,
            cached_teacher_topk=topk,
        )

    @property
    def starts_step(self) -> bool:
        """Whether this is the first micro-batch of an optimisation step."""
        return self.step_batches is not None

    @property
    def labels(self) -> torch.Tensor | None:
        return self.student.get("labels")

    @property
    def features(self) -> dict[str, Any]:
        """The student's inputs without the labels."""
        return {k: v for k, v in self.student.items() if k != "labels"}

    def teacher_inputs(self, accepted: set[str], with_labels: bool = False) -> dict[str, Any]:
        """The teacher's forward arguments: its own columns (the student's when it has none) that its
        ``forward`` accepts; with ``with_labels``, the labels too (the student's if the teacher has none)."""
        source = self.teacher or self.student
        names = accepted | {"labels"} if with_labels else accepted - {"labels"}
        feed = {k: v for k, v in source.items() if k in names}
        if with_labels and "labels" not in feed and "labels" in self.student:
            feed["labels"] = self.student["labels"]
        return feed


def has_columns(dataset: Any, names: Iterable[str]) -> bool:
    """Whether a dataset (a `datasets.Dataset` or an indexable of dicts) has any of ``names`` as a column."""
    columns = dataset_columns(dataset)
    return any(n in columns for n in names)


def dataset_columns(dataset: Any) -> set[str]:
    """Column names of a `datasets.Dataset`, or the keys of the first row of a map-style dataset."""
    if dataset is None:
        return set()
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return set(names)
    try:
        first = dataset[0]
    except Exception:  # iterable datasets and the like: nothing to inspect up front
        return set()
    return set(first) if isinstance(first, dict) else set()
