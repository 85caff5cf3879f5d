"""LGTM (Ren et al., ACL 2023): the teacher's update is weighted by each sample's distillation influence.

shared/ALGORITHMS.md §5. One optimisation step:
1. lookahead θs' = one step of the student's optimizer on its loss at the current teacher (a functional
   step on a list of tensors: no copy of the student, its optimizer state untouched);
2. v = ∇θs' CE on a quiz batch;
3. per-sample influence w_i = ∇θs ℓ_i · v, by a central difference at θs ± εv (``finite_difference``) or
   exactly by one forward-mode product (``exact``); the teacher steps on ``L_aux − λ · mean_i w_i``, one
   teacher forward and one teacher backward serving both terms;
4. the student's real step on its loss against the updated teacher (done by the base trainer); with
   ``lgtm_student_targets="pre_update"`` the real step is the lookahead's own gradient instead (the teacher
   before its update taught it), which saves one teacher forward and one student backward per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from .data import dataset_columns, split_batch
from .influence import (
    adamw_lookahead,
    clip_coefficient,
    exact_logit_influence,
    fd_epsilon,
    finite_difference_influence,
    global_norm,
    perturbed,
    sgd_lookahead,
)
from .label_checks import find_label_column
from .objectives import distillation_loss, kl_divergence, labelled_cross_entropy
from .quiz import QuizDistillTrainer, QuizDistillTrainingArguments
from .teacher import SEQUENCE_CLASSIFICATION, all_reduce_mean, trainable_parameters
from .validation import check_finite

logger = logging.getLogger(__name__)

INFLUENCE_MODES = ("finite_difference", "exact")
INFLUENCE_LOSSES = ("teacher_kl", "student_kl")
LOOKAHEADS = ("optimizer", "sgd")
STUDENT_TARGETS = ("updated", "pre_update")


@dataclass
class LGTMTrainingArguments(QuizDistillTrainingArguments):
    """Online-distillation and quiz arguments plus the distillation-influence settings."""

    influence_mode: str = field(
        default="finite_difference",
        metadata={
            "help": "finite_difference (the paper's FDA) or exact (forward-mode, no approximation).",
            "choices": INFLUENCE_MODES,
        },
    )
    fd_radius: float = field(
        default=0.01, metadata={"help": "r in the finite-difference step ε = r / ‖v‖ (the reference's 0.01)."}
    )
    influence_scale: float | None = field(
        default=None,
        metadata={
            "help": "λ, weight of the influence term in the teacher's loss (default: the teacher's current learning rate, as the reference)."
        },
    )
    influence_loss: str = field(
        default="teacher_kl",
        metadata={
            "help": "Loss whose influence weights the teacher: teacher_kl = α_t·KL(p_s ‖ p_t) (the reference) or "
            "student_kl = the student's distillation loss (the exact meta-gradient's form).",
            "choices": INFLUENCE_LOSSES,
        },
    )
    lookahead: str = field(
        default="optimizer",
        metadata={
            "help": "optimizer: replay the student's AdamW step (as the reference); sgd: θ − lr·g.",
            "choices": LOOKAHEADS,
        },
    )
    lgtm_student_targets: str = field(
        default="updated",
        metadata={
            "help": "Soft labels of the student's real step. updated: from the teacher after its LGTM update "
            "(the paper); pre_update: the real step reuses the lookahead's gradient, computed with the teacher "
            "before its update (one teacher forward and one student backward fewer per step).",
            "choices": STUDENT_TARGETS,
        },
    )

    def __post_init__(self) -> None:
        if self.influence_mode not in INFLUENCE_MODES:
            raise ValueError(
                f"influence_mode={self.influence_mode!r} is unknown; choose one of {INFLUENCE_MODES}."
            )
        if self.influence_loss not in INFLUENCE_LOSSES:
            raise ValueError(
                f"influence_loss={self.influence_loss!r} is unknown; choose one of {INFLUENCE_LOSSES}."
            )
        if self.lookahead not in LOOKAHEADS:
            raise ValueError(f"lookahead={self.lookahead!r} is unknown; choose one of {LOOKAHEADS}.")
        if self.lgtm_student_targets not in STUDENT_TARGETS:
            raise ValueError(
                f"lgtm_student_targets={self.lgtm_student_targets!r} is unknown; choose one of {STUDENT_TARGETS}."
            )
        check_finite("fd_radius", self.fd_radius, 0, low_open=True, hint="The reference uses 0.01.")
        if self.influence_scale is not None:
            check_finite(
                "influence_scale", self.influence_scale, 0, hint="Or None for the teacher's learning rate."
            )
        if (
            self.influence_loss == "student_kl"
            and self.distill_loss == "dist"
            and self.dist_intra_weight != 0
        ):
            raise ValueError(
                "influence_loss='student_kl' needs a per-sample distillation loss, and distill_loss='dist' has a "
                "batch-level term; set dist_intra_weight=0 or use influence_loss='teacher_kl'."
            )
        super().__post_init__()
        if self.lgtm_student_targets == "pre_update" and self.uses_representations:
            raise ValueError(
                "lgtm_student_targets='pre_update' takes the student's soft labels from the teacher forward that "
                "the LGTM update differentiates, which computes no hidden states or attentions; use "
                "lgtm_student_targets='updated' with representation terms (or set their weights to 0)."
            )


class LGTMTrainer(QuizDistillTrainer):
    """LGTM: the teacher learns from the student's quiz loss, weighting each sample by its influence.

    ``LGTMTrainer(model=student, teacher_model=teacher, args=LGTMTrainingArguments(...), train_dataset=...,
    eval_dataset=..., quiz_dataset=None)``. After every step ``trainer.latest_influence`` holds the batch's
    per-sample weights with their dataset row ids (``idx``), and the training logs hold their summary.
    """

    method_name = "lgtm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.latest_influence: dict[str, Any] | None = None
        # pre_update: (batch, student logits, teacher logits with graph) between compute_loss and the update.
        self._pending_teacher_update: tuple[dict[str, Any], torch.Tensor, torch.Tensor] | None = None
        super().__init__(*args, **kwargs)
        if self._student_task != SEQUENCE_CLASSIFICATION or self._is_regression():
            raise ValueError(
                "LGTMTrainer supports single-label sequence classification (the paper's GLUE setting); for "
                "regression or token-level tasks use OnlineDistillTrainer or DistillationTrainer."
            )
        columns = dataset_columns(self.train_dataset)
        if columns and find_label_column(columns, self.label_names) is None:
            raise ValueError(
                "LGTMTrainer needs labels in train_dataset (looked for a 'label', 'labels' or 'label_ids' column): "
                "the student's lookahead and the teacher's auxiliary loss include their cross-entropy, and the quiz "
                "is carved from these rows. Add a 'label' column (or use OnlineDistillTrainer with alpha=1.0 and "
                "teacher_alpha=1.0 to distil without labels)."
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "LGTMTrainer's lookahead is one student step on one batch: use gradient_accumulation_steps=1 "
                "(raise per_device_train_batch_size instead)."
            )
        if self.args.lgtm_student_targets == "pre_update" and self.args.fp16:
            raise ValueError(
                "lgtm_student_targets='pre_update' reads the student's gradient after the backward, which fp16 "
                "loss scaling leaves scaled; use bf16=True, full precision, or lgtm_student_targets='updated'."
            )
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)

    @classmethod
    def _default_args_class(cls) -> type[LGTMTrainingArguments]:
        return LGTMTrainingArguments

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        # The student's optimizer exists from here on: refuse one the lookahead cannot replay before step 1.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        student_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.args.lookahead == "optimizer":
            if not isinstance(student_optimizer, torch.optim.AdamW):
                raise ValueError(
                    f"lookahead='optimizer' replays torch.optim.AdamW, but the student's optimizer is "
                    f"{type(student_optimizer).__name__}; use optim='adamw_torch' or lookahead='sgd'."
                )
            if any(group.get("amsgrad") for group in student_optimizer.param_groups):
                raise ValueError("lookahead='optimizer' does not replay AMSGrad; use lookahead='sgd'.")
        return scheduler

    # ----- the step ---------------------------------------------------------------------------------------------

    def before_teacher_targets(self, model: nn.Module, inputs: dict[str, Any], student_outputs: Any) -> None:
        if self.args.lgtm_student_targets != "pre_update" or self._step_micro_batches is None:
            return  # faithful: the teacher already stepped, in training_step, before this forward
        self._step_micro_batches = None
        # The student learns from this forward's (detached) soft labels; the teacher steps after the
        # student's backward, from the gradient that backward leaves (see training_step).
        self._pending_teacher_update = (
            inputs,
            student_outputs.logits.detach(),
            self._teacher_forward(inputs),
        )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # Overridden because Trainer has no hook where the teacher steps: before the student's real forward
        # (faithful: no student graph is alive during the influence passes) or, for pre_update, between the
        # backward and the optimizer step (where the student's gradient exists).
        self._pending_teacher_update = None
        if self.args.lgtm_student_targets == "updated" and self._step_micro_batches is not None:
            self._step_micro_batches = None
            inputs = self._prepare_inputs(inputs)  # the base step's own call is then a no-op
            model.train()
            with self.compute_loss_context_manager():
                self.lgtm_teacher_update(model, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        pending, self._pending_teacher_update = self._pending_teacher_update, None
        if pending is not None:
            step_inputs, student_logits, teacher_logits = pending
            student = self.accelerator.unwrap_model(model)
            # Already averaged across ranks by the backward (DDP's reducer), as the optimizer will see them.
            grads = [
                torch.zeros_like(p) if p.grad is None else p.grad
                for p in trainable_parameters(student).values()
            ]
            self.lgtm_teacher_update(model, step_inputs, student_logits, teacher_logits, grads)
            labels = split_batch(step_inputs)[0]["labels"]
            self.latest_influence["teacher_gold_prob"] = _gold_prob(teacher_logits, labels)
        return loss

    def _teacher_forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The one teacher forward of the step, in training mode and with its graph: L_aux and both
        influence terms differentiate through it."""
        student_inputs, teacher_inputs, _, _ = split_batch(inputs)
        teacher = self.teacher_models[0]
        teacher.train()
        accepted = self._teacher_arg_names[0]
        features = {k: v for k, v in (teacher_inputs or student_inputs).items() if k != "labels"}
        with record_function("lgtm.teacher_forward"):
            return teacher(**{k: v for k, v in features.items() if k in accepted}).logits

    def lgtm_teacher_update(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        student_grads: list[torch.Tensor] | None = None,
    ) -> None:
        """Steps 1–3 of the LGTM step and the teacher's optimizer step.

        Faithful (the default call): the lookahead runs its own student forward, whose graph its gradient
        frees. pre_update passes the step's detached ``student_logits`` with ``student_grads``, the gradient of
        the student's loss at the current teacher (averaged across ranks), and ``teacher_logits``, the teacher's
        forward with its graph (run here when None).
        """
        args = self.args
        student = self.accelerator.unwrap_model(model)
        names, params = zip(*trainable_parameters(student).items(), strict=True)
        student_inputs, _, _, row_ids = split_batch(inputs)
        labels = student_inputs["labels"]
        features = {k: v for k, v in student_inputs.items() if k != "labels"}
        teacher = self.teacher_models[0]
        if teacher_logits is None:
            teacher_logits = self._teacher_forward(inputs)

        # 1. Lookahead: the student's gradient at the current teacher.
        with record_function("lgtm.lookahead"):
            if student_grads is None:
                # The unwrapped student: DDP's reducer is not involved, the gradient is averaged below.
                student_logits = student(**features).logits
                lookahead_loss = self._student_objective(student_logits, teacher_logits.detach(), labels)
                grads = torch.autograd.grad(lookahead_loss, params, allow_unused=True)
                student_logits = student_logits.detach()
                student_grads = all_reduce_mean(
                    [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
                )
                del grads, lookahead_loss
            elif student_logits is None:
                raise ValueError(
                    "lgtm_teacher_update got student_grads without student_logits: pass the (detached) logits "
                    "of the forward those gradients were taken at, or neither to run the lookahead's own forward."
                )
            lookahead_params = self._lookahead(params, student_grads)
            del student_grads  # in the faithful step, a parameter-sized set no later pass needs

        # 2. v: the quiz gradient at θs'. Influence passes run without dropout so θs' and θs± see one network.
        with record_function("lgtm.quiz_gradient_and_influence"):
            quiz = self.quiz_batch()
            quiz_labels = quiz["labels"]
            quiz_inputs = {k: v for k, v in split_batch(quiz)[0].items() if k != "labels"}
            student.eval()
            try:
                leaves = [p.detach().requires_grad_(True) for p in lookahead_params]
                quiz_logits = functional_call(
                    student, dict(zip(names, leaves, strict=True)), kwargs=quiz_inputs
                ).logits
                quiz_loss = labelled_cross_entropy(quiz_logits, quiz_labels)
                direction = torch.autograd.grad(quiz_loss, leaves, allow_unused=True)
                direction = all_reduce_mean(
                    [torch.zeros_like(p) if d is None else d for p, d in zip(leaves, direction, strict=True)]
                )
                del leaves, quiz_logits, lookahead_params  # θs' is done with once v exists

                # 3. Per-sample influence, with the graph to the teacher's logits.
                if args.influence_mode == "finite_difference":
                    epsilon = fd_epsilon(direction, args.fd_radius)
                    with torch.no_grad():
                        logits_plus = self._functional_logits(
                            student, names, perturbed(params, direction, epsilon), features
                        )
                        logits_minus = self._functional_logits(
                            student, names, perturbed(params, direction, -epsilon), features
                        )
                    weights = finite_difference_influence(
                        self._influence_per_sample(logits_plus, teacher_logits),
                        self._influence_per_sample(logits_minus, teacher_logits),
                        epsilon,
                    )
                else:
                    detached = tuple(p.detach() for p in params)

                    def logits_at(*values: torch.Tensor) -> torch.Tensor:
                        return functional_call(
                            student, dict(zip(names, values, strict=True)), kwargs=features
                        ).logits

                    # The fused SDPA kernels support no forward-mode AD: the math backend, for this pass only.
                    with sdpa_kernel(SDPBackend.MATH):
                        logits_here, tangent = jvp(logits_at, detached, tuple(direction))
                    weights = exact_logit_influence(
                        self._influence_per_sample, logits_here, teacher_logits, tangent
                    )
            finally:
                student.train()

        # 4. The teacher's gradient: L_aux − λ · mean_i w_i, one backward through the one teacher forward.
        with record_function("lgtm.teacher_backward_and_step"):
            scale = (
                args.influence_scale
                if args.influence_scale is not None
                else self.teacher_lr_scheduler.get_last_lr()[0]
            )
            aux_loss = self._teacher_aux_loss(teacher_logits, student_logits.detach(), labels)
            influence_term = -scale * weights.mean()
            teacher_params = list(trainable_parameters(teacher).values())
            if self._is_logging_step():
                # Separate norms tell users whether the influence term matters at this λ (an extra backward on
                # logging steps only).
                aux_grads = torch.autograd.grad(
                    aux_loss, teacher_params, retain_graph=True, allow_unused=True
                )
                influence_grads = torch.autograd.grad(influence_term, teacher_params, allow_unused=True)
                self._record("teacher_grad_norm_aux", global_norm([g for g in aux_grads if g is not None]))
                self._record(
                    "teacher_grad_norm_influence", global_norm([g for g in influence_grads if g is not None])
                )
                for p, a, b in zip(teacher_params, aux_grads, influence_grads, strict=True):
                    if a is not None or b is not None:
                        p.grad = (a if a is not None else 0) + (b if b is not None else 0)
            else:
                (aux_loss + influence_term).backward()
            self.teacher_optimizer_step()

        w = weights.detach().float()
        self._record("influence_mean", w.mean())
        self._record("influence_std", w.std() if w.numel() > 1 else torch.zeros(()))
        self._record("influence_min", w.min())
        self._record("influence_max", w.max())
        self._record("influence_frac_negative", (w < 0).float().mean())
        self._record("quiz_loss", quiz_loss.detach())
        self._record("influence_scale", torch.tensor(float(scale)))
        self.latest_influence = {
            "step": self.state.global_step,
            "idx": row_ids,
            "influence": w,
            "student_gold_prob": _gold_prob(student_logits, labels),
            "teacher_gold_prob": None,  # filled from the soft labels the student's real step learns from
        }

    def teacher_logits(self, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> torch.Tensor:
        if self._pending_teacher_update is not None:  # pre_update: the one teacher forward of the step
            return self._pending_teacher_update[2].detach()
        logits = super().teacher_logits(student_inputs, teacher_inputs)
        record = self.latest_influence
        if record is not None and record["teacher_gold_prob"] is None and "labels" in student_inputs:
            record["teacher_gold_prob"] = _gold_prob(logits, student_inputs["labels"])
        return logits

    # ----- pieces -----------------------------------------------------------------------------------------------

    def _student_objective(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The student's training loss (as `compute_loss`), from logits."""
        distill, _ = self.distillation_term(student_logits, teacher_logits, {"labels": labels})
        task = labelled_cross_entropy(student_logits, labels, self.args.label_smoothing_factor)
        return self.args.alpha * distill + (1.0 - self.args.alpha) * task

    def _teacher_aux_loss(
        self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The online-distillation teacher loss α_t · KL(p_s ‖ p_t) + (1 − α_t) · CE (§3)."""
        args = self.args
        kl = kl_divergence(
            teacher_logits, student_logits, args.temperature, args.scale_by_temperature_squared
        )
        ce = labelled_cross_entropy(teacher_logits, labels)
        self._record("teacher_kl", kl.detach())
        self._record("teacher_task_loss", ce.detach())
        return args.teacher_alpha * kl + (1.0 - args.teacher_alpha) * ce

    def _influence_per_sample(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """ℓ_i whose student gradient, dotted with v, is sample i's influence."""
        args = self.args
        if args.influence_loss == "teacher_kl":
            # The reference's teacher-side loss: the student's outputs are the targets.
            return args.teacher_alpha * kl_divergence(
                teacher_logits,
                student_logits,
                args.temperature,
                args.scale_by_temperature_squared,
                reduction="none",
            )
        return args.alpha * distillation_loss(
            student_logits,
            teacher_logits,
            loss_type=args.distill_loss,
            temperature=args.temperature,
            scale_by_temperature_squared=args.scale_by_temperature_squared,
            jsd_beta=args.jsd_beta,
            dist_intra_weight=args.dist_intra_weight,
            reduction="none",
        )

    def _lookahead(self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """θs' after one student step, without touching the student or its optimizer."""
        # The clipping factor, applied one parameter at a time: no clipped copy of the whole gradient.
        coefficient = clip_coefficient(grads, self.args.max_grad_norm)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        updated = []
        for p, g in zip(params, grads, strict=True):
            group = group_of[id(p)]
            if coefficient is not None:
                g = g * coefficient
            if self.args.lookahead == "sgd":
                updated += sgd_lookahead([p], [g], group["lr"])
                continue
            updated += adamw_lookahead(
                [p],
                [g],
                [optimizer.state.get(p, {})],
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
        return updated

    @staticmethod
    def _functional_logits(
        student: nn.Module, names: tuple[str, ...], values: list[torch.Tensor], features: dict
    ) -> torch.Tensor:
        return functional_call(student, dict(zip(names, values, strict=True)), kwargs=features).logits

    def _is_logging_step(self) -> bool:
        steps = self.args.logging_steps
        steps = (
            max(1, int(steps * self.state.max_steps))
            if isinstance(steps, float) and steps < 1
            else int(steps)
        )
        return self.args.logging_strategy == "steps" and (self.state.global_step + 1) % steps == 0


def _gold_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's probability of its gold label (NaN for a row labelled -100, which has none)."""
    labelled = labels.ne(-100)
    probs = logits.detach().float().softmax(-1).gather(1, labels.clamp_min(0).view(-1, 1)).squeeze(1)
    return probs.masked_fill(~labelled, float("nan"))
