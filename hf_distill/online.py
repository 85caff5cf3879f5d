"""Online distillation (shared/ALGORITHMS.md §3): teacher and student learn together.

`OnlineDistillTrainer` is also the base of every trainer whose teacher learns (meta, LGTM): it owns the
teacher's optimizer and scheduler, their checkpoints and resume, the teacher's gradient sync across
processes, and the teacher's evaluation. Subclasses change only `teacher_objective`/`update_teacher`.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, SchedulerType, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .data import TEACHER_LOGITS, dataset_columns, split_batch
from .distillation import (
    DistillationTrainer,
    DistillationTrainingArguments,
    hf_api,
    upload_staged_folder,
)
from .model_card import TeacherInfo, build_teacher_card, final_eval_metrics
from .objectives import kl_divergence, logit_mse
from .teacher import (
    average_gradients_across_processes,
    broadcast_parameters,
    check_learning_teacher_supported,
    check_teacher_can_learn,
    count_parameters,
    create_teacher_optimizer,
    enable_activation_checkpointing,
    load_teacher_optimizer_state,
    load_teacher_weights,
    save_teacher_state,
    trainable_parameters,
)
from .validation import check_finite

# The folder, inside output_dir, from which `push_teacher_to_hub` uploads the teacher.
HUB_TEACHER_STAGING_DIR = "_hub_teacher"


@dataclass
class OnlineDistillTrainingArguments(DistillationTrainingArguments):
    """Distillation arguments plus the teacher's own optimisation."""

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
    teacher_alpha: float = field(
        default=0.4,
        metadata={
            "help": "α_t: weight of the teacher's KL to the student, KL(p_s ‖ p_t); its task loss gets 1 - α_t."
        },
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
        check_finite(
            "teacher_alpha",
            self.teacher_alpha,
            0,
            1,
            hint="It weights the teacher's KL to the student and 1 - teacher_alpha its task loss.",
        )
        try:
            self.teacher_lr_scheduler_type = SchedulerType(self.teacher_lr_scheduler_type).value
        except ValueError as err:
            choices = ", ".join(s.value for s in SchedulerType)
            raise ValueError(
                f"teacher_lr_scheduler_type={self.teacher_lr_scheduler_type!r} is unknown; choose one of {choices}."
            ) from err
        super().__post_init__()


class OnlineDistillTrainer(DistillationTrainer):
    """Teacher and student updated together, each optimisation step (shared/ALGORITHMS.md §3).

    1. the teacher steps on ``α_t · KL(p_s.detach() ‖ p_t) + (1 − α_t) · CE(z_t, y)`` over the step's
       micro-batches (so under gradient accumulation it steps at the same boundaries as the student);
    2. the student steps on its distillation loss against the *updated* teacher's soft labels.

    ``trainer.teacher_model`` is the live teacher; `save_teacher` writes it with its tokenizer. Checkpoints
    hold the teacher, its optimizer and scheduler, and ``train(resume_from_checkpoint=...)`` restores them.
    """

    method_name = "online"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.teacher_optimizer: torch.optim.Optimizer | None = None
        self.teacher_lr_scheduler: Any = None
        self._step_micro_batches: list[dict[str, Any]] | None = None
        self._resume_checkpoint: str | None = None
        super().__init__(*args, **kwargs)
        if TEACHER_LOGITS in dataset_columns(self.train_dataset):
            raise ValueError(
                f"The training data has a '{TEACHER_LOGITS}' column, but {type(self).__name__} updates the teacher, "
                "so cached logits would be stale after the first step. Remove the column, or use "
                "DistillationTrainer for a frozen teacher."
            )

    @classmethod
    def _default_args_class(cls) -> type[OnlineDistillTrainingArguments]:
        return OnlineDistillTrainingArguments

    def _prepare_teachers(self, teachers: list[nn.Module]) -> list[nn.Module]:
        if len(teachers) != 1:
            raise ValueError(
                f"{type(self).__name__} trains one teacher; got {len(teachers)}. Use DistillationTrainer for an "
                "ensemble of frozen teachers."
            )
        check_learning_teacher_supported(self.accelerator)
        teacher = teachers[0]
        check_teacher_can_learn(teacher)
        if self.args.teacher_activation_checkpointing:
            enable_activation_checkpointing(teacher, "teacher")
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
                    self._resume_checkpoint, self.teacher_optimizer, self.teacher_lr_scheduler
                )
        return scheduler

    # ----- one optimisation step ------------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        # The one place that sees all micro-batches of an optimisation step before the student's first
        # forward: keep them so that the teacher's update covers the same samples as the student's step.
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_micro_batches = batch_samples
        return batch_samples, num_items

    def before_teacher_targets(self, model: nn.Module, inputs: dict[str, Any], student_outputs: Any) -> None:
        """At the first micro-batch of each optimisation step, update the teacher on all of them."""
        micro_batches, self._step_micro_batches = self._step_micro_batches, None
        if micro_batches is None:
            return
        # The current micro-batch's student logits are at hand; the others' come from no-grad forwards.
        student_logits = [student_outputs.logits.detach()] + [None] * (len(micro_batches) - 1)
        prepared = [inputs] + [self._prepare_inputs(b) for b in micro_batches[1:]]
        self.update_teacher(model, prepared, student_logits)

    def update_teacher(
        self, model: nn.Module, micro_batches: list[dict[str, Any]], student_logits: list[torch.Tensor | None]
    ) -> None:
        """One teacher step on the mean of `teacher_objective` over the micro-batches."""
        teacher = self.teacher_models[0]
        teacher.train()
        for batch, logits in zip(micro_batches, student_logits, strict=True):
            if logits is None:
                with torch.no_grad():
                    student_inputs = {k: v for k, v in split_batch(batch)[0].items() if k != "labels"}
                    logits = model(**student_inputs).logits
            loss = self.teacher_objective(batch, logits) / len(micro_batches)
            loss.backward()
        self.teacher_optimizer_step()

    def teacher_objective(self, batch: dict[str, Any], student_logits: torch.Tensor) -> torch.Tensor:
        """``α_t · KL(p_s ‖ p_t) + (1 − α_t) · CE(z_t, y)`` for one micro-batch (its graph reaches the teacher)."""
        student_inputs, teacher_inputs, _, _ = split_batch(batch)
        teacher = self.teacher_models[0]
        accepted = self._teacher_arg_names[0] | {"labels"}
        source = teacher_inputs or student_inputs
        feed = {k: v for k, v in source.items() if k in accepted}
        alpha_t = self.args.teacher_alpha
        if "labels" not in feed and "labels" in student_inputs:
            feed["labels"] = student_inputs["labels"]  # the teacher learns the task on the same labels
        if alpha_t < 1.0 and feed.get("labels") is None:
            raise ValueError(
                "The teacher's task loss needs labels but the batch has none; add labels or set teacher_alpha=1.0."
            )
        outputs = teacher(**feed)
        if self._is_regression():
            kl = logit_mse(outputs.logits, student_logits.detach())
        else:
            s_flat, t_flat = self.aligned_positions(student_logits.detach(), outputs.logits, student_inputs)
            kl = kl_divergence(
                t_flat,
                s_flat,
                temperature=self.args.temperature,
                scale_by_temperature_squared=self.args.scale_by_temperature_squared,
            )
        loss = alpha_t * kl
        self._record("teacher_kl", kl.detach())
        if alpha_t < 1.0:
            loss = loss + (1.0 - alpha_t) * outputs.loss
            self._record("teacher_task_loss", outputs.loss.detach())
        return loss

    def teacher_optimizer_step(self) -> None:
        """Average the teacher's gradients over processes, clip, step, schedule, and clear them."""
        params = list(trainable_parameters(self.teacher_models[0]).values())
        average_gradients_across_processes(params)
        if self.args.teacher_max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.teacher_max_grad_norm)
            self._record("teacher_grad_norm", norm.detach())
        self._record(
            "teacher_learning_rate",
            torch.tensor(self.teacher_lr_scheduler.get_last_lr()[0], dtype=torch.float32),
        )
        self.teacher_optimizer.step()
        self.teacher_lr_scheduler.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)

    # ----- checkpoints and resume -------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # No public hook runs before Trainer rotates old checkpoints away: the teacher must be in the new
        # checkpoint by then, or a crash could leave no checkpoint with a teacher.
        if self.args.should_save and self.teacher_optimizer is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            save_teacher_state(
                folder, self.teacher_models[0], self.teacher_optimizer, self.teacher_lr_scheduler
            )
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, also restoring the teacher, its optimizer and its scheduler when resuming."""
        if resume_from_checkpoint is True or (
            isinstance(resume_from_checkpoint, str) and resume_from_checkpoint
        ):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(
                        f"No checkpoint found in output_dir {self.args.output_dir} to resume from."
                    )
            load_teacher_weights(
                resume_from_checkpoint,
                self.teacher_models[0],
                allow_partial=self.args.allow_partial_teacher_checkpoint,
            )
            self._resume_checkpoint = str(resume_from_checkpoint)
        self.teacher_optimizer, self.teacher_lr_scheduler = None, None  # rebuilt for this run's length
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resume_checkpoint = None

    # ----- the teacher's evaluation and saving ----------------------------------------------------------------

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

    @torch.no_grad()
    def evaluate_teacher(
        self, eval_dataset: Any = None, metric_key_prefix: str = "eval_teacher"
    ) -> dict[str, float]:
        """Loss and ``compute_metrics`` of the live teacher on the evaluation set."""
        teacher = self.teacher_models[0]
        was_training = teacher.training
        teacher.eval()
        losses, all_logits, all_labels = [], [], []
        accepted = self._teacher_arg_names[0] | {"labels"}
        for batch in self.get_eval_dataloader(eval_dataset):
            batch = self._prepare_inputs(batch)
            student_inputs, teacher_inputs, _, _ = split_batch(batch)
            feed = {k: v for k, v in (teacher_inputs or student_inputs).items() if k in accepted}
            labels = student_inputs.get("labels")
            if labels is not None:
                feed["labels"] = labels
            outputs = teacher(**feed)
            if outputs.loss is not None:
                losses.append(
                    self.accelerator.gather_for_metrics(outputs.loss.detach().repeat(len(outputs.logits)))
                )
            all_logits.append(self.accelerator.gather_for_metrics(outputs.logits.float()).cpu())
            if labels is not None:
                all_labels.append(self.accelerator.gather_for_metrics(labels).cpu())
        teacher.train(was_training)
        metrics: dict[str, float] = {}
        if losses:
            metrics[f"{metric_key_prefix}_loss"] = torch.cat(losses).mean().item()
        if self.compute_metrics is not None and all_labels and all_logits[0].dim() == 2:
            prediction = EvalPrediction(
                predictions=torch.cat(all_logits).numpy(), label_ids=np.asarray(torch.cat(all_labels))
            )
            for key, value in self.compute_metrics(prediction).items():
                metrics[f"{metric_key_prefix}_{key}"] = value
        return metrics

    def save_teacher(self, output_dir: str | os.PathLike) -> None:
        """Write the live teacher (``save_pretrained``, safetensors) with its tokenizer to ``output_dir``."""
        if not self.args.should_save:
            return
        unwrap_model_keep_peft(self.teacher_models[0]).save_pretrained(output_dir, safe_serialization=True)
        tokenizer = self.teacher_processing_class or self.processing_class
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)

    def push_teacher_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = "Upload the trained teacher",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        blocking: bool = True,
    ) -> Any:
        """Upload the live teacher to the Hub repository ``repo_id`` (created if needed), with a model card.

        The folder is what `save_teacher` writes (weights as safetensors, config, the teacher's tokenizer)
        plus ``README.md``, which says the teacher was trained by this method for the student (``hub_model_id``,
        or ``output_dir``'s name). Only the world process zero uploads; returns `HfApi.upload_folder`'s result.
        """
        if not self.is_world_process_zero():
            return None
        token = token if token is not None else self.args.hub_token
        staging = os.path.join(self.args.output_dir, HUB_TEACHER_STAGING_DIR)
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        self.save_teacher(staging)
        teacher = unwrap_model_keep_peft(self.teacher_models[0])
        identity, initial_revision = self._teacher_sources[0]
        card = build_teacher_card(
            method=self.method_name,
            model_name=repo_id.split("/")[-1],
            teacher=TeacherInfo(identity, initial_revision, count_parameters(teacher)),
            student=self.hub_model_id or self.args.hub_model_id or self._hub_model_name(),
            hyperparameters=self._card_hyperparameters(),
            teacher_metrics=final_eval_metrics(self.state.log_history)[1],
            library_name="peft" if hasattr(teacher, "peft_config") else "transformers",
        )
        card.save(os.path.join(staging, "README.md"))
        private = private if private is not None else self.args.hub_private_repo
        repo_id = hf_api().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        return upload_staged_folder(
            staging,
            blocking,
            repo_id=repo_id,
            commit_message=commit_message,
            token=token,
            revision=revision,
        )


def unwrap_model_keep_peft(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed wrappers but keep a PEFT model (its save_pretrained writes the adapter)."""
    while (
        hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config")
    ):
        model = model.module
    return model
