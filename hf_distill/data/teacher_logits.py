"""Preparing data for a teacher: its own tokenisation (``teacher_`` columns), and its logits computed
once and cached in the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..teacher.loading import forward_arg_names
from .batch import TEACHER_LOGITS, TEACHER_PREFIX
from .collators import default_student_collator


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
