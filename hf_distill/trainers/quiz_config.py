"""Arguments of the trainers whose teacher learns from the student's quiz loss (meta, LGTM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..safety.validation import check_finite, check_integer
from .learning_teacher_config import LearningTeacherTrainingArguments


@dataclass
class QuizDistillTrainingArguments(LearningTeacherTrainingArguments):
    """Learning-teacher arguments plus the quiz set of the trainers that learn from the student's quiz loss.

    Args:
        quiz_split (`float`, defaults to `0.1`):
            Fraction of the training set held out as quiz data (stratified by label) when no quiz_dataset is
            given; those rows are not trained on.
        quiz_batch_size (`int | None`, defaults to `None`):
            Quiz batch size per device (default: per_device_train_batch_size × gradient_accumulation_steps).

    Every argument of `LearningTeacherTrainingArguments` applies too.
    """

    quiz_split: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the training set held out as quiz data (stratified by label) when no "
            "quiz_dataset is given; those rows are not trained on."
        },
    )
    quiz_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Quiz batch size per device (default: per_device_train_batch_size × gradient_accumulation_steps)."
        },
    )

    def __post_init__(self) -> None:
        check_finite("quiz_split", self.quiz_split, 0, 1, low_open=True, high_open=True)
        if self.quiz_batch_size is not None:
            self.quiz_batch_size = check_integer("quiz_batch_size", self.quiz_batch_size, 1)
        super().__post_init__()
