"""Quiz data: the held-out feedback set of the trainers whose teacher learns from the student's generalisation.

The meta and LGTM trainers update the teacher from the student's loss on quiz batches. By default the quiz
set is a stratified slice of the training set that is then not trained on; the evaluation set is never
used unless the caller passes it explicitly (the LGTM reference drew quiz batches from GLUE validation
and selected checkpoints on it too, which makes its reported dev scores optimistic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import ROW_ID, dataset_columns
from .label_checks import IGNORE_INDEX, check_not_empty, find_label_column, label_values, labelled_rows
from .online import OnlineDistillTrainer, OnlineDistillTrainingArguments
from .validation import check_finite, check_integer

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


@dataclass
class QuizDistillTrainingArguments(OnlineDistillTrainingArguments):
    """Online-distillation arguments plus the quiz set of the trainers that learn from the student's quiz loss."""

    quiz_split: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the training set held out as quiz data (stratified by label) when no "
            "quiz_dataset is given; those rows are not trained on."
        },
    )
    quiz_batch_size: int | None = field(
        default=None, metadata={"help": "Quiz batch size per device (default: per_device_train_batch_size)."}
    )

    def __post_init__(self) -> None:
        check_finite("quiz_split", self.quiz_split, 0, 1, low_open=True, high_open=True)
        if self.quiz_batch_size is not None:
            self.quiz_batch_size = check_integer("quiz_batch_size", self.quiz_batch_size, 1)
        super().__post_init__()


class QuizDistillTrainer(OnlineDistillTrainer):
    """Base of the trainers whose teacher learns from the student's loss on quiz data.

    ``quiz_dataset=None`` carves the quiz set out of ``train_dataset`` (``quiz_split``, stratified); passing
    the evaluation set as ``quiz_dataset`` is allowed but warns that evaluation scores are no longer clean.
    """

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: QuizDistillTrainingArguments | None = None,
        *,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        quiz_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        self.quiz_from_train = quiz_dataset is None
        is_eval = False
        check_not_empty(train_dataset, "training set (train_dataset)", "Pass a dataset with rows.")
        if train_dataset is not None and hasattr(train_dataset, "add_column"):
            if ROW_ID not in dataset_columns(train_dataset):
                # Row ids name the samples in per-sample records; added before the quiz split so that they
                # are rows of the dataset the caller passed.
                train_dataset = train_dataset.add_column(ROW_ID, list(range(len(train_dataset))))
        if quiz_dataset is None and train_dataset is not None:
            if not hasattr(train_dataset, "select"):
                raise ValueError(
                    "Carving quiz data out of train_dataset needs a datasets.Dataset; pass quiz_dataset= "
                    "explicitly for other dataset types."
                )
            label_column = find_label_column(
                dataset_columns(train_dataset), getattr(args, "label_names", None) or ()
            )
            train_dataset, quiz_dataset = split_quiz(
                train_dataset,
                getattr(args, "quiz_split", 0.1),
                label_column=label_column or "label",
                seed=getattr(args, "seed", 42),
            )
        if quiz_dataset is not None:
            is_eval = quiz_dataset is eval_dataset
            quiz_dataset = labelled_quiz(quiz_dataset, getattr(args, "label_names", None))
        if quiz_dataset is not None and is_eval:
            logger.warning(
                "The evaluation set is also the quiz set: the teacher learns from the student's loss on it, so "
                "evaluation scores are no longer clean estimates. Hold out quiz data from training instead."
            )
        super().__init__(
            model, teacher_model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )
        if quiz_dataset is None:
            raise ValueError(f"{type(self).__name__} needs quiz data: pass train_dataset (or quiz_dataset=).")
        self.quiz_dataset = self._remove_unused_columns(quiz_dataset, description="quiz")
        self._quiz_batch_size = self.args.quiz_batch_size or self.args.per_device_train_batch_size

    @classmethod
    def _default_args_class(cls) -> type[QuizDistillTrainingArguments]:
        return QuizDistillTrainingArguments

    def quiz_batch(self, step: int | None = None) -> dict[str, Any]:
        """The collated quiz batch of optimisation step ``step`` (default: the current one), on the device."""
        step = self.state.global_step if step is None else step
        rows = quiz_indices(
            step,
            len(self.quiz_dataset),
            self._quiz_batch_size,
            self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        features = [self.quiz_dataset[i] for i in rows]
        return self._prepare_inputs(self.data_collator(features))
