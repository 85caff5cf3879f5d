"""`MetaDistillTrainer` (Zhou et al. 2022, "BERT Learns to Teach"): the teacher learns from the student's quiz
loss through a differentiable pilot update (https://hf-distill.readthedocs.io/algorithms/, "Meta distillation").

One optimisation step (every ``meta_every``-th step for the teacher part):
1. pilot update, differentiable in θt: ``θs' = θs − η_pilot · ∇θs L_s(x_r; θs, θt)``, the gradient taken with
   ``create_graph=True`` through the step's own student forward, so θs' is a function of the teacher;
2. the quiz loss ``CE(S(x_q; θs'), y_q)`` at θs' (a `torch.func.functional_call` over the student's trainable
   parameters: no copy of the student), back-propagated through the pilot into the teacher (second order),
   plus ``teacher_task_weight`` times the teacher's own task loss; the teacher steps;
3. θs' is dropped, and the student makes its real step against the updated teacher (the base trainer).

Under gradient accumulation the step's micro-batches are the pilot's batch: its gradient is their sum, each
weighted as in the student's real step, taken one micro-batch at a time (a first-order pass for θs', then a
replay of each micro-batch's forward for its share of the meta-gradient).

Under FSDP2 the pilot runs on whole weights: both models' trainable weights are gathered, the passes go
through unsharded copies of their structure (FSDP2 hides sharded weights from `torch.autograd.grad` and
`functional_call`), and each rank keeps its shard of the teacher's mean meta-gradient (docs/algorithms.md,
"Teachers that learn, sharded").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.batch import DistillationBatch
from ..distributed import all_reduce_mean, is_distributed, is_sharded, mean_into_shards, zeros_for_missing
from ..losses.influence import global_norm
from ..losses.meta_gradient import (
    check_second_order_support,
    explain_second_order_errors,
    meta_gradient,
    pilot_step,
)
from ..teacher.optimizer import trainable_parameters
from .distillation_trainer import StudentForward, TeacherTargets
from .meta_config import MetaDistillTrainingArguments
from .quiz_trainer import QuizDistillTrainer


class MetaDistillTrainer(QuizDistillTrainer):
    """Meta distillation: the teacher learns from the student's quiz loss through a pilot update.

    ``MetaDistillTrainer(model=student, teacher_model=teacher, args=MetaDistillTrainingArguments(...),
    train_dataset=..., eval_dataset=..., quiz_dataset=None)``; the quiz set is carved from ``train_dataset``
    (``quiz_split``) unless given. Each teacher update differentiates the student's gradient a second time,
    so the student must support double backward (checked before training; see `check_second_order_support`).
    Everything a learning teacher has (checkpoints and resume, DDP sync, ``eval_teacher_*``, PEFT) applies.
    The teacher you pass is trained in place: pass a copy (``copy.deepcopy(teacher)``) to keep the original.
    """

    method_name = "meta"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_second_order_support(self.model, self.teacher_models[0], self.args)

    @classmethod
    def _default_args_class(cls) -> type[MetaDistillTrainingArguments]:
        return MetaDistillTrainingArguments

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        # Trainer has enabled activation checkpointing by now: check again, before step 1.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        check_second_order_support(self.model, self.teacher_models[0], self.args)
        return scheduler

    # ----- the step ---------------------------------------------------------------------------------------------

    def is_meta_step(self, step: int | None = None) -> bool:
        """Whether optimisation step ``step`` (default: the current one) updates the teacher."""
        step = self.state.global_step if step is None else step
        return step % self.args.meta_every == 0

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self.is_meta_step():
            return super().training_step(model, inputs, num_items_in_batch)
        # The fused SDPA kernels have no double backward. The student's forward of a meta step is the one the
        # pilot differentiates twice, and activation checkpointing recomputes it during each backward, so the
        # forward and every backward of the step (the real one included) run on the math backend.
        with sdpa_kernel(SDPBackend.MATH):
            return super().training_step(model, inputs, num_items_in_batch)

    def teacher_step(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward | None
    ) -> TeacherTargets | None:
        """The meta update on meta steps; on the others the teacher's schedule still advances."""
        if not self.is_meta_step():
            self.teacher_lr_scheduler.step()  # the teacher's schedule runs over the student's steps
        else:
            self.meta_teacher_update(model, batch, student)
        return None

    def meta_teacher_update(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward
    ) -> None:
        """Steps 1–2: the pilot, the quiz loss at θs', its gradient in the teacher, and the teacher's step.

        ``student`` is the step's own student forward, whose logits (and task loss) still carry its graph:
        without accumulation the pilot gradient is taken through it, so the step costs no extra student
        forward on the training batch, and the graph stays for the real step's backward. Under accumulation
        the pilot covers every micro-batch of the step (`_meta_gradient_over_micro_batches`).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        teacher = self.teacher_models[0]
        teacher.train()
        micro_batches = self.step_micro_batches(batch)
        if is_sharded(unwrapped):
            result = self._meta_gradient_on_whole_weights(unwrapped, micro_batches, student.task_items)
            mean_into_shards(result.teacher_grads, list(trainable_parameters(teacher).values()))
        else:
            teacher_params = list(trainable_parameters(teacher).values())
            names, params = zip(*trainable_parameters(unwrapped).items(), strict=True)
            with explain_second_order_errors():
                if len(micro_batches) == 1:
                    result = self._meta_gradient_of_batch(
                        unwrapped, names, params, teacher_params, batch, student
                    )
                else:
                    result = self._meta_gradient_over_micro_batches(
                        unwrapped, names, params, teacher_params, micro_batches, student.task_items
                    )
            for p, g in zip(teacher_params, result.teacher_grads, strict=True):
                if g is not None:
                    p.grad = g
        self.teacher_optimizer_step()
        self._record("quiz_loss", result.quiz_loss)
        self._record("pilot_grad_norm", result.pilot_norm)
        self._record("quiz_grad_norm", global_norm(result.quiz_grads))
        if result.teacher_task_loss is not None:
            self._record("teacher_task_loss", result.teacher_task_loss)

    def _meta_gradient_of_batch(
        self,
        student_model: nn.Module,
        names: tuple[str, ...],
        params: tuple[torch.Tensor, ...],
        teacher_params: list[torch.Tensor],
        batch: DistillationBatch,
        student: StudentForward,
    ) -> _MetaGradient:
        """The meta-gradient of one micro-batch, through the graph of the step's own student forward."""
        args = self.args
        teacher_outputs = self._teacher_outputs_with_graph(batch)

        # 1. Pilot: the student's own loss at the current teacher, its gradient with the graph kept.
        distill, _ = self.distillation_term(
            student.logits, teacher_outputs.logits, batch.student, student.task_items
        )
        pilot_loss = self.student_loss(distill, student.task_loss)
        grads = torch.autograd.grad(pilot_loss, params, create_graph=True, allow_unused=True)
        grads, pilot_norm = self._global_pilot_gradient(zeros_for_missing(grads, params))
        self.nonfinite.watch("teacher's logits", teacher_outputs.logits, "teacher")
        self.nonfinite.watch("pilot gradient", pilot_norm, "student")
        pilot = pilot_step(params, grads, args.pilot_learning_rate)

        # 2. The quiz loss at θs' and v = ∂Q/∂θs' (first order, at detached copies of θs').
        quiz_loss, quiz_grads = self._quiz_gradient(student_model, names, pilot)

        # 3. Back into the teacher through the pilot, with its own task loss if asked for.
        extra = []
        if args.teacher_task_weight > 0:
            extra.append((teacher_outputs.loss, args.teacher_task_weight))
        teacher_grads = meta_gradient(pilot, quiz_grads, teacher_params, extra)
        task_loss = teacher_outputs.loss.detach() if extra else None
        return _MetaGradient(teacher_grads, quiz_loss, quiz_grads, pilot_norm, task_loss)

    def _meta_gradient_on_whole_weights(
        self,
        student: nn.Module,
        micro_batches: list[DistillationBatch],
        task_items: torch.Tensor | int | None,
    ) -> _MetaGradient:
        """The meta-gradient under FSDP2: the micro-batch passes, on gathered whole weights of both models run
        through their unsharded skeletons. Its teacher gradients are this rank's, whole (not yet averaged)."""
        whole = self.whole_weights(student)
        names, params = zip(*whole.student_values.items(), strict=True)
        with explain_second_order_errors():
            return self._meta_gradient_over_micro_batches(
                whole.student,
                names,
                params,
                list(whole.teacher_values.values()),
                micro_batches,
                task_items,
                teacher=whole.teacher,
                quiz_student=whole.student_skeleton,
            )

    def _meta_gradient_over_micro_batches(
        self,
        student_model: nn.Module,
        names: tuple[str, ...],
        params: tuple[torch.Tensor, ...],
        teacher_params: list[torch.Tensor],
        micro_batches: list[DistillationBatch],
        task_items: torch.Tensor | int | None,
        teacher: nn.Module | None = None,
        quiz_student: nn.Module | None = None,
    ) -> _MetaGradient:
        """The meta-gradient of the step's micro-batches taken together, one micro-batch's graph at a time.

        ``teacher`` (default: the live teacher) gives the teacher's outputs; ``quiz_student`` (default:
        ``student_model``) is what the quiz loss calls with θs' by name.

        The pilot gradient is the sum of the micro-batches' gradients, each loss weighted as Trainer weights
        it in the student's real step, so θs' is the pilot of the step's whole batch. It is taken first order;
        the meta-gradient ``−η (∂g/∂θt)ᵀ v`` is linear in g, so each micro-batch's share is then one double
        backward through a replay of its forwards (same dropout masks), freed before the next.
        """
        args = self.args
        weight = self.micro_batch_loss_weight(task_items, len(micro_batches))
        device = params[0].device
        # 1. Pilot, first order.
        states, total = [], None
        for batch in micro_batches:
            states.append(_rng_state(device))
            loss, _ = self._pilot_loss(student_model, batch, task_items, teacher_graph=False, teacher=teacher)
            grads = zeros_for_missing(torch.autograd.grad(loss * weight, params, allow_unused=True), params)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        if is_distributed():
            total = all_reduce_mean(total)
        pilot_norm = global_norm(total)
        self.nonfinite.watch("pilot gradient", pilot_norm, "student")
        pilot = pilot_step([p.detach() for p in params], total, args.pilot_learning_rate)

        # 2. The quiz loss at θs' and v.
        quiz_loss, quiz_grads = self._quiz_gradient(quiz_student or student_model, names, pilot)
        del pilot, total

        # 3. Each micro-batch's share of the meta-gradient (and of the teacher's task loss).
        teacher_grads: list[torch.Tensor | None] = [None] * len(teacher_params)
        task_loss = None
        for batch, state in zip(micro_batches, states, strict=True):
            with _replayed_rng(state, device):
                loss, teacher_outputs = self._pilot_loss(student_model, batch, task_items, teacher=teacher)
            grads = torch.autograd.grad(loss * weight, params, create_graph=True, allow_unused=True)
            share = pilot_step(params, zeros_for_missing(grads, params), args.pilot_learning_rate)
            extra = []
            if args.teacher_task_weight > 0:
                extra.append((teacher_outputs.loss, args.teacher_task_weight / len(micro_batches)))
                part = teacher_outputs.loss.detach() / len(micro_batches)
                task_loss = part if task_loss is None else task_loss + part
            grads_of_share = meta_gradient(share, quiz_grads, teacher_params, extra)
            teacher_grads = [
                b if a is None else a if b is None else a + b
                for a, b in zip(teacher_grads, grads_of_share, strict=True)
            ]
            del loss, teacher_outputs, grads, share
        return _MetaGradient(teacher_grads, quiz_loss, quiz_grads, pilot_norm, task_loss)

    def _pilot_loss(
        self,
        student_model: nn.Module,
        batch: DistillationBatch,
        task_items: torch.Tensor | int | None,
        teacher_graph: bool = True,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The student's loss on one micro-batch at the current teacher (as its real step computes it, from
        its own forward), with the graph to the student (and to the teacher with ``teacher_graph``); and the
        teacher's outputs (from ``teacher``, default the live one)."""
        with torch.set_grad_enabled(teacher_graph):
            teacher_outputs = self._teacher_outputs_with_graph(batch, teacher)
        self.nonfinite.watch("teacher's logits", teacher_outputs.logits, "teacher")
        student = self._student_forward(student_model, batch.student, task_items)
        distill, _ = self.distillation_term(student.logits, teacher_outputs.logits, batch.student, task_items)
        return self.student_loss(distill, student.task_loss), teacher_outputs

    # ----- pieces -----------------------------------------------------------------------------------------------

    def _teacher_outputs_with_graph(self, batch: DistillationBatch, teacher: nn.Module | None = None) -> Any:
        """The teacher's model outputs on the training batch, with their graph (and its task loss if weighted);
        ``teacher`` defaults to the live one."""
        self._check_batch_has_teacher_inputs(batch)
        with_labels = self.args.teacher_task_weight > 0
        feed = batch.teacher_inputs(self._teacher_arg_names[0], with_labels=with_labels)
        if with_labels and feed.get("labels") is None:
            raise ValueError(
                "teacher_task_weight > 0 needs labels in the training batch for the teacher's task loss; add "
                "labels or set teacher_task_weight=0."
            )
        outputs = (teacher or self.teacher_models[0])(**feed)
        if with_labels and outputs.loss is None:
            raise ValueError(
                "The teacher returned no loss for its labels, so teacher_task_weight > 0 has nothing to weight; "
                "use a teacher with a task head or set teacher_task_weight=0."
            )
        return outputs

    def _global_pilot_gradient(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The pilot gradient of the global batch, and its norm.

        Under DDP the pilot steps with the mean gradient over processes (the real step's), while each rank's
        graph keeps its own micro-batch's share: the teachers' meta-gradients, averaged over ranks by the
        teacher step, are then the single-process meta-gradient of the combined batch.
        """
        detached = [g.detach() for g in grads]
        if not is_distributed():
            return grads, global_norm(detached)
        synced = all_reduce_mean(detached)
        return [g + (s - d) for g, s, d in zip(grads, synced, detached, strict=True)], global_norm(synced)

    def _quiz_gradient(
        self, student: nn.Module, names: tuple[str, ...], pilot: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's task loss on this step's quiz batch at θs', and its gradient (averaged over processes)."""
        quiz = DistillationBatch.from_collated(
            self.quiz_batch(self.state.global_step // self.args.meta_every)
        )
        if quiz.labels is None:
            raise ValueError(
                "The quiz batch has no labels, and the teacher learns from the student's loss on them; give the "
                "quiz data (or the training data it is carved from) a 'label' column."
            )

        def task_loss(outputs: Any) -> torch.Tensor:
            if outputs.loss is None:
                raise ValueError(
                    f"The student returned no loss on the quiz batch (inputs {sorted(quiz.student)}); "
                    "MetaDistillTrainer needs a model that computes its task loss from `labels`."
                )
            return outputs.loss

        return self.quiz_gradient(student, names, pilot, quiz.student, task_loss)


@dataclass
class _MetaGradient:
    """What one meta update computed: the teacher's gradient, the quiz loss and gradient, the pilot
    gradient's norm and the teacher's task loss (None when it is not weighted)."""

    teacher_grads: list[torch.Tensor | None]
    quiz_loss: torch.Tensor
    quiz_grads: list[torch.Tensor]
    pilot_norm: torch.Tensor
    teacher_task_loss: torch.Tensor | None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state a forward on ``device`` draws its dropout masks from (CPU, and CUDA when on it)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Draw from ``state`` again (the same dropout masks), leaving the global random state as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
