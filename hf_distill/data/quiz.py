"""Quiz data: the held-out feedback set of the trainers whose teacher learns from the student's generalisation.

Pure functions: `split_quiz` carves the quiz set out of the training set, `labelled_quiz` keeps its labelled
rows (or refuses it), `quiz_indices` picks each step's quiz rows. `QuizDistillTrainer` (quiz_trainer.py) uses them.

The meta and LGTM trainers update the teacher from the student's loss on quiz batches. By default the quiz
set is a stratified slice of the training set that is then not trained on; the evaluation set is never
used unless the caller passes it explicitly (the LGTM reference drew quiz batches from GLUE validation
and selected checkpoints on it too, which makes its reported dev scores optimistic).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .batch import dataset_columns
from .label_checks import IGNORE_INDEX, check_not_empty, find_label_column, label_values, labelled_rows

logger = logging.getLogger(__name__)


def split_quiz(
    dataset: Any, quiz_split: float, label_column: str = "label", seed: int = 42
) -> tuple[Any, Any]:
    """(train, quiz): a ``quiz_split`` fraction of a `datasets.Dataset`, stratified by ``label_column``.

    Every class keeps the same share in both parts (at least one quiz row per class that has two or more
    rows); rows labelled -100 stay in training. Float labels (regression) and datasets without
    ``label_column`` are split uniformly at random. Deterministic for a given seed.
    """
    if not 0.0 < quiz_split < 1.0:
        raise ValueError(f"quiz_split must be in (0, 1), got {quiz_split}.")
    n = len(dataset)
    if n == 0:
        raise ValueError(
            "The training set is empty (0 rows): there is nothing to carve quiz data from or train on."
        )
    rng = np.random.default_rng(seed)
    found = label_values(dataset, label_column)
    quiz: list[int] = []
    if found is not None and len(found[0]) == n:
        labels = found[0]
        for value in np.unique(labels):
            if value == IGNORE_INDEX:
                continue  # rows without a label teach the quiz nothing: they stay in training
            members = np.flatnonzero(labels == value)
            take = int(round(quiz_split * len(members)))
            if len(members) >= 2:
                take = min(max(take, 1), len(members) - 1)
            quiz.extend(rng.choice(members, size=take, replace=False).tolist())
    else:
        quiz = rng.choice(n, size=max(1, int(round(quiz_split * n))), replace=False).tolist()
    in_train = np.ones(n, dtype=bool)
    in_train[quiz] = False
    train = np.flatnonzero(in_train)
    if not len(train) or not quiz:
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


def labelled_quiz(quiz_dataset: Any, label_names: list[str] | None = None) -> Any:
    """The quiz rows that carry a label, or a clear error: the teacher learns from the student's loss on them."""
    fix = (
        "The teacher learns from the student's loss on labelled quiz rows: give quiz_dataset (or train_dataset, "
        "which the quiz is carved from by default) a 'label' column."
    )
    check_not_empty(quiz_dataset, "quiz set (quiz_dataset)", fix)
    columns = dataset_columns(quiz_dataset)
    column = find_label_column(columns, label_names or ())
    if columns and column is None:
        raise ValueError(
            f"The quiz data has no label column (looked for {sorted(set(label_names or ()) | {'label', 'labels', 'label_ids'})}). {fix}"
        )
    keep = labelled_rows(quiz_dataset, column) if column is not None else None
    if keep is not None and len(keep) < len(quiz_dataset):
        if len(keep) == 0:
            raise ValueError(f"Every quiz row is labelled -100 (ignored). {fix}")
        logger.info("Leaving out the %d quiz rows labelled -100.", len(quiz_dataset) - len(keep))
        quiz_dataset = quiz_dataset.select(keep)
    return quiz_dataset
