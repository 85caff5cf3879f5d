"""Collators that keep the distillation columns (teacher inputs, cached logits, row ids) through
collation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

from .batch import ROW_ID, TEACHER_LOGITS, TEACHER_PREFIX, TEACHER_TOPK_COLUMNS, TEACHER_TOPK_IDS


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


def _pad_positions(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows of a top-k cache, zero-padding the token positions (their first dimension) at the end."""
    length = max(t.shape[0] for t in tensors)
    padded = [torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1) + [0, length - t.shape[0]]) for t in tensors]
    return torch.stack(padded)


class DistillationDataCollator:
    """Wrap a collator so that distillation columns survive collation.

    ``teacher_`` token columns are padded with the teacher's tokenizer, ``teacher_logits`` are stacked
    (a ragged token dimension is zero-padded; those positions are masked by the labels), so are the columns
    of a top-k cache (ids as int64, log-probabilities as float32), ``idx`` becomes a tensor; everything else goes through ``student_collator`` unchanged.
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
        topk: dict[str, list[torch.Tensor]] = {name: [] for name in TEACHER_TOPK_COLUMNS}
        for feature in features:
            s, t = {}, {}
            for key, value in feature.items():
                if key == TEACHER_LOGITS:
                    cached.append(torch.as_tensor(value, dtype=torch.float32))
                elif key in topk:
                    dtype = torch.long if key == TEACHER_TOPK_IDS else torch.float32
                    topk[key].append(torch.as_tensor(value, dtype=dtype))
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
        batch.update({name: _pad_positions(rows) for name, rows in topk.items() if rows})
        if row_ids:
            batch[ROW_ID] = torch.tensor(row_ids, dtype=torch.long)
        return batch


def default_student_collator(processing_class: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """What ``Trainer`` would use: padding with the tokenizer if there is one, else default collation."""
    if isinstance(processing_class, PreTrainedTokenizerBase):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator
