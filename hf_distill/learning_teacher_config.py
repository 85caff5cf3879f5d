"""Arguments shared by the trainers whose teacher learns (online, meta, LGTM): the teacher's optimisation."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import SchedulerType

from .distillation_config import DistillationTrainingArguments


@dataclass
class LearningTeacherTrainingArguments(DistillationTrainingArguments):
    """Distillation arguments plus the teacher's own optimisation.

    Args:
        teacher_learning_rate (`float`, defaults to `3e-05`):
            Peak learning rate of the teacher.
        teacher_weight_decay (`float`, defaults to `0.0`):
            AdamW weight decay of the teacher.
        teacher_lr_scheduler_type (`str`, defaults to `'linear'`):
            Teacher learning-rate schedule (a transformers SchedulerType), over the student's steps.
        teacher_warmup_ratio (`float`, defaults to `0.0`):
            Fraction of the training steps over which the teacher's rate warms up.
        teacher_max_grad_norm (`float`, defaults to `1.0`):
            Clip the teacher's gradient norm to this value (0 disables clipping).
        evaluate_teacher (`bool`, defaults to `True`):
            Also report the teacher's metrics (eval_teacher_*) at every evaluate().
        teacher_activation_checkpointing (`bool`, defaults to `False`):
            Recompute the teacher's activations in its backward instead of keeping them (non-reentrant,
            dropout replayed, same gradients): less memory for one more teacher forward per update. Saves
            most in LGTMTrainer, whose teacher graph lives across the student's lookahead and influence
            passes.

    Every argument of `DistillationTrainingArguments` applies too.
    """

    teacher_learning_rate: float = field(
        default=3e-5, metadata={"help": "Peak learning rate of the teacher."}
    )
    teacher_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the teacher."})
    teacher_lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Teacher learning-rate schedule (a transformers SchedulerType), over the student's steps."
        },
    )
    teacher_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training steps over which the teacher's rate warms up."},
    )
    teacher_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clip the teacher's gradient norm to this value (0 disables clipping)."},
    )
    evaluate_teacher: bool = field(
        default=True,
        metadata={"help": "Also report the teacher's metrics (eval_teacher_*) at every evaluate()."},
    )
    teacher_activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the teacher's activations in its backward instead of keeping them (non-reentrant, "
            "dropout replayed, same gradients): less memory for one more teacher forward per update. Saves most "
            "in LGTMTrainer, whose teacher graph lives across the student's lookahead and influence passes."
        },
    )

    def __post_init__(self) -> None:
        if not self.teacher_learning_rate > 0:
            raise ValueError(
                f"teacher_learning_rate must be > 0, got {self.teacher_learning_rate}; for a frozen teacher use "
                "DistillationTrainer."
            )
        if self.teacher_weight_decay < 0:
            raise ValueError(f"teacher_weight_decay must be >= 0, got {self.teacher_weight_decay}.")
        if not 0.0 <= self.teacher_warmup_ratio < 1.0:
            raise ValueError(f"teacher_warmup_ratio must be in [0, 1), got {self.teacher_warmup_ratio}.")
        if self.teacher_max_grad_norm < 0:
            raise ValueError(
                f"teacher_max_grad_norm must be >= 0 (0 disables clipping), got {self.teacher_max_grad_norm}."
            )
        try:
            self.teacher_lr_scheduler_type = SchedulerType(self.teacher_lr_scheduler_type).value
        except ValueError as err:
            choices = ", ".join(s.value for s in SchedulerType)
            raise ValueError(
                f"teacher_lr_scheduler_type={self.teacher_lr_scheduler_type!r} is unknown; choose one of {choices}."
            ) from err
        super().__post_init__()
