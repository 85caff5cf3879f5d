"""`QuizDistillTrainer`: the base of the trainers whose teacher learns from the student's quiz loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..data.batch import ROW_ID, DistillationBatch, dataset_columns
from ..data.label_checks import check_not_empty, find_label_column
from ..data.quiz import labelled_quiz, quiz_indices, split_quiz
from ..distributed import (
    WholeWeightsModel,
    all_reduce_mean,
    reshard,
    unsharded_skeleton,
    whole_trainable_parameters,
    zeros_for_missing,
)
from ..teacher.loading import is_fsdp2
from .learning_teacher_trainer import LearningTeacherTrainer
from .quiz_config import QuizDistillTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class WholeWeights:
    """Both models at their gathered whole trainable weights, for the passes FSDP2 cannot run sharded.

    ``student``/``teacher``: modules whose forward runs at those weights (differentiable in them);
    ``student_skeleton``: what to `functional_call` with other student weights by name; ``student_values`` and
    ``teacher_values``: the weights, as leaves that require grad, by name.
    """

    student: nn.Module
    student_skeleton: nn.Module
    student_values: dict[str, torch.Tensor]
    teacher: nn.Module
    teacher_values: dict[str, torch.Tensor]


class QuizDistillTrainer(LearningTeacherTrainer):
    """Base of the trainers whose teacher learns from the student's loss on quiz data.

    ``quiz_dataset=None`` carves the quiz set out of ``train_dataset`` (``quiz_split``, stratified); passing
    the evaluation set as ``quiz_dataset`` is allowed but warns that evaluation scores are no longer clean.
    """

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: QuizDistillTrainingArguments | None = None,
        *,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        quiz_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        self.quiz_from_train = quiz_dataset is None
        check_not_empty(train_dataset, "training set (train_dataset)", "Pass a dataset with rows.")
        if train_dataset is not None and hasattr(train_dataset, "add_column"):
            if ROW_ID not in dataset_columns(train_dataset):
                # Row ids name the samples in per-sample records; added before the quiz split so that they
                # are rows of the dataset the caller passed.
                train_dataset = train_dataset.add_column(ROW_ID, list(range(len(train_dataset))))
        if quiz_dataset is None and train_dataset is not None:
            if not hasattr(train_dataset, "select"):
                raise ValueError(
                    "Carving quiz data out of train_dataset needs a datasets.Dataset; pass quiz_dataset= "
                    "explicitly for other dataset types."
                )
            label_column = find_label_column(
                dataset_columns(train_dataset), getattr(args, "label_names", None) or ()
            )
            train_dataset, quiz_dataset = split_quiz(
                train_dataset,
                getattr(args, "quiz_split", 0.1),
                label_column=label_column or "label",
                seed=getattr(args, "seed", 42),
            )
        is_eval = quiz_dataset is not None and quiz_dataset is eval_dataset
        if quiz_dataset is not None:
            quiz_dataset = labelled_quiz(quiz_dataset, getattr(args, "label_names", None))
        if is_eval:
            logger.warning(
                "The evaluation set is also the quiz set: the teacher learns from the student's loss on it, so "
                "evaluation scores are no longer clean estimates. Hold out quiz data from training instead."
            )
        super().__init__(
            model, teacher_model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )
        if quiz_dataset is None:
            raise ValueError(f"{type(self).__name__} needs quiz data: pass train_dataset (or quiz_dataset=).")
        self.quiz_dataset = self._remove_unused_columns(quiz_dataset, description="quiz")
        self.check_dataset(self.quiz_dataset, "quiz")
        # One quiz batch per optimisation step: by default as large as the step's training batch, so that
        # g micro-batches of b rows make the step of one batch of g·b rows.
        self._quiz_batch_size = self.args.quiz_batch_size or (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        )

    @classmethod
    def _default_args_class(cls) -> type[QuizDistillTrainingArguments]:
        return QuizDistillTrainingArguments

    # Under FSDP2 the passes through the student's virtual weights run on gathered whole weights
    # (`whole_weights`; https://hf-distill.readthedocs.io/algorithms/, "Teachers that learn, sharded").
    teacher_shards_under_fsdp2 = True

    def _prepare_teachers(self, teachers: list[nn.Module]) -> list[nn.Module]:
        # The models' structures, copied before either is sharded, for the passes on whole weights.
        self._skeletons = None
        if is_fsdp2(self.accelerator) and len(teachers) == 1:
            device = self.accelerator.device
            self._skeletons = (
                unsharded_skeleton(self.model, device),
                unsharded_skeleton(teachers[0], device),
            )
        return super()._prepare_teachers(teachers)

    def whole_weights(self, student: nn.Module) -> WholeWeights:
        """Both models' trainable weights gathered whole (collectives: every rank calls it), as leaves, with
        the unsharded skeletons that run them; both models' sharded parameters are put back first."""
        teacher = self.teacher_models[0]
        # The sharded weights, not the whole ones a root unit keeps registered after a forward (in the compute
        # dtype under mixed precision): the teacher's last forward (the soft labels) had no backward, and the
        # student's may be waiting for its own, which unshards them again.
        reshard(teacher)
        reshard(student)
        student_skeleton, teacher_skeleton = self._skeletons
        student_skeleton.train(student.training)
        teacher_skeleton.train(teacher.training)
        student_values = {n: p.requires_grad_(True) for n, p in whole_trainable_parameters(student).items()}
        teacher_values = {n: p.requires_grad_(True) for n, p in whole_trainable_parameters(teacher).items()}
        return WholeWeights(
            WholeWeightsModel(student_skeleton, student_values),
            student_skeleton,
            student_values,
            WholeWeightsModel(teacher_skeleton, teacher_values),
            teacher_values,
        )

    def _refuse_gradient_accumulation(self, reason: str, advice: str) -> None:
        """Refuse ``gradient_accumulation_steps`` > 1, for a teacher update that ``reason`` ties to one batch."""
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"{type(self).__name__}'s {reason}: use gradient_accumulation_steps=1 ({advice})."
            )

    def step_micro_batches(self, batch: DistillationBatch) -> list[DistillationBatch]:
        """Every micro-batch of the optimisation step that ``batch`` (its first) starts, prepared and split."""
        rest = batch.step_batches[1:] if batch.step_batches else []
        return [batch] + [DistillationBatch.from_collated(self._prepare_inputs(b)) for b in rest]

    def micro_batch_loss_weight(self, task_items: torch.Tensor | int | None, micro_batches: int) -> float:
        """The factor Trainer applies to one micro-batch's loss in the step's total: ``1 / micro_batches`` for a
        per-micro-batch mean, 1 for a loss already normalised by the step's ``num_items_in_batch``."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # token-level: Trainer's own rule
            scaled = (
                self.model_accepts_loss_kwargs and task_items is not None
            ) or self.compute_loss_func is not None
        return 1.0 if scaled else 1.0 / micro_batches

    def quiz_batch(self, step: int | None = None) -> dict[str, Any]:
        """The collated quiz batch of optimisation step ``step`` (default: the current one), on the device."""
        step = self.state.global_step if step is None else step
        rows = quiz_indices(
            step,
            len(self.quiz_dataset),
            self._quiz_batch_size,
            self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        features = [self.quiz_dataset[i] for i in rows]
        return self._prepare_inputs(self.data_collator(features))

    def quiz_gradient(
        self,
        student: nn.Module,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        inputs: dict[str, Any],
        loss_of: Callable[[Any], torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's quiz loss at ``params`` (θs', by name) and its gradient there, averaged over processes.

        Evaluated at detached copies of ``params`` (first order: no graph back to them) and without dropout,
        so the loss measures the student at θs' rather than a dropout sample. ``loss_of`` maps the student's
        outputs on the quiz ``inputs`` to the loss.
        """
        leaves = [p.detach().requires_grad_(True) for p in params]
        was_training = student.training
        student.eval()
        try:
            outputs = functional_call(student, dict(zip(names, leaves, strict=True)), kwargs=inputs)
        finally:
            student.train(was_training)
        loss = loss_of(outputs)
        grads = all_reduce_mean(
            zeros_for_missing(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)
        )
        self.nonfinite.watch("quiz loss", loss, "student")
        self.nonfinite.watch_all("quiz gradient", grads, "student")
        return loss.detach(), grads

    def _card_hyperparameters(self) -> dict[str, Any]:
        values = super()._card_hyperparameters()
        if not self.quiz_from_train:
            values["quiz_split"] = "quiz_dataset"  # given explicitly: no split of the training set
        return values
