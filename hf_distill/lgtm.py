"""LGTM (Ren et al., ACL 2023): the teacher's update is weighted by each sample's distillation influence.

shared/ALGORITHMS.md §5. One optimisation step:
1. lookahead θs' = one step of the student's optimizer on its loss at the current teacher (a functional
   step on a list of tensors: no copy of the student, its optimizer state untouched);
2. v = ∇θs' CE on a quiz batch;
3. per-sample influence w_i = ∇θs ℓ_i · v, by a central difference at θs ± εv (``finite_difference``) or
   exactly by one forward-mode product (``exact``); the teacher steps on ``L_aux − λ · mean_i w_i``, one
   teacher forward and one teacher backward serving both terms;
4. the student's real step on its loss against the updated teacher (done by the base trainer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import split_batch
from .influence import (
    adamw_lookahead,
    clip_by_global_norm,
    exact_logit_influence,
    fd_epsilon,
    finite_difference_influence,
    global_norm,
    perturbed,
    sgd_lookahead,
)
from .objectives import distillation_loss, kl_divergence
from .quiz import QuizDistillTrainer, QuizDistillTrainingArguments
from .teacher import SEQUENCE_CLASSIFICATION, all_reduce_mean, trainable_parameters

logger = logging.getLogger(__name__)

INFLUENCE_MODES = ("finite_difference", "exact")
INFLUENCE_LOSSES = ("teacher_kl", "student_kl")
LOOKAHEADS = ("optimizer", "sgd")


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
        if not self.fd_radius > 0:
            raise ValueError(f"fd_radius must be > 0, got {self.fd_radius} (the reference uses 0.01).")
        if self.influence_scale is not None and self.influence_scale < 0:
            raise ValueError(
                f"influence_scale must be >= 0 (or None for the teacher's learning rate), got {self.influence_scale}."
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


class LGTMTrainer(QuizDistillTrainer):
    """LGTM: the teacher learns from the student's quiz loss, weighting each sample by its influence.

    ``LGTMTrainer(model=student, teacher_model=teacher, args=LGTMTrainingArguments(...), train_dataset=...,
    eval_dataset=..., quiz_dataset=None)``. After every step ``trainer.latest_influence`` holds the batch's
    per-sample weights with their dataset row ids (``idx``), and the training logs hold their summary.
    """

    method_name = "lgtm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.latest_influence: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)
        if self._student_task != SEQUENCE_CLASSIFICATION or self._is_regression():
            raise ValueError(
                "LGTMTrainer supports single-label sequence classification (the paper's GLUE setting); for "
                "regression or token-level tasks use OnlineDistillTrainer or DistillationTrainer."
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "LGTMTrainer's lookahead is one student step on one batch: use gradient_accumulation_steps=1 "
                "(raise per_device_train_batch_size instead)."
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
        if self._step_micro_batches is None:
            return
        self._step_micro_batches = None
        self.lgtm_teacher_update(model, inputs, student_outputs.logits)

    def lgtm_teacher_update(
        self, model: nn.Module, inputs: dict[str, Any], student_logits: torch.Tensor
    ) -> None:
        """Steps 1–3 of the LGTM step; ``student_logits`` still carry the student's graph."""
        args = self.args
        student = self.accelerator.unwrap_model(model)
        names, params = zip(*trainable_parameters(student).items(), strict=True)
        student_inputs, teacher_inputs, _, row_ids = split_batch(inputs)
        labels = student_inputs["labels"]
        features = {k: v for k, v in student_inputs.items() if k != "labels"}
        teacher = self.teacher_models[0]
        teacher.train()

        # The one teacher forward of the step: L_aux and both influence terms differentiate through it.
        accepted = self._teacher_arg_names[0]
        teacher_logits = teacher(
            **{k: v for k, v in (teacher_inputs or features).items() if k in accepted}
        ).logits

        # 1. Lookahead: the student's gradient at the current teacher, through the step's own forward.
        lookahead_loss = self._student_objective(student_logits, teacher_logits.detach(), labels)
        grads = torch.autograd.grad(lookahead_loss, params, retain_graph=True, allow_unused=True)
        grads = all_reduce_mean(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
        lookahead_params = self._lookahead(params, grads)

        # 2. v: the quiz gradient at θs'. Influence passes run without dropout so θs' and θs± see one network.
        quiz = self.quiz_batch()
        quiz_labels = quiz["labels"]
        quiz_inputs = {k: v for k, v in split_batch(quiz)[0].items() if k != "labels"}
        student.eval()
        try:
            leaves = [p.detach().requires_grad_(True) for p in lookahead_params]
            quiz_logits = functional_call(
                student, dict(zip(names, leaves, strict=True)), kwargs=quiz_inputs
            ).logits
            quiz_loss = F.cross_entropy(quiz_logits.float(), quiz_labels)
            direction = torch.autograd.grad(quiz_loss, leaves, allow_unused=True)
            direction = all_reduce_mean(
                [torch.zeros_like(p) if d is None else d for p, d in zip(leaves, direction, strict=True)]
            )
            del leaves, quiz_logits

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
            aux_grads = torch.autograd.grad(aux_loss, teacher_params, retain_graph=True, allow_unused=True)
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
        gold = labels.view(-1, 1)
        self.latest_influence = {
            "step": self.state.global_step,
            "idx": row_ids,
            "influence": w,
            "student_gold_prob": student_logits.detach().float().softmax(-1).gather(1, gold).squeeze(1),
            "teacher_gold_prob": None,  # filled from the updated teacher's soft labels, just below
        }

    def teacher_logits(self, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> torch.Tensor:
        logits = super().teacher_logits(student_inputs, teacher_inputs)
        record = self.latest_influence
        if record is not None and record["teacher_gold_prob"] is None and "labels" in student_inputs:
            gold = student_inputs["labels"].view(-1, 1)
            record["teacher_gold_prob"] = logits.detach().float().softmax(-1).gather(1, gold).squeeze(1)
        return logits

    # ----- pieces -----------------------------------------------------------------------------------------------

    def _student_objective(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The student's training loss (as `compute_loss`), from logits."""
        distill, _ = self.distillation_term(student_logits, teacher_logits, {"labels": labels})
        task = F.cross_entropy(
            student_logits.float(), labels, label_smoothing=self.args.label_smoothing_factor
        )
        return self.args.alpha * distill + (1.0 - self.args.alpha) * task

    def _teacher_aux_loss(
        self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The online-distillation teacher loss α_t · KL(p_s ‖ p_t) + (1 − α_t) · CE (§3)."""
        args = self.args
        kl = kl_divergence(
            teacher_logits, student_logits, args.temperature, args.scale_by_temperature_squared
        )
        ce = F.cross_entropy(teacher_logits.float(), labels)
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
        grads = clip_by_global_norm(grads, self.args.max_grad_norm)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        if self.args.lookahead == "sgd":
            return [
                sgd_lookahead([p], [g], group_of[id(p)]["lr"])[0] for p, g in zip(params, grads, strict=True)
            ]
        updated = []
        for p, g in zip(params, grads, strict=True):
            group = group_of[id(p)]
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
