"""hf_distill.quiz: the stratified quiz split and the quiz rows of each step, as pure functions."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest

from hf_distill.data.quiz import quiz_indices, split_quiz


def labelled(n: int, labels) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"idx": list(range(n)), "label": [labels(i) for i in range(n)]})


def test_split_quiz_is_stratified_disjoint_and_complete():
    data = labelled(100, lambda i: 0 if i < 80 else 1)  # 80 / 20
    train, quiz = split_quiz(data, 0.25, seed=3)
    assert Counter(quiz["label"]) == {0: 20, 1: 5}  # each class keeps its 25 % share
    assert Counter(train["label"]) == {0: 60, 1: 15}
    assert set(train["idx"]).isdisjoint(quiz["idx"]) and len(train) + len(quiz) == 100
    again = split_quiz(data, 0.25, seed=3)[1]
    assert again["idx"] == quiz["idx"]  # deterministic for a seed
    assert split_quiz(data, 0.25, seed=4)[1]["idx"] != quiz["idx"]


def test_split_quiz_gives_each_class_with_two_rows_a_quiz_row():
    data = labelled(42, lambda i: 2 if i < 2 else i % 2)  # class 2 has two rows only
    train, quiz = split_quiz(data, 0.1)
    assert quiz["label"].count(2) == 1 and train["label"].count(2) == 1


def test_split_quiz_of_float_labels_is_uniform_and_checks_the_fraction():
    data = labelled(50, lambda i: i / 10)
    train, quiz = split_quiz(data, 0.2)
    assert len(quiz) == 10 and len(train) == 40
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="quiz_split must be in"):
            split_quiz(data, bad)


def test_quiz_indices_walk_seeded_permutations_epoch_by_epoch():
    rows = [quiz_indices(step, num_rows=10, batch_size=4, seed=7) for step in range(5)]
    first_epoch = rows[0] + rows[1] + rows[2][:2]
    assert sorted(first_epoch) == list(range(10))  # every row once per epoch
    assert rows[2][2:] + rows[3] + rows[4] == quiz_indices(2, 10, 4, 7)[2:] + rows[3] + rows[4]
    assert quiz_indices(3, 10, 4, seed=7) == rows[3]  # a pure function of the step: resume-safe
    assert quiz_indices(0, 10, 4, seed=8) != rows[0]


def test_quiz_indices_of_ranks_are_disjoint_slices_of_one_global_batch():
    global_batch = quiz_indices(5, num_rows=50, batch_size=6, seed=0)
    ranks = [quiz_indices(5, num_rows=50, batch_size=3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0] + ranks[1] == global_batch
