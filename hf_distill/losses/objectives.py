"""Distillation objectives: pure functions of student and teacher logits.

Every function takes logits of shape ``(N, C)`` (N samples or token positions, C classes), computes in
float32 whatever the input dtype, and reduces over N with ``reduction`` in {"mean", "sum", "none"}.
Definitions: https://hf-distill.readthedocs.io/algorithms/, "Distillation objectives". `DISTILL_LOSS_REGISTRY` names each loss with
the properties its callers need (`register_distill_loss` adds one); `DistillationObjective` is a loss with
its settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision logits are upcast, float64 ones are kept."""
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape: teacher and student must predict the same label set."
        )
    if student_logits.dim() != 2:
        raise ValueError(
            f"Objectives take (N, C) logits; got {student_logits.dim()} dimensions. Flatten token positions first."
        )


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hinton KD: ``τ² · KL(p_t ‖ p_s)`` with ``p = softmax(z / τ)``.

    The τ² factor keeps the gradient scale constant across temperatures (Hinton et al. 2015).
    """
    _check_shapes(student_logits, teacher_logits)
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if scale_by_temperature_squared:
        per_sample = per_sample * temperature**2
    return _reduce(per_sample, reduction)


def reverse_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL: ``τ² · KL(p_s ‖ p_t)`` (mode-seeking)."""
    return kl_divergence(teacher_logits, student_logits, temperature, scale_by_temperature_squared, reduction)


def logit_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Logit matching: mean over classes of ``(z_s − z_t)²`` (the high-temperature limit of KD)."""
    _check_shapes(student_logits, teacher_logits)
    per_sample = (_upcast(student_logits) - _upcast(teacher_logits)).pow(2).mean(-1)
    return _reduce(per_sample, reduction)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (Agarwal et al. 2024, as in TRL's GKD).

    ``β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m)`` with ``m = β·p_t + (1−β)·p_s``; β = 0 is forward KL(p_t ‖ p_s)
    and β = 1 is reverse KL(p_s ‖ p_t), exactly, as in TRL. The mixture is formed in log space with
    logsumexp, so identical or extreme logits give no NaN gradient.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}.")
    if beta == 0.0:
        return kl_divergence(
            student_logits, teacher_logits, temperature, scale_by_temperature_squared, reduction
        )
    if beta == 1.0:
        return reverse_kl_divergence(
            student_logits, teacher_logits, temperature, scale_by_temperature_squared, reduction
        )
    _check_shapes(student_logits, teacher_logits)
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    beta_t = torch.tensor(beta, dtype=log_p_s.dtype, device=log_p_s.device)
    log_m = torch.logsumexp(torch.stack([log_p_t + torch.log(beta_t), log_p_s + torch.log1p(-beta_t)]), dim=0)
    kl_t_m = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s_m = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    per_sample = beta * kl_t_m + (1.0 - beta) * kl_s_m
    if scale_by_temperature_squared:
        per_sample = per_sample * temperature**2
    return _reduce(per_sample, reduction)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    intra_weight: float = 1.0,
    scale_by_temperature_squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """DIST (Huang et al. 2022): relation matching by Pearson correlation.

    ``inter = 1 − Pearson(p_s[i], p_t[i])`` across classes for each sample, and
    ``intra = 1 − Pearson(p_s[:, c], p_t[:, c])`` across the batch for each class; the loss is
    ``τ²·(mean(inter) + intra_weight·mean(intra))``. The intra term is a property of the whole batch,
    so ``reduction="none"`` is only defined with ``intra_weight=0``; ``"sum"`` returns N × the mean.
    """
    _check_shapes(student_logits, teacher_logits)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    p_s = F.softmax(_upcast(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_upcast(teacher_logits) / temperature, dim=-1)
    inter = 1.0 - _pearson_rows(p_s, p_t)
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    if reduction == "none":
        if intra_weight != 0.0:
            raise ValueError(
                "dist_loss has no per-sample value when intra_weight != 0 (the intra term is a batch "
                "correlation); use reduction='mean' or set intra_weight=0."
            )
        return scale * inter
    loss = inter.mean()
    if intra_weight != 0.0 and p_s.shape[0] > 1:
        intra = 1.0 - _pearson_rows(p_s.t(), p_t.t())
        loss = loss + intra_weight * intra.mean()
    loss = scale * loss
    return loss * p_s.shape[0] if reduction == "sum" else loss


# The signature of a registered loss: (student_logits, teacher_logits, objective, reduction) -> loss.
DistillLossFunction = Callable[[torch.Tensor, torch.Tensor, "DistillationObjective", str], torch.Tensor]


@dataclass(frozen=True)
class DistillLoss:
    """One entry of the loss registry: the function and the properties its callers need.

    ``compute(student_logits, teacher_logits, objective, reduction)`` reads its settings from a
    `DistillationObjective`. ``uses_temperature``: the loss softens both distributions by τ (``mse`` compares
    raw logits). ``compares_logits``: the loss matches logits rather than distributions, so an ensemble's
    target is the average of its logits. ``batch_term_weight``: the name of the setting that weights a term
    defined over the whole batch (the loss has a per-sample value only when that weight is 0).
    ``settings``: the `DistillationObjective` settings of this loss alone (beside the temperature).
    """

    name: str
    compute: DistillLossFunction
    uses_temperature: bool = True
    compares_logits: bool = False
    batch_term_weight: str | None = None
    settings: tuple[str, ...] = ()


DISTILL_LOSS_REGISTRY: dict[str, DistillLoss] = {}


@dataclass(frozen=True)
class DistillationObjective:
    """A distillation loss with its settings, called as ``objective(student_logits, teacher_logits, reduction)``."""

    loss: str = "kl"
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    jsd_beta: float = 0.5
    dist_intra_weight: float = 1.0

    @classmethod
    def from_args(cls, args: Any) -> DistillationObjective:
        """The objective a `DistillationTrainingArguments` describes."""
        return cls(
            args.distill_loss,
            args.temperature,
            args.scale_by_temperature_squared,
            args.jsd_beta,
            args.dist_intra_weight,
        )

    @property
    def entry(self) -> DistillLoss:
        return distill_loss_entry(self.loss)

    @property
    def is_per_sample(self) -> bool:
        """Whether the loss has a value per sample (``reduction="none"``) with these settings."""
        weight = self.entry.batch_term_weight
        return weight is None or getattr(self, weight) == 0

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return self.entry.compute(student_logits, teacher_logits, self, reduction)


_OBJECTIVE_SETTINGS = tuple(f.name for f in fields(DistillationObjective) if f.name != "loss")


def register_distill_loss(
    name: str,
    *,
    uses_temperature: bool = True,
    compares_logits: bool = False,
    batch_term_weight: str | None = None,
    settings: Sequence[str] = (),
) -> Callable[[DistillLossFunction], DistillLossFunction]:
    """Register the decorated function as the distillation loss ``name`` (``distill_loss=name``).

    The function is called as ``fn(student_logits, teacher_logits, objective, reduction)``: ``(N, C)``
    logits, the `DistillationObjective` holding the settings (``objective.temperature``,
    ``objective.scale_by_temperature_squared``, ...), and ``reduction`` in {"mean", "sum", "none"}
    (token-level tasks call it with "sum"). It is returned unchanged. Register before building the
    arguments: `DistillationTrainingArguments` accepts the names registered when it is created.

    Args:
        name: The value of ``distill_loss`` that selects the loss; a name can be registered once.
        uses_temperature: Whether the loss softens both distributions by the temperature.
        compares_logits: Whether the loss matches logits rather than distributions (several teachers'
            target is then the average of their logits, not of their distributions).
        batch_term_weight: The setting that weights a term defined over the whole batch, if any: the
            loss has a per-sample value only when that setting is 0.
        settings: The `DistillationObjective` settings that belong to this loss alone.

    Example:
        ```python
        import torch.nn.functional as F
        from hf_distill import DistillationTrainingArguments, register_distill_loss

        @register_distill_loss("cosine", uses_temperature=False, compares_logits=True)
        def cosine_logit_loss(student_logits, teacher_logits, objective, reduction):
            per_sample = 1 - F.cosine_similarity(student_logits.float(), teacher_logits.float(), dim=-1)
            if reduction == "none":
                return per_sample
            return per_sample.sum() if reduction == "sum" else per_sample.mean()

        args = DistillationTrainingArguments("out", distill_loss="cosine")
        ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A distillation loss needs a non-empty string name, got {name!r}.")
    settings = tuple(settings)
    unknown = [s for s in (*settings, batch_term_weight) if s is not None and s not in _OBJECTIVE_SETTINGS]
    if unknown:
        raise ValueError(
            f"register_distill_loss({name!r}): unknown settings {unknown}; a loss reads the settings of "
            f"DistillationObjective, one of {_OBJECTIVE_SETTINGS}."
        )

    def register(fn: DistillLossFunction) -> DistillLossFunction:
        if not callable(fn):
            raise TypeError(f"register_distill_loss({name!r}) decorates a function, got {fn!r}.")
        if name in DISTILL_LOSS_REGISTRY:
            existing = DISTILL_LOSS_REGISTRY[name].compute
            raise ValueError(
                f"A distillation loss named {name!r} is already registered "
                f"({getattr(existing, '__qualname__', existing)}); register yours under another name."
            )
        DISTILL_LOSS_REGISTRY[name] = DistillLoss(
            name, fn, uses_temperature, compares_logits, batch_term_weight, settings
        )
        return fn

    return register


@register_distill_loss("kl")
def _kl_loss(s: torch.Tensor, t: torch.Tensor, o: DistillationObjective, r: str) -> torch.Tensor:
    return kl_divergence(s, t, o.temperature, o.scale_by_temperature_squared, r)


@register_distill_loss("mse", uses_temperature=False, compares_logits=True)
def _mse_loss(s: torch.Tensor, t: torch.Tensor, o: DistillationObjective, r: str) -> torch.Tensor:
    return logit_mse(s, t, r)


@register_distill_loss("dist", batch_term_weight="dist_intra_weight", settings=("dist_intra_weight",))
def _dist_loss(s: torch.Tensor, t: torch.Tensor, o: DistillationObjective, r: str) -> torch.Tensor:
    return dist_loss(s, t, o.temperature, o.dist_intra_weight, o.scale_by_temperature_squared, r)


@register_distill_loss("jsd", settings=("jsd_beta",))
def _jsd_loss(s: torch.Tensor, t: torch.Tensor, o: DistillationObjective, r: str) -> torch.Tensor:
    return generalized_jsd(s, t, o.jsd_beta, o.temperature, o.scale_by_temperature_squared, r)


@register_distill_loss("reverse_kl")
def _reverse_kl_loss(s: torch.Tensor, t: torch.Tensor, o: DistillationObjective, r: str) -> torch.Tensor:
    return reverse_kl_divergence(s, t, o.temperature, o.scale_by_temperature_squared, r)


# The losses that ship (`registered_distill_losses` adds those registered since).
DISTILL_LOSSES = tuple(DISTILL_LOSS_REGISTRY)
# Settings that belong to one loss only (a model card leaves out those of the other losses).
LOSS_SPECIFIC_SETTINGS = tuple(name for entry in DISTILL_LOSS_REGISTRY.values() for name in entry.settings)


def registered_distill_losses() -> tuple[str, ...]:
    """The names ``distill_loss`` accepts now: the shipped losses and those registered since."""
    return tuple(DISTILL_LOSS_REGISTRY)


def distill_loss_entry(name: str) -> DistillLoss:
    """The registry entry of the loss ``name``, or a clear error naming the choices."""
    try:
        return DISTILL_LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown distillation loss {name!r}; choose one of {registered_distill_losses()}, or register "
            "yours with hf_distill.register_distill_loss."
        ) from None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "kl",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    jsd_beta: float = 0.5,
    dist_intra_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The objective named ``loss_type`` (a registered loss, see `registered_distill_losses`)."""
    objective = DistillationObjective(
        loss_type, temperature, scale_by_temperature_squared, jsd_beta, dist_intra_weight
    )
    return objective(student_logits, teacher_logits, reduction)


def online_teacher_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_alpha: float,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    task_loss: torch.Tensor | None = None,
    regression: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a teacher that learns from its student: ``α_t · KL(p_s ‖ p_t) + (1 − α_t) · task_loss``.

    The student's logits are targets (detached); a regression head matches the student's prediction
    (`logit_mse`) instead. ``task_loss=None`` leaves the task term out. Returns the loss and the divergence
    (for the logs). Used by online distillation and as LGTM's auxiliary teacher loss (https://hf-distill.readthedocs.io/algorithms/).
    """
    student_logits = student_logits.detach()
    if regression:
        divergence = logit_mse(teacher_logits, student_logits)
    else:
        divergence = kl_divergence(teacher_logits, student_logits, temperature, scale_by_temperature_squared)
    loss = teacher_alpha * divergence
    if task_loss is not None:
        loss = loss + (1.0 - teacher_alpha) * task_loss
    return loss, divergence


def ensemble_teacher_logits(
    teacher_logits: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    average: str = "probs",
) -> torch.Tensor:
    """Combine several teachers' logits into one target.

    ``average="probs"``: the weighted average of the softened distributions ``Σ_k w_k softmax(z_k/τ)``,
    returned as logits ``τ · log p_mix`` so that ``softmax(result / τ)`` is exactly that mixture and any
    objective above can consume it. ``average="logits"``: the weighted average of the raw logits (for
    logit matching and regression, where a mixture of distributions means nothing).
    Weights are normalised to sum to one.
    """
    if len(teacher_logits) == 0:
        raise ValueError("ensemble_teacher_logits needs at least one teacher's logits.")
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits):
        raise ValueError(f"Got {len(weights)} teacher weights for {len(teacher_logits)} teachers.")
    w = torch.tensor(weights, dtype=torch.float32, device=teacher_logits[0].device)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"Teacher weights must be non-negative with a positive sum, got {list(weights)}.")
    w = w / w.sum()
    stacked = torch.stack([_upcast(z) for z in teacher_logits])  # (K, ..., C)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    if average == "logits":
        return (w * stacked).sum(0)
    if average == "probs":
        log_p = F.log_softmax(stacked / temperature, dim=-1) + torch.log(w.clamp_min(1e-30))
        return temperature * torch.logsumexp(log_p, dim=0)
    raise ValueError(f"average must be 'probs' or 'logits', got {average!r}.")


def token_mask(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shift: bool
) -> torch.Tensor | None:
    """Positions of a token-level batch that count in the loss: label != -100 (after the causal shift).

    Without labels, every attended position counts; with neither, ``None`` (all positions).
    """
    if labels is not None:
        mask = labels != -100
        return mask[:, 1:] if shift else mask
    if attention_mask is not None:
        mask = attention_mask.bool()
        return mask[:, 1:] if shift else mask
    return None


def aligned_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shift: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) student and teacher logits of the positions that count.

    Sequence-level ``(B, C)`` logits pass through; token-level ``(B, T, C)`` ones keep the positions of
    `token_mask` (after the causal shift when ``shift``). Teacher logits of another length (cached for
    another padding) are cut or zero-padded to the student's.
    """
    teacher_logits = teacher_logits.to(student_logits.device)
    if student_logits.dim() == 2:
        return student_logits, teacher_logits
    length, current = student_logits.shape[1], teacher_logits.shape[1]
    if current > length:
        teacher_logits = teacher_logits[:, :length]
    elif current < length:
        teacher_logits = F.pad(teacher_logits, [0, 0, 0, length - current])
    if shift:
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
    mask = token_mask(labels, attention_mask, shift)
    if mask is None:
        return student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)
    return student_logits[mask], teacher_logits[mask]


def labelled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over the rows whose label is not -100 (as `Trainer`'s losses), in float32.

    Unlike ``F.cross_entropy``'s mean, a batch whose every label is -100 gives 0 (graph kept), not NaN.
    """
    summed = torch.nn.functional.cross_entropy(
        logits.float(), labels, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing
    )
    return summed / labels.ne(-100).sum().clamp_min(1)
