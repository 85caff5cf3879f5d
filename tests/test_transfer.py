"""masked_transfer_set: the teacher-labelled transfer set of masked copies."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_distill.data.transfer import mask_tokens, masked_transfer_set

MASK, CLS, SEP, PAD = 4, 2, 3, 0
PROTECTED = {CLS, SEP, PAD, MASK}


def rows(n: int = 200, length: int = 40) -> Dataset:
    rng = np.random.default_rng(0)
    ids = [[CLS, *rng.integers(10, 1000, size=length - 2).tolist(), SEP] for _ in range(n)]
    return Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * length] * n,
            "label": [i % 2 for i in range(n)],
            "idx": list(range(n)),
        }
    )


def test_originals_then_copies_without_labels():
    data = rows(30)
    transfer = masked_transfer_set(data, MASK, PROTECTED, copies=2, mask_probability=0.2, seed=1)
    assert len(transfer) == 90
    assert "label" not in transfer.column_names and {"attention_mask", "idx"} <= set(transfer.column_names)
    assert transfer["input_ids"][:30] == data["input_ids"]  # the originals, unchanged and first
    for copy in (1, 2):
        block = transfer.select(range(30 * copy, 30 * (copy + 1)))
        assert block["idx"] == data["idx"]  # row i of each copy is a copy of row i
        for original, masked in zip(data["input_ids"], block["input_ids"], strict=True):
            assert len(masked) == len(original)
            assert all(m == o or m == MASK for o, m in zip(original, masked, strict=True))


def test_mask_rate_and_protected_tokens():
    data = rows(300, 52)  # 15,000 maskable tokens per copy
    transfer = masked_transfer_set(data, MASK, PROTECTED, copies=1, mask_probability=0.15, seed=0)
    copies = transfer.select(range(300, 600))["input_ids"]
    masked = sum(row[1:-1].count(MASK) for row in copies)
    assert abs(masked / (300 * 50) - 0.15) < 0.015  # binomial sd ~0.003: a wrong rate fails
    assert all(row[0] == CLS and row[-1] == SEP for row in copies)  # never masked


def test_masks_depend_on_the_seed_only():
    data = rows(50)
    first = masked_transfer_set(data, MASK, PROTECTED, copies=2, seed=7)["input_ids"]
    again = masked_transfer_set(data, MASK, PROTECTED, copies=2, seed=7)["input_ids"]
    other = masked_transfer_set(data, MASK, PROTECTED, copies=2, seed=8)["input_ids"]
    assert first == again and first != other
    assert first[50:100] != first[100:150]  # two copies of a row differ


def test_mask_tokens_against_a_direct_loop():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    ids = [CLS, 11, 12, PAD, 13, SEP]
    draws = rng_b.random(len(ids))
    expected = [MASK if t not in PROTECTED and d < 0.5 else t for t, d in zip(ids, draws, strict=True)]
    assert mask_tokens(ids, MASK, PROTECTED, 0.5, rng_a) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"copies": -1}, "copies must be >= 0"),
        ({"mask_probability": 0.0}, "mask_probability must be in (0, 1)"),
        ({"mask_probability": 1.5}, "mask_probability must be in (0, 1)"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        masked_transfer_set(rows(4), MASK, PROTECTED, **kwargs)


def test_untokenised_data_is_refused():
    with pytest.raises(ValueError, match="needs a tokenised dataset"):
        masked_transfer_set(Dataset.from_dict({"sentence": ["a b"], "label": [0]}), MASK, PROTECTED)


@pytest.mark.parametrize("column", ["teacher_input_ids", "teacher_logits"])
def test_teacher_columns_are_refused(column):
    data = rows(4).add_column(column, [[1, 2]] * 4)
    with pytest.raises(ValueError, match=f"has \\['{column}'\\].*Make the transfer set first"):
        masked_transfer_set(data, MASK, PROTECTED)
