"""Quiz data: the held-out feedback set of the trainers whose teacher learns from the student's generalisation.

Pure functions: `split_quiz` carves the quiz set out of the training set, `quiz_indices` picks each step's
quiz rows. `QuizDistillTrainer` (quiz_trainer.py) uses them.

The meta and LGTM trainers update the teacher from the student's loss on quiz batches. By default the quiz
set is a stratified slice of the training set that is then not trained on; the evaluation set is never
used unless the caller passes it explicitly (the LGTM reference drew quiz batches from GLUE validation
and selected checkpoints on it too, which makes its reported dev scores optimistic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import dataset_columns


def split_quiz(
    dataset: Any, quiz_split: float, label_column: str = "label", seed: int = 42
) -> tuple[Any, Any]:
    """(train, quiz): a ``quiz_split`` fraction of a `datasets.Dataset`, stratified by ``label_column``.

    Every class keeps the same share in both parts (at least one quiz row per class that has two or more
    rows). Float labels (regression) are split uniformly at random. Deterministic for a given seed.
    """
    if not 0.0 < quiz_split < 1.0:
        raise ValueError(f"quiz_split must be in (0, 1), got {quiz_split}.")
    n = len(dataset)
    rng = np.random.default_rng(seed)
    labels = dataset[label_column] if label_column in dataset_columns(dataset) else None
    quiz: list[int] = []
    if labels is not None and len(labels) and isinstance(labels[0], (int, np.integer)):
        labels = np.asarray(labels)
        for value in np.unique(labels):
            members = np.flatnonzero(labels == value)
            take = int(round(quiz_split * len(members)))
            if len(members) >= 2:
                take = min(max(take, 1), len(members) - 1)
            quiz.extend(rng.choice(members, size=take, replace=False).tolist())
    else:
        quiz = rng.choice(n, size=max(1, int(round(quiz_split * n))), replace=False).tolist()
    quiz_set = set(quiz)
    train = [i for i in range(n) if i not in quiz_set]
    if not train or not quiz:
        raise ValueError(f"quiz_split={quiz_split} of {n} rows leaves an empty training or quiz set.")
    return dataset.select(train), dataset.select(sorted(quiz))


def quiz_indices(
    step: int, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Rows of the quiz batch of optimisation step ``step`` on process ``rank``.

    A pure function of the step: quiz epochs are seeded permutations walked in order, so a resumed run
    sees exactly the quiz batches of an uninterrupted one, and the ranks of a distributed run take
    disjoint slices of one global quiz batch.
    """
    global_batch = batch_size * world_size
    start = step * global_batch
    rows = []
    for position in range(start + rank * batch_size, start + (rank + 1) * batch_size):
        epoch, offset = divmod(position, num_rows)
        permutation = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(permutation[offset]))
    return rows
