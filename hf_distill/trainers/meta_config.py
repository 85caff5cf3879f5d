"""Arguments of `MetaDistillTrainer`: the quiz trainers' arguments plus the pilot update."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..safety.validation import check_finite, check_integer
from .quiz_config import QuizDistillTrainingArguments


@dataclass
class MetaDistillTrainingArguments(QuizDistillTrainingArguments):
    """Learning-teacher and quiz arguments plus the pilot update of meta distillation.

    The teacher's objective is the student's quiz loss after the pilot step (plus ``teacher_task_weight`` ×
    its own task loss).

    Args:
        pilot_learning_rate (`float`, defaults to `5e-05`):
            η_pilot: step size of the differentiable pilot update θs' = θs − η_pilot · ∇θs L_s (plain
            gradient step).
        meta_every (`int`, defaults to `1`):
            Update the teacher every k-th student step (1: every step, the paper's method). Skipped steps
            are plain distillation steps against the current teacher.
        teacher_task_weight (`float`, defaults to `0.0`):
            Weight of the teacher's own task loss on the training batch, added to its quiz objective (0: the
            quiz loss alone, the paper's method; > 0 keeps the teacher accurate).

    Every argument of `QuizDistillTrainingArguments` applies too.
    """

    pilot_learning_rate: float = field(
        default=5e-5,
        metadata={
            "help": "η_pilot: step size of the differentiable pilot update θs' = θs − η_pilot · ∇θs L_s (plain "
            "gradient step)."
        },
    )
    meta_every: int = field(
        default=1,
        metadata={
            "help": "Update the teacher every k-th student step (1: every step, the paper's method). Skipped "
            "steps are plain distillation steps against the current teacher."
        },
    )
    teacher_task_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the teacher's own task loss on the training batch, added to its quiz objective "
            "(0: the quiz loss alone, the paper's method; > 0 keeps the teacher accurate)."
        },
    )

    def __post_init__(self) -> None:
        check_finite(
            "pilot_learning_rate",
            self.pilot_learning_rate,
            0,
            low_open=True,
            hint="It is the step size of the pilot update the teacher learns through (typically the student's "
            "learning_rate).",
        )
        self.meta_every = check_integer(
            "meta_every", self.meta_every, 1, hint="1 updates the teacher every step."
        )
        check_finite(
            "teacher_task_weight", self.teacher_task_weight, 0, hint="0 is the paper's quiz-only teacher."
        )
        if self.alpha == 0:
            raise ValueError(
                "alpha=0 gives the distillation term no weight, so the student's pilot step does not depend on "
                "the teacher and the teacher's meta-gradient is zero. Set alpha > 0 (e.g. 0.5), or fine-tune "
                "with transformers.Trainer."
            )
        super().__post_init__()
