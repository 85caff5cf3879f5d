"""Arguments of `LGTMTrainer`: quiz data, the online teacher loss, and the distillation influence."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.objectives import DISTILL_LOSS_REGISTRY, DistillationObjective
from ..safety.validation import check_finite
from .online_config import OnlineDistillTrainingArguments
from .quiz_config import QuizDistillTrainingArguments

INFLUENCE_FORMS = ("meta_gradient", "sample_weights")
INFLUENCE_MODES = ("finite_difference", "exact")
INFLUENCE_LOSSES = ("teacher_kl", "student_kl")
LOOKAHEADS = ("optimizer", "sgd")
STUDENT_TARGETS = ("updated", "pre_update")


@dataclass
class LGTMTrainingArguments(QuizDistillTrainingArguments, OnlineDistillTrainingArguments):
    """Quiz arguments, the online teacher loss's ``teacher_alpha`` (LGTM's auxiliary teacher loss), and the
    distillation-influence settings.

    Args:
        influence_form (`str`, defaults to `'meta_gradient'`):
            How the influence reaches the teacher. meta_gradient: the reference's; the teacher's loss is
            L_aux − λ · mean_i w_i, differentiated through the teacher (at λ = the teacher's learning rate the term
            is 10⁻⁵–10⁻⁴ of L_aux's gradient: online distillation in practice). sample_weights: the paper's
            description; the influence weights ŵ (detached, see ``influence_weight_beta``) weight each sample's
            distillation term of L_aux; ŵ = 1 is online distillation. No extra pass.
        influence_weight_beta (`float`, defaults to `1.0`):
            sample_weights form: ŵ_i = max(0, 1 + β · standardised w_i), rescaled to mean 1 over the batch.
        influence_grad_ratio (`float | None`, defaults to `None`):
            meta_gradient form: choose λ every step so that ‖λ · ∇ influence‖ = ratio · ‖∇ L_aux‖ (replaces
            ``influence_scale``; one more teacher backward per step).
        influence_mode (`str`, defaults to `'finite_difference'`):
            finite_difference (the paper's FDA) or exact (forward-mode, no approximation).
        fd_radius (`float`, defaults to `0.01`):
            r in the finite-difference step ε = r / ‖v‖ (the reference's 0.01).
        influence_scale (`float | None`, defaults to `None`):
            λ, weight of the influence term in the teacher's loss (default: the teacher's current learning
            rate, as the reference).
        influence_loss (`str`, defaults to `'teacher_kl'`):
            Loss whose influence weights the teacher: teacher_kl = α_t·KL(p_s ‖ p_t) (the reference) or
            student_kl = the student's distillation loss (the exact meta-gradient's form).
        lookahead (`str`, defaults to `'optimizer'`):
            optimizer: replay the student's AdamW step (as the reference); sgd: θ − lr·g.
        lgtm_student_targets (`str`, defaults to `'updated'`):
            Soft labels of the student's real step. updated: from the teacher after its LGTM update (the
            paper); pre_update: the real step reuses the lookahead's gradient, computed with the teacher
            before its update (one teacher forward and one student backward fewer per step).

    Every argument of `QuizDistillTrainingArguments`, `OnlineDistillTrainingArguments` applies too.
    """

    influence_form: str = field(
        default="meta_gradient",
        metadata={
            "help": "How the influence reaches the teacher: meta_gradient (the reference: L_aux − λ·mean w, "
            "differentiated through the teacher) or sample_weights (the paper's text: detached, normalised "
            "weights on each sample's distillation term of L_aux; no extra pass).",
            "choices": INFLUENCE_FORMS,
        },
    )
    influence_weight_beta: float = field(
        default=1.0,
        metadata={
            "help": "sample_weights form: ŵ_i = max(0, 1 + β·standardised w_i), rescaled to mean 1 over the batch."
        },
    )
    influence_grad_ratio: float | None = field(
        default=None,
        metadata={
            "help": "meta_gradient form: set λ each step so that ‖λ·∇influence‖ = ratio·‖∇L_aux‖ (replaces "
            "influence_scale; one more teacher backward per step)."
        },
    )
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
        self._check_influence_form()
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
            and self.distill_loss in DISTILL_LOSS_REGISTRY
            and not DistillationObjective.from_args(self).is_per_sample
        ):
            weight = DISTILL_LOSS_REGISTRY[self.distill_loss].batch_term_weight
            raise ValueError(
                f"influence_loss='student_kl' needs a per-sample distillation loss, and "
                f"distill_loss={self.distill_loss!r} has a batch-level term; set {weight}=0 or use "
                "influence_loss='teacher_kl'."
            )
        super().__post_init__()
        if self.lgtm_student_targets == "pre_update" and self.uses_representations:
            raise ValueError(
                "lgtm_student_targets='pre_update' takes the student's soft labels from the teacher forward that "
                "the LGTM update differentiates, which computes no hidden states or attentions; use "
                "lgtm_student_targets='updated' with representation terms (or set their weights to 0)."
            )

    def _check_influence_form(self) -> None:
        if self.influence_form not in INFLUENCE_FORMS:
            raise ValueError(
                f"influence_form={self.influence_form!r} is unknown; choose one of {INFLUENCE_FORMS}."
            )
        check_finite(
            "influence_weight_beta", self.influence_weight_beta, 0, hint="0 gives online distillation."
        )
        if self.influence_grad_ratio is not None:
            check_finite("influence_grad_ratio", self.influence_grad_ratio, 0, low_open=True, hint="Or None.")
        if self.influence_form == "sample_weights" and (
            self.influence_scale is not None or self.influence_grad_ratio is not None
        ):
            raise ValueError(
                "influence_form='sample_weights' weights the teacher's per-sample loss and has no λ: drop "
                "influence_scale and influence_grad_ratio, or use influence_form='meta_gradient'."
            )
        if self.influence_scale is not None and self.influence_grad_ratio is not None:
            raise ValueError(
                "influence_scale and influence_grad_ratio both set λ: pass one (influence_grad_ratio chooses λ "
                "every step from the gradient norms)."
            )
