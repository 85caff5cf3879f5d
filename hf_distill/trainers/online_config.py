"""Arguments of `OnlineDistillTrainer`: the learning teacher's arguments plus its online loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..safety.validation import check_finite
from .learning_teacher_config import LearningTeacherTrainingArguments


@dataclass
class OnlineDistillTrainingArguments(LearningTeacherTrainingArguments):
    """Learning-teacher arguments plus the weight of the teacher's KL to the student.

    Args:
        teacher_alpha (`float`, defaults to `0.4`):
            α_t: weight of the teacher's KL to the student, KL(p_s ‖ p_t); its task loss gets 1 - α_t.

    Every argument of `LearningTeacherTrainingArguments` applies too.
    """

    teacher_alpha: float = field(
        default=0.4,
        metadata={
            "help": "α_t: weight of the teacher's KL to the student, KL(p_s ‖ p_t); its task loss gets 1 - α_t."
        },
    )

    def __post_init__(self) -> None:
        check_finite(
            "teacher_alpha",
            self.teacher_alpha,
            0,
            1,
            hint="It weights the teacher's KL to the student and 1 - teacher_alpha its task loss.",
        )
        super().__post_init__()
