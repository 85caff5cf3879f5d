"""Arguments shared by the trainers whose teacher learns (online, meta, LGTM): the teacher's optimisation."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import SchedulerType

from ..safety.validation import check_finite
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
        teacher_fp32_master_weights (`bool`, defaults to `True`):
            Keep float32 master weights for a teacher whose trainable parameters are bf16/fp16: its optimizer
            steps float32 copies, rounded into the model after each step (+8 bytes per trainable parameter).
            Off: AdamW steps the half-precision weights, which rounds most small updates away.
        allow_partial_teacher_checkpoint (`bool`, defaults to `False`):
            Resume from a checkpoint whose teacher folder lacks optimizer.pt or scheduler.pt (the teacher's
            optimizer or schedule then start afresh, with a warning). Off: such a checkpoint is refused.

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
    teacher_fp32_master_weights: bool = field(
        default=True,
        metadata={
            "help": "Keep float32 master weights for a teacher whose trainable parameters are bf16/fp16: its "
            "optimizer steps float32 copies, rounded into the model after each step (+8 bytes per trainable "
            "parameter). Off: AdamW steps the half-precision weights, which rounds most small updates away."
        },
    )
    allow_partial_teacher_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint whose teacher folder lacks optimizer.pt or scheduler.pt (the teacher's "
            "optimizer or schedule then start afresh, with a warning). Off: such a checkpoint is refused."
        },
    )

    def __post_init__(self) -> None:
        check_finite(
            "teacher_learning_rate",
            self.teacher_learning_rate,
            0,
            low_open=True,
            hint="For a frozen teacher use DistillationTrainer.",
        )
        check_finite("teacher_weight_decay", self.teacher_weight_decay, 0)
        check_finite("teacher_warmup_ratio", self.teacher_warmup_ratio, 0, 1, high_open=True)
        check_finite("teacher_max_grad_norm", self.teacher_max_grad_norm, 0, hint="0 disables clipping.")
        try:
            self.teacher_lr_scheduler_type = SchedulerType(self.teacher_lr_scheduler_type).value
        except ValueError as err:
            choices = ", ".join(s.value for s in SchedulerType)
            raise ValueError(
                f"teacher_lr_scheduler_type={self.teacher_lr_scheduler_type!r} is unknown; choose one of {choices}."
            ) from err
        super().__post_init__()
