"""hf_distill.trainers.lgtm_records: the pieces of LGTM's influence record that need no trainer (the record
of real runs is tested in test_lgtm_trainer.py and test_callbacks.py)."""

from __future__ import annotations

import math

import torch

from hf_distill.trainers.lgtm_records import gold_label_probability, rows_without_teacher_prob


def test_gold_label_probability_is_each_rows_softmax_at_its_label_and_nan_without_one():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    probs = gold_label_probability(logits, torch.tensor([1, 0, -100]))
    assert torch.allclose(probs[:2], torch.tensor([0.5, math.exp(2) / (math.exp(2) + 1)]))
    assert math.isnan(probs[2].item())


def test_a_record_lacks_teacher_probabilities_until_every_row_has_one():
    record = {"influence": torch.zeros(4), "teacher_gold_prob": None}
    assert rows_without_teacher_prob(record)
    record["teacher_gold_prob"] = torch.zeros(2)  # the first of two micro-batches
    assert rows_without_teacher_prob(record)
    record["teacher_gold_prob"] = torch.zeros(4)
    assert not rows_without_teacher_prob(record)
