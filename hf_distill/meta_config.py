"""Arguments of `MetaDistillTrainer`: the quiz trainers' arguments plus the pilot update."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        if not self.pilot_learning_rate > 0:
            raise ValueError(
                f"pilot_learning_rate must be > 0, got {self.pilot_learning_rate}: it is the step size of the "
                "pilot update the teacher learns through (typically the student's learning_rate)."
            )
        if (
            isinstance(self.meta_every, bool)
            or int(self.meta_every) != self.meta_every
            or self.meta_every < 1
        ):
            raise ValueError(
                f"meta_every must be an integer >= 1 (1 updates the teacher every step), got {self.meta_every}."
            )
        self.meta_every = int(self.meta_every)
        if not self.teacher_task_weight >= 0:
            raise ValueError(
                f"teacher_task_weight must be >= 0 (0 is the paper's quiz-only teacher), got "
                f"{self.teacher_task_weight}."
            )
        if self.alpha == 0:
            raise ValueError(
                "alpha=0 gives the distillation term no weight, so the student's pilot step does not depend on "
                "the teacher and the teacher's meta-gradient is zero. Set alpha > 0 (e.g. 0.5), or fine-tune "
                "with transformers.Trainer."
            )
        super().__post_init__()
