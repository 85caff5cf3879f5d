"""Batch layout for distillation: teacher inputs, cached teacher logits and row ids.

A batch may carry, beside the student's inputs:
- ``teacher_<name>`` columns (e.g. ``teacher_input_ids``) for a teacher with its own tokenizer;
- ``teacher_logits``: precomputed teacher outputs (the teacher is then not run);
- ``idx``: dataset row ids, kept so that per-sample records can name their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

from .teacher import forward_arg_names

TEACHER_PREFIX = "teacher_"
TEACHER_LOGITS = "teacher_logits"
ROW_ID = "idx"


@dataclass
class DistillationBatch:
    """A collated batch split once into what each model reads.

    ``student``: the student's inputs, ``labels`` included; ``teacher``: the ``teacher_`` columns without
    their prefix (empty when the teacher reads the student's inputs); ``cached_teacher_logits`` and
    ``row_ids``: the ``teacher_logits`` and ``idx`` columns, or ``None``. ``step_batches`` is set on the
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

    @classmethod
    def from_collated(
        cls, batch: Mapping[str, Any], step_batches: list[dict[str, Any]] | None = None
    ) -> DistillationBatch:
        """Split a collated batch (a `DistillationBatch` is returned as it is)."""
        if isinstance(batch, DistillationBatch):
            return batch
        student, teacher = {}, {}
        for key, value in batch.items():
            if key in (TEACHER_LOGITS, ROW_ID):
                continue
            if key.startswith(TEACHER_PREFIX):
                teacher[key[len(TEACHER_PREFIX) :]] = value
            else:
                student[key] = value
        return cls(student, teacher, batch.get(TEACHER_LOGITS), batch.get(ROW_ID), step_batches)

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

    def split(self) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
        """(student inputs, teacher inputs, cached teacher logits, row ids), the old `split_batch` tuple."""
        return self.student, self.teacher, self.cached_teacher_logits, self.row_ids


def split_batch(
    batch: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Split a collated batch into (student inputs, teacher inputs, cached teacher logits, row ids).

    Teacher inputs are the ``teacher_`` columns with the prefix removed; empty if there are none. The
    trainers use `DistillationBatch`, which holds the same four parts.
    """
    return DistillationBatch.from_collated(batch).split()


def _pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows, zero-padding a ragged token dimension (the one before the classes)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    length = max(t.shape[-2] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0, 0, length - t.shape[-2]]  # (classes: none, tokens: at the end)
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.stack(padded)


class DistillationDataCollator:
    """Wrap a collator so that distillation columns survive collation.

    ``teacher_`` token columns are padded with the teacher's tokenizer, ``teacher_logits`` are stacked
    (a ragged token dimension is zero-padded; those positions are masked by the labels), ``idx`` becomes a
    tensor; everything else goes through ``student_collator`` unchanged.
    """

    def __init__(
        self,
        student_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.student_collator = student_collator or default_data_collator
        self.teacher_tokenizer = teacher_tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        student_features, teacher_features, cached, row_ids = [], [], [], []
        for feature in features:
            s, t = {}, {}
            for key, value in feature.items():
                if key == TEACHER_LOGITS:
                    cached.append(torch.as_tensor(value, dtype=torch.float32))
                elif key == ROW_ID:
                    row_ids.append(int(value))
                elif key.startswith(TEACHER_PREFIX):
                    t[key[len(TEACHER_PREFIX) :]] = value
                else:
                    s[key] = value
            student_features.append(s)
            teacher_features.append(t)
        batch = dict(self.student_collator(student_features))
        if any(teacher_features):
            if self.teacher_tokenizer is None:
                raise ValueError(
                    "The batch has teacher_ input columns but no teacher tokenizer to pad them; pass "
                    "teacher_processing_class=<the teacher's tokenizer> to the trainer (or to this collator)."
                )
            padded = self.teacher_tokenizer.pad(teacher_features, return_tensors="pt")
            batch.update({TEACHER_PREFIX + k: v for k, v in padded.items()})
        if cached:
            batch[TEACHER_LOGITS] = _pad_stack(cached)
        if row_ids:
            batch[ROW_ID] = torch.tensor(row_ids, dtype=torch.long)
        return batch


def default_student_collator(processing_class: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """What ``Trainer`` would use: padding with the tokenizer if there is one, else default collation."""
    if isinstance(processing_class, PreTrainedTokenizerBase):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def add_teacher_inputs(
    dataset: Any,
    teacher_tokenizer: PreTrainedTokenizerBase,
    text_columns: str | Sequence[str],
    **tokenizer_kwargs: Any,
) -> Any:
    """Tokenise ``text_columns`` with the teacher's tokenizer into ``teacher_`` columns of a `datasets.Dataset`.

    ``tokenizer_kwargs`` go to the tokenizer (e.g. ``truncation=True, max_length=128``); padding is left to
    the collator.
    """
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"add_teacher_inputs: columns {missing} are not in the dataset ({dataset.column_names})."
        )
    if len(columns) > 2:
        raise ValueError("add_teacher_inputs takes one text column or a sentence pair (two columns).")

    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        encoded = teacher_tokenizer(*(rows[c] for c in columns), **tokenizer_kwargs)
        return {TEACHER_PREFIX + k: v for k, v in encoded.items()}

    return dataset.map(tokenize, batched=True, desc="Tokenising for the teacher")


@torch.no_grad()
def cache_teacher_logits(
    dataset: Any,
    teacher_model: nn.Module | Sequence[nn.Module],
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> Any:
    """Run the (frozen) teacher once over a `datasets.Dataset` and attach its outputs as ``teacher_logits``.

    With several teachers each row holds a ``(num_teachers, ...)`` array. Token-level logits are trimmed to
    each row's length. Only columns the teacher's forward accepts (or their ``teacher_`` versions) are fed;
    they are padded with ``tokenizer`` (the teacher's), or collated by ``data_collator`` if given.
    """
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    if device is None:
        device = next(teachers[0].parameters()).device
    use_teacher_columns = any(
        c.startswith(TEACHER_PREFIX) and c != TEACHER_LOGITS for c in dataset.column_names
    )
    all_rows: list[Any] = []
    for teacher in teachers:
        was_training = teacher.training
        teacher.eval()
        accepted = forward_arg_names(teacher) - {"labels"}
        source = {
            (TEACHER_PREFIX + name if use_teacher_columns else name): name
            for name in accepted
            if (TEACHER_PREFIX + name if use_teacher_columns else name) in dataset.column_names
        }
        if not source:
            raise ValueError(
                f"cache_teacher_logits: no dataset column matches the teacher's inputs {sorted(accepted)}; "
                f"tokenise the dataset first (columns: {dataset.column_names})."
            )
        collate = data_collator or default_student_collator(tokenizer)
        logits_rows = []
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            features = [{source[c]: rows[c][i] for c in source} for i in range(len(rows[next(iter(source))]))]
            batch = {k: v.to(device) for k, v in collate(features).items() if torch.is_tensor(v)}
            logits = teacher(**batch).logits.float().cpu()
            for i, row in enumerate(logits):
                if row.dim() == 2:  # token-level: drop the padding added by collation
                    row = row[: len(features[i]["input_ids"])]
                logits_rows.append(row)
        teacher.train(was_training)
        all_rows.append(logits_rows)
    if len(teachers) == 1:
        column = [r.tolist() for r in all_rows[0]]
    else:
        column = [torch.stack([rows[i] for rows in all_rows]).tolist() for i in range(len(dataset))]
    if TEACHER_LOGITS in dataset.column_names:
        dataset = dataset.remove_columns(TEACHER_LOGITS)
    return dataset.add_column(TEACHER_LOGITS, column)


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
