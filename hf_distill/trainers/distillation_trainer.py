"""`DistillationTrainer`: classic teacher→student distillation (https://hf-distill.readthedocs.io/algorithms/, "Classic distillation").

The student's step: one student forward, the teacher's soft labels (its forward, or cached logits), and
``alpha · distillation + (1 − alpha) · task loss`` plus the representation terms. Trainers whose teacher
learns (`LearningTeacherTrainer`) extend `teacher_targets`; saving and publishing live in `publishing`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer

from ..data.batch import ROW_ID, TEACHER_LOGITS, TEACHER_PREFIX, DistillationBatch, dataset_columns
from ..data.collators import DistillationDataCollator, default_student_collator
from ..data.dataset_checks import is_regression
from ..distributed import all_reduce_mean
from ..losses.chunked import ChunkedTokenLoss
from ..losses.objectives import DistillationObjective, aligned_logits, ensemble_teacher_logits, logit_mse
from ..losses.representation import RepresentationHeads
from ..losses.representation_term import RepresentationTerm, TeacherFeatures, load_heads, save_heads
from ..publishing.hub import StudentPublishingMixin, teacher_source
from ..safety.collapse import warn_if_collapsed
from ..safety.nonfinite import NonFiniteCallback, NonFiniteMonitor, check_finite_weights
from ..teacher.loading import (
    CAUSAL_LM,
    TOKEN_LEVEL_TASKS,
    check_teacher_student_compatible,
    forward_arg_names,
    load_teacher,
    prepare_frozen_teacher,
    task_type,
)
from .checkpointing import VerifiedCheckpointsMixin
from .data_checks import TrainingDataChecksMixin
from .distillation_config import DistillationTrainingArguments
from .topk_targets import (
    TEACHER_TOPK_COLUMNS,
    TopKTeacherTargets,
    topk_distillation_term,
)


@dataclass
class StudentForward:
    """The student's forward of a training micro-batch: its outputs (with their graph), its task loss
    (``None`` when the batch has no labels and alpha is 1) and the ``num_items_in_batch`` it used."""

    outputs: Any
    task_loss: torch.Tensor | None
    task_items: torch.Tensor | int | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs.logits


@dataclass
class TeacherTargets:
    """What the student learns from in one micro-batch: the teacher's (combined) logits, and the
    representation features of its forward when representation terms are on."""

    logits: torch.Tensor
    features: TeacherFeatures | None = None


class DistillationTrainer(VerifiedCheckpointsMixin, TrainingDataChecksMixin, StudentPublishingMixin, Trainer):
    """`Trainer` that distils a frozen teacher (or several) into ``model``.

    ``DistillationTrainer(model=student, teacher_model=teacher, args=DistillationTrainingArguments(...), ...)``;
    every other `Trainer` argument keeps its meaning. ``teacher_model`` is a module, a local path, a Hub id,
    or a list of them (an ensemble). ``teacher_processing_class`` is the teacher's own tokenizer, used to pad
    ``teacher_`` input columns when the teacher reads the text differently from the student.

    The teacher you pass is frozen in place (``requires_grad=False``, eval mode): pass a copy
    (``copy.deepcopy(teacher)``) to train the same object later, e.g. in a trainer whose teacher learns.
    """

    method_name = "kd"
    _tag_names = ["hf-distill", "knowledge-distillation"]

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | Sequence[nn.Module | str] | None = None,
        args: DistillationTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher_model is None:
            raise ValueError(
                f"{type(self).__name__} needs teacher_model= (a model, a path, a Hub id or a list of them); "
                "for fine-tuning without a teacher use transformers.Trainer."
            )
        if args is None:
            args = self._default_args_class()(output_dir="tmp_trainer")
        if not isinstance(args, self._default_args_class()):
            raise TypeError(
                f"{type(self).__name__} needs args of type {self._default_args_class().__name__} (it carries the "
                f"distillation settings), got {type(args).__name__}. Build it with the same fields."
            )
        if not isinstance(data_collator, DistillationDataCollator):
            data_collator = DistillationDataCollator(
                data_collator or default_student_collator(processing_class), teacher_processing_class
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher_processing_class = teacher_processing_class
        self._load_teachers(teacher_model)
        self._student_task = task_type(self.model)
        self._token_level = self._student_task in TOKEN_LEVEL_TASKS
        # Causal LM logits at position t predict token t + 1 (Trainer's own flag misses models whose
        # loss_type is only set at the first forward).
        self._shift_labels = self._student_task == CAUSAL_LM or bool(
            getattr(self, "_loss_shifts_labels", False)
        )
        # Sequence-level losses are per-micro-batch means, so Trainer divides them by the accumulation
        # steps; token-level ones follow Trainer's own num_items_in_batch normalisation.
        self.loss_is_scaled_for_ga = None if self._token_level else False
        self._logged_components: dict[str, list[torch.Tensor]] = defaultdict(list)
        if args.nonfinite == "skip" and self.is_deepspeed_enabled:
            raise ValueError(
                "nonfinite='skip' cannot skip a step under DeepSpeed, whose engine applies the update inside the "
                "backward pass; use nonfinite='error' (the default), which stops at the first non-finite value."
            )
        self.nonfinite = NonFiniteMonitor(args.nonfinite, args.max_consecutive_nonfinite_skips)
        self.nonfinite.models = {"student": [self.model], "teacher": self.teacher_models}
        self.add_callback(NonFiniteCallback(self.nonfinite, reduce=lambda t: all_reduce_mean([t])[0]))
        self._skipped_at_last_log = 0
        self._check_teacher_inputs(self.train_dataset)
        self._check_labels(self.train_dataset)
        self._check_a_batch_fits(self.train_dataset)
        self.representation: RepresentationTerm | None = self._build_representation_term()
        custom_targets = type(self).teacher_targets is not DistillationTrainer.teacher_targets
        self.chunked_loss = ChunkedTokenLoss.for_trainer(self, custom_targets)  # None without loss_chunk_size
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names + [self.method_name])

    def _load_teachers(self, teacher_model: Any) -> None:
        args = self.args
        teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
            raise ValueError(
                f"teacher_weights has {len(args.teacher_weights)} entries for {len(teachers)} teachers; give one "
                "weight per teacher."
            )
        self._teacher_sources = [teacher_source(t, args.teacher_model_init_kwargs) for t in teachers]
        teachers = [
            load_teacher(t, self.model, args.teacher_model_init_kwargs, args.allow_untrained_teacher_head)
            for t in teachers
        ]
        check_finite_weights(self.model, "student", "build the trainer")
        for position, teacher in enumerate(teachers):
            check_teacher_student_compatible(teacher, self.model, position)
            check_finite_weights(teacher, "teacher", "build the trainer")
        self.teacher_models: list[nn.Module] = self._prepare_teachers(teachers)
        self._teacher_arg_names = [forward_arg_names(t) - {"labels"} for t in self.teacher_models]

    # ----- set-up -------------------------------------------------------------------------------------------

    @classmethod
    def _default_args_class(cls) -> type[DistillationTrainingArguments]:
        return DistillationTrainingArguments

    def _prepare_teachers(self, teachers: list[nn.Module]) -> list[nn.Module]:
        """Frozen teachers, placed for this run; trainers whose teacher learns override this."""
        return [prepare_frozen_teacher(t, self.accelerator) for t in teachers]

    @property
    def teacher_model(self) -> nn.Module | list[nn.Module]:
        """The teacher (or the list of teachers of an ensemble)."""
        return self.teacher_models[0] if len(self.teacher_models) == 1 else self.teacher_models

    def _set_signature_columns_if_needed(self) -> None:
        # The one place Trainer decides which dataset columns survive `remove_unused_columns`; the teacher's
        # inputs, cached logits and row ids must survive too.
        super()._set_signature_columns_if_needed()
        extra = [TEACHER_LOGITS, *TEACHER_TOPK_COLUMNS, ROW_ID]
        for names in getattr(self, "_teacher_arg_names", []):
            extra += [TEACHER_PREFIX + n for n in names]
        self._signature_columns = list(dict.fromkeys(self._signature_columns + extra))

    # ----- representation distillation (hidden states, attention maps, CRD) -----------------------------------

    def _build_representation_term(self) -> RepresentationTerm | None:
        """Check the data and models against the representation arguments and build the heads, before any
        training (``None`` without representation terms)."""
        if not self.args.uses_representations:
            return None
        if len(self.teacher_models) != 1:
            raise ValueError(
                f"Representation distillation (hidden_distill_weight, attention_distill_weight, crd_weight) reads "
                f"one teacher's hidden states; got an ensemble of {len(self.teacher_models)} teachers. Use one "
                "teacher, or set those weights to 0 for an ensemble."
            )
        columns = dataset_columns(self.train_dataset)
        if TEACHER_LOGITS in columns:
            raise ValueError(
                f"The training data has a cached '{TEACHER_LOGITS}' column, which holds no hidden states, and "
                "representation distillation needs the teacher's forward. Remove the column, or set "
                "hidden_distill_weight, attention_distill_weight and crd_weight to 0."
            )
        own_inputs = any(c.startswith(TEACHER_PREFIX) for c in columns) or bool(
            self._teachers_need_own_inputs()
        )
        return RepresentationTerm.build(self.args, self.model, self.teacher_models[0], own_inputs)

    @property
    def representation_heads(self) -> RepresentationHeads | None:
        """The learned heads of the representation terms (``None`` without them)."""
        return None if self.representation is None else self.representation.heads

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, plus a parameter group for the representation heads (trained with the
        student, at its learning rate, without weight decay); their gradients are clipped on their own (to
        ``max_grad_norm``) and averaged over processes before each step."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.representation is not None:
            self.representation.add_to_optimizer(optimizer, self.args.learning_rate, self.args.max_grad_norm)
        return optimizer

    def save_checkpoint_state(self, folder: str, gathered: dict[str, Any]) -> None:
        """The run's arguments and the representation heads; trainers whose teacher learns add its state."""
        super().save_checkpoint_state(folder, gathered)
        if self.representation is not None and self.representation.has_state:
            save_heads(folder, self.representation.heads)

    def restore_checkpoint_state(self, folder: str) -> None:
        """The representation heads, before `Trainer.train` resumes from ``folder``."""
        super().restore_checkpoint_state(folder)
        if self.representation is not None and self.representation.has_state:
            load_heads(folder, self.representation.heads)

    # ----- the loss -----------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs: Any) -> Any:
        if isinstance(inputs, DistillationBatch):  # prepared and split by training_step already
            return inputs
        return super()._prepare_inputs(inputs)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step` on the micro-batch split once into a `DistillationBatch`."""
        batch = DistillationBatch.from_collated(self._prepare_inputs(inputs))
        return super().training_step(model, batch, num_items_in_batch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any] | DistillationBatch,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``alpha · distillation + (1 − alpha) · task loss`` in training; the student's task loss in evaluation."""
        batch = DistillationBatch.from_collated(inputs)
        task_items = num_items_in_batch if self._token_level else None
        if not model.training:
            return super().compute_loss(
                model, batch.student, return_outputs=return_outputs, num_items_in_batch=task_items
            )
        if self.chunked_loss is not None:  # from hidden states, a chunk of positions at a time
            loss, parts = self.chunked_loss(model, batch, task_items)
            for name, value in parts.items():
                self._record(name, value)
            self.nonfinite.watch("student's loss", loss, "student")
            return (loss, None) if return_outputs else loss
        student = self._student_forward(model, batch.student, task_items)
        targets = self.teacher_targets(model, batch, student)
        distill, distill_for_log = self.distillation_term(
            student.logits, targets.logits, batch.student, task_items
        )
        task_loss = student.task_loss
        loss = self.student_loss(distill, task_loss)
        self.nonfinite.watch("teacher's logits", targets.logits, "teacher")
        self.nonfinite.watch("distillation term", distill, "student")
        self._record("distill_loss", distill_for_log)
        if task_loss is not None:
            self._record("task_loss", self._task_loss_for_log(task_loss, batch.student, task_items))
        if self.representation is not None:
            representation, parts = self.representation.loss(student.outputs, batch.student, targets.features)
            if task_items is not None and self.model_accepts_loss_kwargs:
                # Trainer does not divide a num_items-normalised loss by the accumulation steps: a
                # per-micro-batch mean must be divided here.
                representation = representation / self.current_gradient_accumulation_steps
            loss = loss + representation
            for name, value in parts.items():
                self._record(name, value)
        self.nonfinite.watch("student's loss", loss, "student")
        return (loss, student.outputs) if return_outputs else loss

    def student_loss(self, distill: torch.Tensor, task_loss: torch.Tensor | None) -> torch.Tensor:
        """The student's training loss ``alpha · distill + (1 − alpha) · task_loss``; the distillation term
        alone when there is no task loss (a batch without labels, with alpha 1)."""
        if task_loss is None:
            return distill
        return self.args.alpha * distill + (1.0 - self.args.alpha) * task_loss

    def _student_forward(
        self, model: nn.Module, student_inputs: dict[str, Any], task_items: torch.Tensor | int | None
    ) -> StudentForward:
        """The student's outputs and task loss (``None`` when the batch has no labels and alpha is 1)."""
        has_labels = any(student_inputs.get(n) is not None for n in self.label_names)
        feed = student_inputs
        if self.representation is not None:
            feed = {**student_inputs, **self.representation.forward_kwargs()}
        if has_labels:
            task_loss, outputs = super().compute_loss(
                model, feed, return_outputs=True, num_items_in_batch=task_items
            )
            return StudentForward(outputs, task_loss, task_items)
        if self.args.alpha < 1.0:
            raise ValueError(
                f"The training batch has no labels (expected {self.label_names}) but alpha={self.args.alpha} needs "
                "the task loss. Add labels to the data (or a collator that makes them), or set alpha=1.0."
            )
        return StudentForward(model(**feed), None, task_items)

    def teacher_targets(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward
    ) -> TeacherTargets:
        """The soft labels of the student's step: the cached teacher logits, or the teachers' forward.

        Called between the student's forward and its loss; trainers whose teacher learns step it here first.
        """
        if batch.cached_teacher_topk is not None:  # a top-k cache, read by distillation_term's sparse loss
            return TeacherTargets(batch.cached_teacher_topk)
        if batch.cached_teacher_logits is None:
            return self.computed_teacher_targets(batch)
        if self.representation is not None:
            raise ValueError(
                f"The batch carries cached '{TEACHER_LOGITS}', which hold no hidden states; representation "
                "distillation needs the teacher's forward. Remove the column or the representation weights."
            )
        return TeacherTargets(self._combine_teachers(self._split_cached(batch.cached_teacher_logits)))

    @torch.no_grad()
    def computed_teacher_targets(self, batch: DistillationBatch) -> TeacherTargets:
        """The teachers' (combined) logits for a batch from their forward in eval mode without a graph, and
        the representation features of the first."""
        self._check_batch_has_teacher_inputs(batch)
        outputs = [self._run_teacher(i, batch) for i in range(len(self.teacher_models))]
        return TeacherTargets(self._combine_teachers([logits for logits, _ in outputs]), outputs[0][1])

    def teacher_logits(self, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> torch.Tensor:
        """The teachers' (combined) logits for a batch; ``teacher_inputs`` win over the student's inputs."""
        return self.computed_teacher_targets(DistillationBatch(student_inputs, teacher_inputs)).logits

    def _check_batch_has_teacher_inputs(self, batch: DistillationBatch) -> None:
        """Refuse a batch the teacher would misread: no teacher_ columns, and a vocabulary of its own."""
        if not batch.teacher and self._teachers_need_own_inputs():
            raise ValueError(
                "The batch has no teacher_ input columns but the teacher's vocabulary differs from the "
                "student's; add them with hf_distill.add_teacher_inputs."
            )

    def _run_teacher(
        self, position: int, batch: DistillationBatch
    ) -> tuple[torch.Tensor, TeacherFeatures | None]:
        teacher = self.teacher_models[position]
        if teacher.training:  # a callback or user code may have flipped it; a frozen teacher never drops out
            teacher.eval()
        feed = batch.teacher_inputs(self._teacher_arg_names[position])
        if position != 0 or self.representation is None:
            return teacher(**feed).logits, None
        outputs = teacher(**feed, **self.representation.forward_kwargs())
        mask = (batch.teacher or batch.student).get("attention_mask")
        # Only the mapped layers' features are kept: the other hidden states go with ``outputs``.
        return outputs.logits, self.representation.teacher_features(outputs, mask)

    def _split_cached(self, cached: torch.Tensor) -> list[torch.Tensor]:
        if len(self.teacher_models) == 1:
            return [cached]
        if cached.dim() < 3 or cached.shape[1] != len(self.teacher_models):
            raise ValueError(
                f"Cached teacher_logits of shape {tuple(cached.shape)} do not hold one entry per teacher "
                f"({len(self.teacher_models)}); recompute them with hf_distill.cache_teacher_logits(dataset, "
                "[teacher, ...])."
            )
        return list(cached.unbind(1))

    def _is_regression(self) -> bool:
        return is_regression(self.model)

    @property
    def objective(self) -> DistillationObjective:
        """The distillation loss with its settings, as the arguments give them."""
        return DistillationObjective.from_args(self.args)

    def _combine_teachers(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            return logits[0]
        average = "logits" if self.objective.entry.compares_logits or self._is_regression() else "probs"
        return ensemble_teacher_logits(logits, self.args.teacher_weights, self.args.temperature, average)

    def aligned_positions(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) student and teacher logits of the positions that count.

        Sequence-level logits pass through; token-level ones keep the positions whose label is not -100
        (after the causal shift), or the attended ones when the batch has no labels.
        """
        labels, attention_mask = student_inputs.get("labels"), student_inputs.get("attention_mask")
        return aligned_logits(student_logits, teacher_logits, labels, attention_mask, self._shift_labels)

    def distillation_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation loss for the backward pass, and its per-position mean for the logs."""
        if isinstance(teacher_logits, TopKTeacherTargets):  # a top-k cache: the sparse forward KL
            return topk_distillation_term(
                self, student_logits, teacher_logits, student_inputs, num_items_in_batch
            )
        if self._is_regression():
            # A regression head has no distribution to soften: match the teacher's prediction.
            loss = logit_mse(student_logits, teacher_logits.to(student_logits.device))
            return loss, loss.detach()
        s_flat, t_flat = self.aligned_positions(student_logits, teacher_logits, student_inputs)
        if student_logits.dim() == 2:
            loss = self.objective(s_flat, t_flat, "mean")
            return loss, loss.detach()
        if s_flat.shape[0] == 0:  # every label masked: nothing to distil, keep the graph connected
            zero = student_logits.sum() * 0.0
            return zero, zero.detach()
        summed = self.objective(s_flat, t_flat, "sum")
        mean_for_log = summed.detach() / s_flat.shape[0]
        if num_items_in_batch is None:
            return summed / s_flat.shape[0], mean_for_log
        loss = summed / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # num_items is global; DDP averages the gradients
        return loss, mean_for_log

    def _task_loss_for_log(
        self, task_loss: torch.Tensor, student_inputs: dict[str, Any], task_items: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The task loss as a per-position mean of this micro-batch, whatever normalisation Trainer used."""
        if task_items is None:
            return task_loss.detach()
        labels = student_inputs["labels"]
        shift = self._shift_labels
        local = (labels[:, 1:] if shift else labels).ne(-100).sum().clamp_min(1)
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return task_loss.detach() * task_items / scale / local

    # ----- evaluation and logging ---------------------------------------------------------------------------

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.evaluation_loop`, plus a warning (and a ``collapsed_to_class`` metric) when the student
        predicted one class on every row."""
        output = super().evaluation_loop(*args, **kwargs)
        only = warn_if_collapsed(output.predictions, output.label_ids, f"The student ({self.method_name})")
        if only is not None:  # logged, so the model card flags it as the log does
            output.metrics[f"{kwargs.get('metric_key_prefix', 'eval')}_collapsed_to_class"] = only
        return output

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._logged_components[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean distillation and task losses since the last training log to Trainer's logs."""
        if "loss" in logs and self._logged_components:
            for name, values in self._logged_components.items():
                mean = torch.stack(values).mean()
                # Six significant digits, not decimals: influence terms and their gradient norms are ~1e-6.
                logs[name] = float(f"{self.accelerator.reduce(mean, reduction='mean').item():.6g}")
            self._logged_components.clear()
        if "loss" in logs:
            logs.update(self.nonfinite.log_values())
            if self.nonfinite.skipped_steps > self._skipped_at_last_log:
                # Trainer counts a skipped step's loss as 0 (or the window's mean so far): never a perfect step.
                logs["loss"] = float("nan")
            self._skipped_at_last_log = self.nonfinite.skipped_steps
        super().log(logs, start_time)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The student's gradient norm, which Trainer computes before every optimizer step anyway: a NaN or
        # infinite gradient from a finite loss is caught there (one more value in the step's check, no new pass).
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # With fp16's loss scaling an infinite norm is an overflow the scaler skips by design: not a fault.
        if norm is not None and getattr(self.accelerator, "scaler", None) is None:
            self.nonfinite.watch("student's gradient", torch.as_tensor(norm, dtype=torch.float32), "student")
        return norm
