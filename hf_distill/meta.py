"""Meta distillation (Zhou et al. 2022, "BERT Learns to Teach"): the teacher learns from the student's quiz loss.

shared/ALGORITHMS.md §4. One optimisation step (every ``meta_every``-th step for the teacher part):
1. pilot update, differentiable in θt: ``θs' = θs − η_pilot · ∇θs L_s(x_r; θs, θt)``, the gradient taken with
   ``create_graph=True`` through the step's own student forward, so θs' is a function of the teacher;
2. the quiz loss ``CE(S(x_q; θs'), y_q)`` at θs' (a `torch.func.functional_call` over the student's trainable
   parameters: no copy of the student), back-propagated through the pilot into the teacher (second order),
   plus ``teacher_task_weight`` times the teacher's own task loss; the teacher steps;
3. θs' is dropped, and the student makes its real step against the updated teacher (the base trainer).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import split_batch
from .influence import global_norm
from .quiz import QuizDistillTrainer, QuizDistillTrainingArguments
from .teacher import all_reduce_mean, trainable_parameters, unwrap_model
from .validation import check_finite, check_integer

# Attention implementations whose kernels can be differentiated twice (SDPA on its math backend).
DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")

_SECOND_ORDER_FIXES = (
    "Fixes: load the student with attn_implementation='eager' or 'sdpa' (meta steps run SDPA on its math "
    "backend); keep activation checkpointing non-reentrant (activation_checkpointing_kwargs={'use_reentrant': "
    "False}, the transformers default) or turn it off; do not compile the model; replace custom autograd "
    "functions marked @once_differentiable. Or use LGTMTrainer or OnlineDistillTrainer, which need no "
    "second-order gradients."
)
# Fragments of the errors torch raises when a graph cannot be differentiated twice.
_DOUBLE_BACKWARD_ERRORS = (
    "derivative for",
    "once_differentiable",
    "differentiate twice",
    "double backward",
    "use_reentrant",
)


# ----- pure functions ---------------------------------------------------------------------------------------


def pilot_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], learning_rate: float
) -> list[torch.Tensor]:
    """The pilot student ``θs' = θs − η · g``, one plain gradient step.

    Differentiable: when ``grads`` were taken with ``create_graph=True`` the result keeps their graph, so
    θs' is a function of whatever the gradients depend on (the teacher, in meta distillation).
    """
    return [p - learning_rate * g for p, g in zip(params, grads, strict=True)]


def meta_gradient(
    pilot_params: Sequence[torch.Tensor],
    quiz_grads: Sequence[torch.Tensor],
    teacher_params: Sequence[torch.Tensor],
    extra_losses: Sequence[tuple[torch.Tensor, float]] = (),
) -> list[torch.Tensor | None]:
    """∇θt of the quiz loss after the pilot step (plus ``Σ weight · loss`` of ``extra_losses``).

    Back-propagation continued from θs' into the teacher: with ``v = ∂Q/∂θs'`` (``quiz_grads``) the chain rule
    gives ``∂Q/∂θt = (∂θs'/∂θt)ᵀ v = −η (∂g/∂θt)ᵀ v``, one vector-Jacobian product through the pilot's
    gradient graph (a double backward through the student, a first-order backward through the teacher).
    The student's parameters are not inputs, so their ``.grad`` is never touched. Unused teacher
    parameters get ``None``.
    """
    outputs = list(pilot_params)
    grad_outputs = [v.to(p.dtype) for p, v in zip(pilot_params, quiz_grads, strict=True)]
    for loss, weight in extra_losses:
        outputs.append(loss)
        grad_outputs.append(torch.full_like(loss, weight))
    keep = [i for i, o in enumerate(outputs) if o.requires_grad]
    return list(
        torch.autograd.grad(
            [outputs[i] for i in keep],
            list(teacher_params),
            grad_outputs=[grad_outputs[i] for i in keep],
            allow_unused=True,
        )
    )


def check_second_order_support(student: nn.Module, teacher: nn.Module, args: Any) -> None:
    """Refuse, before any training work, settings whose graph cannot be differentiated twice.

    The pilot gradient is differentiated again (double backward through the student) and the teacher's
    gradient is taken with `torch.autograd.grad`, which reentrant activation checkpointing does not allow.
    """
    if getattr(args, "torch_compile", False) or hasattr(student, "_orig_mod"):
        raise ValueError(
            "MetaDistillTrainer differentiates the student's gradient a second time (double backward), which "
            "torch.compile'd graphs do not support; set torch_compile=False (and pass the uncompiled model)."
        )
    if getattr(args, "activation_checkpointing", False) and _kwargs_are_reentrant(
        getattr(args, "activation_checkpointing_kwargs", None)
    ):
        raise ValueError(
            "activation_checkpointing with use_reentrant=True cannot be differentiated twice, and "
            "MetaDistillTrainer back-propagates the quiz loss through the student's pilot gradient. Set "
            "activation_checkpointing_kwargs={'use_reentrant': False} (the transformers default), or turn "
            "activation checkpointing off."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        if _uses_reentrant_checkpointing(model):
            raise ValueError(
                f"The {role} has reentrant activation checkpointing enabled, which supports neither double "
                "backward nor torch.autograd.grad, both of which MetaDistillTrainer needs. Enable it with "
                f"{role}.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}) "
                "or use activation_checkpointing=True in the training arguments (non-reentrant by default)."
            )
    config = getattr(unwrap_model(student), "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention is not None and attention not in DOUBLE_BACKWARD_ATTENTION:
        raise ValueError(
            f"The student uses attn_implementation={attention!r}, whose kernels cannot be differentiated twice, "
            "and MetaDistillTrainer back-propagates through the student's gradient. Load the student with "
            "attn_implementation='sdpa' (meta steps run it on its math backend) or 'eager'. The teacher may "
            "keep any attention implementation."
        )


def _kwargs_are_reentrant(kwargs: dict[str, Any] | None) -> bool:
    """Whether `Trainer` would enable reentrant checkpointing with these activation_checkpointing_kwargs."""
    kwargs = dict(kwargs or {})
    kwargs.pop("every_n_layers", None)
    kwargs.pop("offload", None)
    if not kwargs:
        return False  # transformers then passes use_reentrant=False
    return bool(kwargs.get("use_reentrant", True))  # torch.utils.checkpoint's default is reentrant


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(function, functools.partial) and function.keywords.get("use_reentrant", True):
            return True
    return False


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


# ----- arguments and trainer --------------------------------------------------------------------------------


@dataclass
class MetaDistillTrainingArguments(QuizDistillTrainingArguments):
    """Online-distillation and quiz arguments plus the pilot update of meta distillation.

    The teacher's objective is the student's quiz loss after the pilot step (plus ``teacher_task_weight`` ×
    its own task loss): the online trainer's ``teacher_alpha`` is not used.
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


class MetaDistillTrainer(QuizDistillTrainer):
    """Meta distillation: the teacher learns from the student's quiz loss through a pilot update.

    ``MetaDistillTrainer(model=student, teacher_model=teacher, args=MetaDistillTrainingArguments(...),
    train_dataset=..., eval_dataset=..., quiz_dataset=None)``; the quiz set is carved from ``train_dataset``
    (``quiz_split``) unless given. Each teacher update differentiates the student's gradient a second time,
    so the student must support double backward (checked before training; see `check_second_order_support`).
    Everything a learning teacher has (checkpoints and resume, DDP sync, ``eval_teacher_*``, PEFT) applies.
    """

    method_name = "meta"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pilot_task: tuple[torch.Tensor | None, Any] | None = None
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "MetaDistillTrainer's pilot update is one student step on one batch, whose graph is kept for the "
                "second-order gradient: use gradient_accumulation_steps=1 (raise per_device_train_batch_size, or "
                "lower it and turn on activation_checkpointing to fit memory)."
            )
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

    def _student_forward(
        self, model: nn.Module, student_inputs: dict[str, Any], task_items: torch.Tensor | int | None
    ) -> tuple[torch.Tensor | None, Any]:
        task_loss, outputs = super()._student_forward(model, student_inputs, task_items)
        self._pilot_task = (task_loss, task_items)  # the pilot rebuilds the step's exact loss
        return task_loss, outputs

    def before_teacher_targets(self, model: nn.Module, inputs: dict[str, Any], student_outputs: Any) -> None:
        pilot_task, self._pilot_task = self._pilot_task, None
        if self._step_micro_batches is None:
            return
        self._step_micro_batches = None
        if not self.is_meta_step():
            self.teacher_lr_scheduler.step()  # the teacher's schedule runs over the student's steps
            return
        task_loss, task_items = pilot_task if pilot_task is not None else (None, None)
        self.meta_teacher_update(model, inputs, student_outputs.logits, task_loss, task_items)

    def meta_teacher_update(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        student_logits: torch.Tensor,
        task_loss: torch.Tensor | None = None,
        task_items: torch.Tensor | int | None = None,
    ) -> None:
        """Steps 1–2: the pilot, the quiz loss at θs', its gradient in the teacher, and the teacher's step.

        ``student_logits`` (and ``task_loss``) come from the step's own student forward and still carry its
        graph: the pilot gradient is taken through it, so the step costs no extra student forward on the
        training batch, and the graph stays for the real step's backward.
        """
        args = self.args
        student = self.accelerator.unwrap_model(model)
        names, params = zip(*trainable_parameters(student).items(), strict=True)
        student_inputs, teacher_inputs, _, _ = split_batch(inputs)
        teacher = self.teacher_models[0]
        teacher.train()
        teacher_params = list(trainable_parameters(teacher).values())

        with self._explain_second_order_errors():
            teacher_outputs = self._teacher_forward(student_inputs, teacher_inputs)

            # 1. Pilot: the student's own loss at the current teacher, its gradient with the graph kept.
            distill, _ = self.distillation_term(
                student_logits, teacher_outputs.logits, student_inputs, task_items
            )
            pilot_loss = (
                distill if task_loss is None else args.alpha * distill + (1.0 - args.alpha) * task_loss
            )
            grads = torch.autograd.grad(pilot_loss, params, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            grads, pilot_norm = self._global_pilot_gradient(grads)
            pilot = pilot_step(params, grads, args.pilot_learning_rate)

            # 2. The quiz loss at θs' and v = ∂Q/∂θs' (first order, at detached copies of θs').
            quiz_loss, quiz_grads = self._quiz_gradient(student, names, pilot)

            # 3. Back into the teacher through the pilot, with its own task loss if asked for.
            extra = []
            if args.teacher_task_weight > 0:
                extra.append((teacher_outputs.loss, args.teacher_task_weight))
            teacher_grads = meta_gradient(pilot, quiz_grads, teacher_params, extra)
        del grads, pilot, pilot_loss, distill, teacher_outputs

        for p, g in zip(teacher_params, teacher_grads, strict=True):
            if g is not None:
                p.grad = g
        self.teacher_optimizer_step()
        self._record("quiz_loss", quiz_loss.detach())
        self._record("pilot_grad_norm", pilot_norm)
        self._record("quiz_grad_norm", global_norm(quiz_grads))
        if extra:
            self._record("teacher_task_loss", extra[0][0].detach())

    def _card_hyperparameters(self) -> dict[str, Any]:
        values = super()._card_hyperparameters()
        values.pop("teacher_alpha", None)  # the online teacher loss's weight: not used by meta distillation
        return values

    # ----- pieces -----------------------------------------------------------------------------------------------

    def _teacher_forward(self, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> Any:
        """The teacher's outputs on the training batch, with their graph (and its task loss if weighted)."""
        if not teacher_inputs and self._teachers_need_own_inputs():
            raise ValueError(
                "The batch has no teacher_ input columns but the teacher's vocabulary differs from the "
                "student's; add them with hf_distill.add_teacher_inputs."
            )
        source = teacher_inputs or student_inputs
        feed = {k: v for k, v in source.items() if k in self._teacher_arg_names[0]}
        if self.args.teacher_task_weight > 0:
            labels = source.get("labels", student_inputs.get("labels"))
            if labels is None:
                raise ValueError(
                    "teacher_task_weight > 0 needs labels in the training batch for the teacher's task loss; add "
                    "labels or set teacher_task_weight=0."
                )
            feed["labels"] = labels
        outputs = self.teacher_models[0](**feed)
        if self.args.teacher_task_weight > 0 and outputs.loss is None:
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
        if not _distributed():
            return grads, global_norm(detached)
        synced = all_reduce_mean(detached)
        return [g + (s - d) for g, s, d in zip(grads, synced, detached, strict=True)], global_norm(synced)

    def _quiz_gradient(
        self, student: nn.Module, names: tuple[str, ...], pilot: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's task loss on this step's quiz batch at θs', and its gradient (averaged over processes).

        Run without dropout, so the quiz loss measures the pilot student rather than a dropout sample.
        """
        quiz = self.quiz_batch(self.state.global_step // self.args.meta_every)
        quiz_inputs = split_batch(quiz)[0]
        if quiz_inputs.get("labels") is None:
            raise ValueError(
                "The quiz batch has no labels, and the teacher learns from the student's loss on them; give the "
                "quiz data (or the training data it is carved from) a 'label' column."
            )
        leaves = [p.detach().requires_grad_(True) for p in pilot]
        was_training = student.training
        student.eval()
        try:
            outputs = functional_call(student, dict(zip(names, leaves, strict=True)), kwargs=quiz_inputs)
        finally:
            student.train(was_training)
        if outputs.loss is None:
            raise ValueError(
                f"The student returned no loss on the quiz batch (inputs {sorted(quiz_inputs)}); "
                "MetaDistillTrainer needs a model that computes its task loss from `labels`."
            )
        quiz_grads = torch.autograd.grad(outputs.loss, leaves, allow_unused=True)
        quiz_grads = all_reduce_mean(
            [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, quiz_grads, strict=True)]
        )
        return outputs.loss.detach(), quiz_grads

    @contextlib.contextmanager
    def _explain_second_order_errors(self) -> Iterator[None]:
        """Turn torch's errors about double backward into one that names the problem and the fixes."""
        try:
            yield
        except (RuntimeError, NotImplementedError) as err:
            message = str(err)
            if not any(fragment in message for fragment in _DOUBLE_BACKWARD_ERRORS):
                raise
            first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
            raise RuntimeError(
                "MetaDistillTrainer back-propagates the quiz loss through the student's pilot gradient (a double "
                f"backward through the student), and this run's model or settings do not support it: "
                f"{first_line} (raised before this step updated either model). {_SECOND_ORDER_FIXES}"
            ) from err
