"""`OnlineDistillTrainer`: teacher and student learn together (https://hf-distill.readthedocs.io/algorithms/, "Online distillation")."""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import DistillationBatch
from .distillation_trainer import StudentForward, TeacherTargets
from .learning_teacher_trainer import LearningTeacherTrainer
from .online_config import OnlineDistillTrainingArguments


class OnlineDistillTrainer(LearningTeacherTrainer):
    """Teacher and student updated together, each optimisation step (https://hf-distill.readthedocs.io/algorithms/).

    1. the teacher steps on ``α_t · KL(p_s.detach() ‖ p_t) + (1 − α_t) · CE(z_t, y)`` over the step's
       micro-batches (so under gradient accumulation it steps at the same boundaries as the student);
    2. the student steps on its distillation loss against the *updated* teacher's soft labels.

    ``trainer.teacher_model`` is the live teacher; `save_teacher` writes it with its tokenizer. Checkpoints
    hold the teacher, its optimizer and scheduler, and ``train(resume_from_checkpoint=...)`` restores them.
    Under FSDP2 the teacher is sharded like the student, its gradients reduced by FSDP2 and its checkpoint
    gathered. The teacher you pass is trained in place: pass a copy (``copy.deepcopy(teacher)``) to keep the original.
    """

    method_name = "online"

    teacher_shards_under_fsdp2 = True  # the teacher's update is plain backward passes

    @classmethod
    def _default_args_class(cls) -> type[OnlineDistillTrainingArguments]:
        return OnlineDistillTrainingArguments

    def teacher_step(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward | None
    ) -> TeacherTargets | None:
        """One teacher step on all micro-batches of the optimisation step, before the student's soft labels."""
        # The current micro-batch's student logits are at hand; the others' come from no-grad forwards.
        micro_batches = [batch] + [
            DistillationBatch.from_collated(self._prepare_inputs(b)) for b in batch.step_batches[1:]
        ]
        student_logits = [student.logits.detach()] + [None] * (len(micro_batches) - 1)
        self.update_teacher(model, micro_batches, student_logits)
        return None

    def update_teacher(
        self,
        model: nn.Module,
        micro_batches: list[DistillationBatch],
        student_logits: list[torch.Tensor | None],
    ) -> None:
        """One teacher step on the mean of `teacher_objective` over the micro-batches."""
        teacher = self.teacher_models[0]
        teacher.train()
        for batch, logits in zip(micro_batches, student_logits, strict=True):
            if logits is None:
                with torch.no_grad():
                    logits = model(**batch.features).logits
            loss = self.teacher_objective(batch, logits) / len(micro_batches)
            loss.backward()
        self.teacher_optimizer_step()

    def teacher_objective(self, batch: DistillationBatch, student_logits: torch.Tensor) -> torch.Tensor:
        """``α_t · KL(p_s ‖ p_t) + (1 − α_t) · CE(z_t, y)`` for one micro-batch (its graph reaches the teacher)."""
        alpha_t = self.args.teacher_alpha
        feed = batch.teacher_inputs(self._teacher_arg_names[0], with_labels=True)
        if alpha_t < 1.0 and feed.get("labels") is None:
            raise ValueError(
                "The teacher's task loss needs labels but the batch has none; add labels or set teacher_alpha=1.0."
            )
        outputs = self.teacher_models[0](**feed)
        regression = self._is_regression()
        if regression:
            teacher_logits = outputs.logits
        else:
            student_logits, teacher_logits = self.aligned_positions(
                student_logits.detach(), outputs.logits, batch.student
            )
        task_loss = outputs.loss if alpha_t < 1.0 else None
        loss = self.online_teacher_objective(teacher_logits, student_logits, task_loss, regression)
        self.nonfinite.watch("teacher's loss", loss, "teacher")
        return loss
