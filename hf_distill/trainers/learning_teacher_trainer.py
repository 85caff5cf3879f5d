"""`LearningTeacherTrainer`: the base of every trainer whose teacher learns (online, meta, LGTM).

It owns what a learning teacher needs whatever its objective: the teacher's optimizer and schedule, their
checkpoints and resume, the teacher's gradient sync across processes, its evaluation and its publishing.
Each method implements one hook, `teacher_step`, which the base calls once per optimisation step
(https://hf-distill.readthedocs.io/algorithms/, "A teacher that learns").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, get_scheduler
from transformers.trainer_pt_utils import EvalLoopContainer, find_batch_size
from transformers.trainer_utils import denumpify_detensorize

from ..data.batch import TEACHER_LOGITS, DistillationBatch, dataset_columns
from ..distributed import (
    all_reduce_mean,
    average_gradients_across_processes,
    broadcast_parameters,
    is_sharded,
    unwrap_model,
    whole,
)
from ..losses.objectives import online_teacher_loss
from ..publishing.hub import TeacherPublishingMixin
from ..safety.collapse import warn_if_collapsed
from ..safety.resume_changes import resume_with_changed_arguments
from ..teacher.checkpoint import (
    TEACHER_CHECKPOINT_DIR,
    TEACHER_OPTIMIZER_NAME,
    TEACHER_SCHEDULER_NAME,
    gather_teacher_state,
    load_teacher_optimizer_state,
    load_teacher_weights,
    save_teacher_state,
)
from ..teacher.loading import is_fsdp2, shard_teacher
from ..teacher.optimizer import (
    check_learning_teacher_supported,
    check_teacher_can_learn,
    create_teacher_optimizer,
    enable_activation_checkpointing,
    trainable_parameters,
)
from .distillation_trainer import DistillationTrainer, StudentForward, TeacherTargets
from .learning_teacher_config import LearningTeacherTrainingArguments


class LearningTeacherTrainer(TeacherPublishingMixin, DistillationTrainer):
    """A `DistillationTrainer` whose one teacher learns too; subclasses implement `teacher_step`.

    ``trainer.teacher_model`` is the live teacher; `save_teacher` writes it with its tokenizer. Checkpoints
    hold the teacher, its optimizer and scheduler, and ``train(resume_from_checkpoint=...)`` restores them.
    The teacher you pass is trained in place: pass a copy (``copy.deepcopy(teacher)``) to keep the original.
    """

    #: Whether `teacher_step` runs before the student's forward of the step (with ``student=None``) rather
    #: than between that forward and the student's soft labels.
    teacher_steps_before_student_forward: bool = False
    #: Whether the method's teacher update runs under FSDP2 with the teacher sharded: true where it is plain
    #: backward passes; a method that differentiates through the student's weights cannot (see
    #: `check_learning_teacher_supported`).
    teacher_shards_under_fsdp2: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.teacher_optimizer: torch.optim.Optimizer | None = None
        self.teacher_lr_scheduler: Any = None
        self._step_batches: list[dict[str, Any]] = []
        self._resume_checkpoint: str | None = None
        super().__init__(*args, **kwargs)
        if TEACHER_LOGITS in dataset_columns(self.train_dataset):
            raise ValueError(
                f"The training data has a '{TEACHER_LOGITS}' column, but {type(self).__name__} updates the teacher, "
                "so cached logits would be stale after the first step. Remove the column, or use "
                "DistillationTrainer for a frozen teacher."
            )

    @classmethod
    def _default_args_class(cls) -> type[LearningTeacherTrainingArguments]:
        return LearningTeacherTrainingArguments

    def _prepare_teachers(self, teachers: list[nn.Module]) -> list[nn.Module]:
        if len(teachers) != 1:
            raise ValueError(
                f"{type(self).__name__} trains one teacher; got {len(teachers)}. Use DistillationTrainer for an "
                "ensemble of frozen teachers."
            )
        check_learning_teacher_supported(
            self.accelerator, type(self).__name__, self.teacher_shards_under_fsdp2
        )
        teacher = teachers[0]
        check_teacher_can_learn(teacher)
        if self.args.teacher_activation_checkpointing:
            enable_activation_checkpointing(teacher, "teacher")
        if is_fsdp2(self.accelerator):  # sharded like the student; FSDP2 reduces its gradients in backward
            if self.args.save_on_each_node:
                raise ValueError(
                    "save_on_each_node=True with a teacher FSDP2 shards: the teacher is gathered whole on the "
                    "main process only, so the other nodes would write an empty teacher into their checkpoints. "
                    "Set save_on_each_node=False and save to a file system every node reads."
                )
            return [shard_teacher(teacher, self.accelerator)]
        # Placed on the device without a DDP wrapper: its gradients are averaged explicitly.
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        broadcast_parameters(teacher)
        return [teacher]

    # ----- the teacher's optimizer, created with the student's, same schedule length -------------------------

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        # Trainer creates the student's scheduler once the run length is known: build the teacher's here too.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.teacher_optimizer is None:
            args = self.args
            teacher = self.teacher_models[0]
            self.teacher_optimizer = create_teacher_optimizer(
                teacher,
                args.teacher_learning_rate,
                args.teacher_weight_decay,
                self.get_decay_parameter_names(teacher),
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                fp32_master_weights=args.teacher_fp32_master_weights,
            )
            self.teacher_lr_scheduler = get_scheduler(
                args.teacher_lr_scheduler_type,
                self.teacher_optimizer,
                num_warmup_steps=math.ceil(args.teacher_warmup_ratio * num_training_steps),
                num_training_steps=num_training_steps,
            )
            if self._resume_checkpoint is not None:
                load_teacher_optimizer_state(
                    self._resume_checkpoint, self.teacher_optimizer, self.teacher_lr_scheduler, teacher
                )
                resume_with_changed_arguments(
                    self._resume_checkpoint,
                    self.args.to_dict(),
                    self.teacher_optimizer,
                    self.teacher_lr_scheduler,
                    self.decay_parameters(teacher),
                    role="teacher",
                )
        return scheduler

    # ----- one optimisation step ------------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        # The one place that sees all micro-batches of an optimisation step before the student's first
        # forward: the teacher's update covers the same samples as the student's step.
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batch_samples
        return batch_samples, num_items

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`, with the teacher's step once per optimisation step (at its first micro-batch)."""
        starts_step = bool(self._step_batches) and inputs is self._step_batches[0]
        batch = DistillationBatch.from_collated(
            self._prepare_inputs(inputs), self._step_batches if starts_step else None
        )
        if batch.starts_step and self.teacher_steps_before_student_forward:
            model.train()
            with self.compute_loss_context_manager():
                self.teacher_step(model, batch, None)
        loss = super().training_step(model, batch, num_items_in_batch)
        for work in batch.after_backward:
            work()
        return loss

    def teacher_targets(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward
    ) -> TeacherTargets:
        if batch.starts_step and not self.teacher_steps_before_student_forward:
            targets = self.teacher_step(model, batch, student)
            if targets is not None:
                return targets
        return super().teacher_targets(model, batch, student)

    def teacher_step(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward | None
    ) -> TeacherTargets | None:
        """The teacher's update for this optimisation step: the one hook each method implements.

        Called once per optimisation step, with its first micro-batch (``batch.step_batches`` holds them all):
        between the student's forward (``student``) and its soft labels, or before that forward (``student``
        is ``None``) when `teacher_steps_before_student_forward`. May return the soft labels of the student's
        step (otherwise the updated teacher's forward gives them), and may leave work for after the student's
        backward in ``batch.after_backward``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement teacher_step.")

    def teacher_optimizer_step(self) -> None:
        """Average the teacher's gradients over processes, clip, step, schedule, and clear them."""
        teacher = self.teacher_models[0]
        params = list(trainable_parameters(teacher).values())
        if not is_sharded(teacher):  # FSDP2 reduce-scattered a sharded teacher's gradients in its backward
            average_gradients_across_processes(params)
        if self.args.teacher_max_grad_norm > 0:
            norm = whole(torch.nn.utils.clip_grad_norm_(params, self.args.teacher_max_grad_norm))
            self._record("teacher_grad_norm", norm.detach())
        else:
            norm = whole(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        self.nonfinite.watch("teacher's gradient", norm, "teacher")
        if self.nonfinite.should_skip(self.state.global_step + 1, reduce=lambda t: all_reduce_mean([t])[0]):
            self.teacher_optimizer.zero_grad(set_to_none=True)
            self.teacher_lr_scheduler.step()  # the schedule runs over the student's steps, skipped or not
            return
        self._record(
            "teacher_learning_rate",
            torch.tensor(self.teacher_lr_scheduler.get_last_lr()[0], dtype=torch.float32),
        )
        undo = self._teacher_update_undo(params) if self.nonfinite.policy == "skip" else None
        self.teacher_optimizer.step()
        self.nonfinite.mark_updated("teacher", undo)
        self.teacher_lr_scheduler.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)

    def _teacher_update_undo(self, params: list[nn.Parameter]) -> Callable[[], None]:
        """How to take back the teacher's coming update, should a later value of the step be non-finite: a
        copy of its trainable weights and optimizer state (kept only under ``nonfinite="skip"``)."""
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(self.teacher_optimizer.state_dict())

        def undo() -> None:
            with torch.no_grad():
                for param, saved in zip(params, weights, strict=True):
                    param.copy_(saved)
            self.teacher_optimizer.load_state_dict(state)

        return undo

    def online_teacher_objective(
        self,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        task_loss: torch.Tensor | None,
        regression: bool = False,
    ) -> torch.Tensor:
        """``α_t · KL(p_s ‖ p_t) + (1 − α_t) · task_loss`` (`online_teacher_loss` with this run's settings), its
        parts recorded as ``teacher_kl`` and ``teacher_task_loss``; ``task_loss=None`` leaves the task out."""
        args = self.args
        loss, divergence = online_teacher_loss(
            teacher_logits,
            student_logits,
            args.teacher_alpha,
            args.temperature,
            args.scale_by_temperature_squared,
            task_loss=task_loss,
            regression=regression,
        )
        self._record("teacher_kl", divergence.detach())
        if task_loss is not None:
            self._record("teacher_task_loss", task_loss.detach())
        return loss

    # ----- checkpoints and resume -------------------------------------------------------------------------------

    def gather_checkpoint_state(self) -> dict[str, Any]:
        """The teacher's weights, optimizer and schedule, whole (gathered from the ranks when FSDP2 shards it)."""
        gathered = super().gather_checkpoint_state()
        teacher = self.teacher_models[0]
        if self.teacher_optimizer is not None and (self.args.should_save or is_sharded(teacher)):
            gathered["teacher"] = gather_teacher_state(
                teacher, self.teacher_optimizer, self.teacher_lr_scheduler
            )
        return gathered

    def save_checkpoint_state(self, folder: str, gathered: dict[str, Any]) -> None:
        """The representation heads, and the teacher's weights, optimizer and schedule (``teacher/``)."""
        super().save_checkpoint_state(folder, gathered)
        if "teacher" in gathered:
            save_teacher_state(folder, gathered["teacher"])

    def restore_checkpoint_state(self, folder: str) -> None:
        """The teacher's weights now; its optimizer and schedule once they are built for this run."""
        super().restore_checkpoint_state(folder)
        allow_partial = self.args.allow_partial_teacher_checkpoint or self.args.allow_partial_checkpoint
        load_teacher_weights(folder, self.teacher_models[0], allow_partial=allow_partial)
        self._resume_checkpoint = folder

    def optional_checkpoint_files(self) -> tuple[str, ...]:
        if not self.args.allow_partial_teacher_checkpoint:
            return ()
        return (
            f"{TEACHER_CHECKPOINT_DIR}/{TEACHER_OPTIMIZER_NAME}",
            f"{TEACHER_CHECKPOINT_DIR}/{TEACHER_SCHEDULER_NAME}",
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, also restoring the teacher, its optimizer and its scheduler when resuming."""
        self.teacher_optimizer, self.teacher_lr_scheduler = None, None  # rebuilt for this run's length
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resume_checkpoint = None
            self._step_batches = []

    # ----- the teacher's evaluation ---------------------------------------------------------------------------

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The student's metrics, plus the teacher's as ``<prefix>_teacher_<metric>`` with `evaluate_teacher`."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.args.evaluate_teacher and not isinstance(eval_dataset or self.eval_dataset, dict):
            teacher_metrics = self.evaluate_teacher(
                eval_dataset, metric_key_prefix=f"{metric_key_prefix}_teacher"
            )
            self.log(teacher_metrics)
            metrics.update(teacher_metrics)
        return metrics

    def evaluate_teacher(
        self, eval_dataset: Any = None, metric_key_prefix: str = "eval_teacher"
    ) -> dict[str, float]:
        """Loss and ``compute_metrics`` of the live teacher on the evaluation set.

        The teacher reads its own inputs (the ``teacher_`` columns when the data has them) and the student's
        labels; its mode is restored afterwards.
        """
        teacher = self.teacher_models[0]
        was_training = teacher.training
        teacher.eval()
        try:
            losses, predictions, label_ids = self._teacher_predictions(self.get_eval_dataloader(eval_dataset))
        finally:
            teacher.train(was_training)
        metrics = {}
        if self.compute_metrics is not None and predictions is not None and label_ids is not None:
            # batch_eval_metrics: the whole set is one batch, and the last.
            extra = {"compute_result": True} if self.args.batch_eval_metrics else {}
            with_losses = losses if "loss" in self.args.include_for_metrics else None
            evaluated = EvalPrediction(predictions=predictions, label_ids=label_ids, losses=with_losses)
            metrics = self.compute_metrics(evaluated, **extra)
        only = warn_if_collapsed(predictions, label_ids, f"The teacher ({self.method_name})")
        metrics = denumpify_detensorize(metrics)
        if only is not None:
            metrics["collapsed_to_class"] = only
        if isinstance(losses, np.ndarray):  # Trainer's evaluation loss: the mean of the finite ones if asked
            finite = np.isfinite(losses)
            if self.args.logging_nan_inf_filter and finite.any():
                losses = losses[finite]
            metrics["loss"] = losses.mean().item()
        return {
            key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}": value
            for key, value in metrics.items()
        }

    def _teacher_predictions(self, dataloader: Any) -> tuple[Any, Any, Any]:
        """The teacher's per-sample losses, logits and labels over ``dataloader``, gathered from all
        processes: `Trainer.prediction_step` with the teacher as the model."""
        teacher = self.teacher_models[0]
        loss_only = self.compute_metrics is None or self.args.prediction_loss_only
        config = getattr(unwrap_model(teacher), "config", None)
        ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config is not None else []
        containers = [
            EvalLoopContainer(self.args.eval_do_concat_batches, padding_index=-100) for _ in range(3)
        ]
        for inputs in dataloader:
            feed = DistillationBatch.from_collated(inputs).teacher_inputs(
                self._teacher_arg_names[0], with_labels=True
            )
            loss, logits, labels = self.prediction_step(teacher, feed, loss_only, ignore_keys=ignore_keys)
            if loss is not None:
                containers[0].add(self.gather_function(loss.repeat(find_batch_size(feed))))
            if labels is not None:
                labels = self.accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            if logits is not None:
                logits = self.accelerator.pad_across_processes(logits, dim=1, pad_index=-100)
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                containers[1].add(self.gather_function(logits))
            if labels is not None:
                containers[2].add(self.gather_function(labels))
        losses, predictions, label_ids = (container.get_arrays() for container in containers)
        if isinstance(losses, list) and losses:
            losses = np.concatenate(losses)
        return losses, predictions, label_ids
