"""Distillation influence (https://hf-distill.readthedocs.io/algorithms/, "LGTM"): pure functions of tensors.

The influence of training sample i on the student's generalisation is ``w_i = ∇θs ℓ_i · v`` with ``v`` the
student's quiz gradient after a lookahead step. These functions compute the lookahead, the finite-difference
and the exact per-sample weights; the trainer wires them to models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def adamw_lookahead(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> list[torch.Tensor]:
    """The parameters one `torch.optim.AdamW` step would produce, without touching params or state.

    ``states`` are the optimizer's per-parameter states (``exp_avg``, ``exp_avg_sq``, ``step``; empty
    before the first step). Decoupled weight decay and bias correction exactly as torch's AdamW.
    """
    beta1, beta2 = betas
    updated = []
    for p, g, state in zip(params, grads, states, strict=True):
        p, g = p.detach(), g.detach()
        step = float(state["step"]) + 1.0 if "step" in state else 1.0
        # torch's own sequence of fused ops (lerp, addcmul, addcdiv), on fresh tensors instead of in place:
        # fewer passes over parameter-sized memory than the textbook formula.
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1) if "exp_avg" in state else g * (1 - beta1)
        if "exp_avg_sq" in state:
            exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, g, g, value=1 - beta2)
        else:
            exp_avg_sq = torch.mul(g, g).mul_(1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = exp_avg_sq.sqrt_().div_(bias_correction2**0.5).add_(eps)
        decayed = p * (1 - lr * weight_decay) if weight_decay else p
        updated.append(torch.addcdiv(decayed, exp_avg, denom, value=-lr / bias_correction1))
    return updated


def sgd_lookahead(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float
) -> list[torch.Tensor]:
    """``θ − lr · g`` for every parameter."""
    return [p.detach() - lr * g.detach() for p, g in zip(params, grads, strict=True)]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors taken together (`torch.nn.utils.get_total_norm`, at least in float32)."""
    return torch.nn.utils.get_total_norm([t.float() for t in tensors])


def clip_coefficient(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """The factor `torch.nn.utils.clip_grad_norm_` scales gradients by (``None`` when ``max_norm <= 0``).

    `torch.nn.utils.clip_grads_with_norm_` would scale the gradients in place; the lookahead must leave
    them untouched (they are the student's real gradients under ``pre_update``), so it takes the factor.
    """
    if max_norm <= 0:
        return None
    return (max_norm / (global_norm(grads) + 1e-6)).clamp(max=1.0)


def fd_epsilon(direction: Sequence[torch.Tensor], radius: float) -> float:
    """The finite-difference step ``ε = r / ‖v‖`` (the LGTM reference's choice, r = 0.01)."""
    norm = float(global_norm(direction))
    if norm == 0.0:
        raise ValueError("The quiz gradient v is zero, so the finite-difference step r/‖v‖ is undefined.")
    return radius / norm


def perturbed(
    params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], step: float
) -> list[torch.Tensor]:
    """``θ + step · v`` for every parameter."""
    return [p.detach() + step * d for p, d in zip(params, direction, strict=True)]


def finite_difference_influence(
    loss_plus: torch.Tensor, loss_minus: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Per-sample ``w_i ≈ [ℓ_i(θs + εv) − ℓ_i(θs − εv)] / (2ε)``; keeps the graph to the teacher."""
    return (loss_plus - loss_minus) / (2.0 * epsilon)


def exact_logit_influence(
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_logit_tangent: torch.Tensor,
) -> torch.Tensor:
    """Exact per-sample ``w_i = ∇θs ℓ_i · v``, with the graph to the teacher kept.

    By the chain rule ``∇θs ℓ_i · v = ⟨∂ℓ_i/∂z_s,i , (J_s v)_i⟩``: ``student_logit_tangent`` is the forward-mode
    product ``J_s v`` (one `torch.func.jvp` of the student), and ``∂ℓ_i/∂z_s`` is taken with
    ``create_graph=True`` at the logits, so the teacher gradient of Σ w_i is a double backward through the
    loss only, never through the student.
    """
    z_s = student_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = per_sample_loss(z_s, teacher_logits)
        (d_loss,) = torch.autograd.grad(losses.sum(), z_s, create_graph=True)
    return (d_loss * student_logit_tangent.detach()).sum(-1)


def influence_sample_weights(influence: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample weights of the teacher's distillation loss from the batch's influence ``w`` (detached).

    ``ŵ_i = max(0, 1 + β · (w_i − mean w) / std w)``, rescaled so that ``mean ŵ = 1``: only the ranking of the
    samples within the batch matters (``w``'s magnitude depends on the losses, the quiz gradient and the
    learning rate; a softmax of raw ``w`` would be uniform at small magnitudes and one-hot at large ones),
    and the teacher's distillation term keeps online distillation's size on average. A sample β⁻¹ standard
    deviations below the batch mean gets weight 0. All ones when ``β = 0``, for a single sample, or when every
    sample has the same influence: online distillation.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    w = influence.detach().float()
    if w.numel() < 2 or beta == 0:
        return torch.ones_like(w)
    std = w.std()
    if not std > 0:
        return torch.ones_like(w)
    raw = (1.0 + beta * (w - w.mean()) / std).clamp(min=0.0)
    return raw / raw.mean()  # raw's mean is >= 1 (clamping only raises values), never 0


def ratio_influence_scale(aux_norm: float, influence_norm: float, ratio: float) -> float:
    """λ with ``‖λ · g_influence‖ = ratio · ‖g_aux‖``; 0 when the influence gradient is 0."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}.")
    return ratio * aux_norm / influence_norm if influence_norm > 0 else 0.0
