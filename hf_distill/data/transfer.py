"""A transfer set the teacher labels: masked copies of the training rows, for pure distillation.

A teacher fine-tuned on the training rows fits them better than it generalises, so its soft labels there
add little to the gold labels. Rows it has not seen are where they can say more. Whether that helps
depends on the task; compare at equal student steps (https://hf-distill.readthedocs.io/benchmarks/). `masked_transfer_set` makes such rows without any new text: every copy of a training row
has a random fraction of its word pieces replaced by the mask token (TinyBERT's augmentation, without its
word substitution). The copies have no gold label, so the student learns them from the teacher alone
(``alpha=1.0``); the original rows are kept, without their labels, so the student still distils every
training row. See https://hf-distill.readthedocs.io/distillation/ ("A transfer set the teacher labels").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .batch import TEACHER_PREFIX
from .label_checks import LABEL_COLUMNS


def mask_tokens(
    input_ids: list[int],
    mask_token_id: int,
    protected_ids: set[int],
    probability: float,
    rng: np.random.Generator,
) -> list[int]:
    """``input_ids`` with each token not in ``protected_ids`` replaced by ``mask_token_id`` with ``probability``."""
    draws = rng.random(len(input_ids))
    return [
        mask_token_id if token not in protected_ids and draw < probability else token
        for token, draw in zip(input_ids, draws, strict=True)
    ]


def masked_transfer_set(
    dataset: Any,
    mask_token_id: int,
    protected_ids: Iterable[int],
    copies: int = 1,
    mask_probability: float = 0.15,
    seed: int = 0,
) -> Any:
    """The rows of ``dataset`` followed by ``copies`` masked copies of each, with the label columns removed.

    Args:
        dataset: a tokenised `datasets.Dataset` with an ``input_ids`` column.
        mask_token_id: the tokenizer's ``mask_token_id``.
        protected_ids: token ids never masked (the tokenizer's ``all_special_ids``: [CLS], [SEP], padding).
        copies: masked copies per row (0: the rows alone, unlabelled).
        mask_probability: each unprotected token of a copy is masked with this probability.
        seed: the masks are a function of the seed and the row order only.

    Returns:
        A `datasets.Dataset` of ``len(dataset) * (copies + 1)`` rows, without ``label``/``labels``/``label_ids``.
    """
    from datasets import concatenate_datasets

    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}.")
    if not 0.0 < mask_probability < 1.0:
        raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"masked_transfer_set needs a tokenised dataset (an 'input_ids' column); it has {dataset.column_names}."
        )
    teacher_columns = [c for c in dataset.column_names if c.startswith(TEACHER_PREFIX)]
    if teacher_columns:
        raise ValueError(
            f"masked_transfer_set masks the student's input_ids only, but the dataset has {teacher_columns}: "
            "the copies would keep the teacher's unmasked inputs or cached logits. Make the transfer set "
            "first, then add_teacher_inputs / cache_teacher_logits on it."
        )
    unlabelled = dataset.remove_columns([c for c in LABEL_COLUMNS if c in dataset.column_names])
    protected = set(protected_ids)
    parts = [unlabelled]
    for copy in range(copies):
        rng = np.random.default_rng([seed, copy])

        def mask_batch(batch: dict[str, list], rng: np.random.Generator = rng) -> dict[str, list]:
            ids = [
                mask_tokens(row, mask_token_id, protected, mask_probability, rng)
                for row in batch["input_ids"]
            ]
            return {"input_ids": ids}

        masked = unlabelled.map(
            mask_batch, batched=True, load_from_cache_file=False, desc=f"Masked copy {copy + 1} of {copies}"
        )
        parts.append(masked)
    return concatenate_datasets(parts)
