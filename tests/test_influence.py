"""Influence functions against slow, obviously-correct autograd computations (float64 tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import tiny_classifier
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_distill.losses.influence import (
    adamw_lookahead,
    clip_coefficient,
    exact_logit_influence,
    fd_epsilon,
    finite_difference_influence,
    influence_sample_weights,
    perturbed,
    ratio_influence_scale,
    sgd_lookahead,
)
from hf_distill.losses.objectives import kl_divergence


def per_sample_teacher_kl(student_logits, teacher_logits):
    """The reference's influence loss ℓ_i = KL(p_s ‖ p_t), τ = 1."""
    return kl_divergence(teacher_logits, student_logits, temperature=1.0, reduction="none")


@pytest.fixture
def setting():
    torch.manual_seed(0)
    student = tiny_classifier(1, seed=2, attn_implementation="eager").double().eval()
    teacher = tiny_classifier(2, seed=1, attn_implementation="eager").double().eval()
    inputs = {"input_ids": torch.randint(5, 64, (6, 9)), "attention_mask": torch.ones(6, 9, dtype=torch.long)}
    names, params = zip(*[(n, p) for n, p in student.named_parameters()], strict=True)
    direction = [torch.randn_like(p) * 0.1 for p in params]
    return student, teacher, inputs, names, params, direction


def student_logits_at(student, names, values, inputs):
    return functional_call(student, dict(zip(names, values, strict=True)), kwargs=inputs).logits


def slow_per_sample_weights(student, teacher, inputs, names, params, direction):
    """w_i = ∇θs ℓ_i · v, one autograd gradient per sample."""
    with torch.no_grad():
        z_t = teacher(**inputs).logits
    weights = []
    for i in range(inputs["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = per_sample_teacher_kl(student_logits_at(student, names, leaves, row), z_t[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, leaves)
        weights.append(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
    return torch.stack(weights)


def test_per_sample_weights_fd_and_jvp_match_a_loop_over_samples(setting):
    student, teacher, inputs, names, params, direction = setting
    expected = slow_per_sample_weights(student, teacher, inputs, names, params, direction)
    with torch.no_grad():
        z_t = teacher(**inputs).logits

    epsilon = fd_epsilon(direction, radius=0.01)
    with torch.no_grad():
        plus = student_logits_at(student, names, perturbed(params, direction, epsilon), inputs)
        minus = student_logits_at(student, names, perturbed(params, direction, -epsilon), inputs)
    fd = finite_difference_influence(
        per_sample_teacher_kl(plus, z_t), per_sample_teacher_kl(minus, z_t), epsilon
    )
    # A central difference at r = 0.01 is accurate to O(ε²): within a few tenths of a percent here.
    torch.testing.assert_close(fd, expected, rtol=5e-3, atol=1e-9)
    assert torch.corrcoef(torch.stack([fd, expected]))[0, 1] > 0.9999

    with sdpa_kernel(SDPBackend.MATH):
        z_s, tangent = jvp(
            lambda *v: student_logits_at(student, names, v, inputs),
            tuple(p.detach() for p in params),
            tuple(direction),
        )
    exact = exact_logit_influence(per_sample_teacher_kl, z_s, z_t, tangent)
    torch.testing.assert_close(exact, expected, rtol=1e-9, atol=1e-12)


def test_teacher_gradient_fd_vs_double_backward(setting):
    """∇θt Σ_i w_i: FD and the logit-level exact form vs a full double backward through the student."""
    student, teacher, inputs, names, params, direction = setting
    teacher_params = list(teacher.parameters())

    # Slow and obviously correct: ∇θt [∇θs ℓ · v], create_graph through the whole student.
    leaves = [p.detach().requires_grad_(True) for p in params]
    loss = per_sample_teacher_kl(
        student_logits_at(student, names, leaves, inputs), teacher(**inputs).logits
    ).sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    inner = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    reference = torch.autograd.grad(inner, teacher_params)

    epsilon = fd_epsilon(direction, radius=0.01)
    z_t = teacher(**inputs).logits
    with torch.no_grad():
        plus = student_logits_at(student, names, perturbed(params, direction, epsilon), inputs)
        minus = student_logits_at(student, names, perturbed(params, direction, -epsilon), inputs)
    fd_weights = finite_difference_influence(
        per_sample_teacher_kl(plus, z_t), per_sample_teacher_kl(minus, z_t), epsilon
    )
    fd_grads = torch.autograd.grad(fd_weights.sum(), teacher_params)

    with sdpa_kernel(SDPBackend.MATH):
        z_s, tangent = jvp(
            lambda *v: student_logits_at(student, names, v, inputs),
            tuple(p.detach() for p in params),
            tuple(direction),
        )
    exact_grads = torch.autograd.grad(
        exact_logit_influence(per_sample_teacher_kl, z_s, teacher(**inputs).logits, tangent).sum(),
        teacher_params,
    )

    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    ref, fd, ex = flat(reference), flat(fd_grads), flat(exact_grads)
    assert torch.nn.functional.cosine_similarity(fd, ref, dim=0) > 0.99
    assert (fd - ref).norm() / ref.norm() < 1e-3
    torch.testing.assert_close(ex, ref, rtol=1e-8, atol=1e-12)


def test_adamw_lookahead_equals_a_real_optimizer_step():
    model = tiny_classifier(1, seed=3)
    groups = [
        {"params": [p for n, p in model.named_parameters() if "bias" not in n], "weight_decay": 0.1},
        {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.99), eps=1e-7)
    inputs = {"input_ids": torch.randint(5, 64, (4, 7)), "labels": torch.tensor([0, 1, 1, 0])}
    for _ in range(3):  # build real moment estimates first
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model(**inputs).loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad.clone() for p in params]
    predicted = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            predicted += adamw_lookahead(
                [p],
                [p.grad],
                [optimizer.state[p]],
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
    state_before = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    for p, q in zip(params, predicted, strict=True):
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
    # A fresh optimizer (empty state) is the first step.
    fresh = torch.optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], lr=1e-3)
    fresh.param_groups[0]["params"][0].grad = grads[0]
    first = adamw_lookahead(
        fresh.param_groups[0]["params"], [grads[0]], [{}], 1e-3, (0.9, 0.999), 1e-8, 0.01
    )[0]
    fresh.step()
    torch.testing.assert_close(first, fresh.param_groups[0]["params"][0].detach(), rtol=1e-6, atol=1e-7)
    assert state_before["state"][0]["step"] == 3  # the lookahead itself never advanced the state


def test_sgd_lookahead_and_clipping():
    params = [torch.ones(3), torch.zeros(2)]
    grads = [torch.full((3,), 3.0), torch.full((2,), 4.0)]
    stepped = sgd_lookahead(params, grads, lr=0.5)
    torch.testing.assert_close(stepped[0], torch.full((3,), -0.5))
    coefficient = clip_coefficient(grads, max_norm=1.0)
    clipped = [g * coefficient for g in grads]
    norm = torch.sqrt(sum((g**2).sum() for g in clipped))
    assert norm == pytest.approx(1.0, rel=1e-5)
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    for p, g in zip(parameters, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    for p, g in zip(parameters, clipped, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert clip_coefficient(grads, 0.0) is None  # no clipping
    assert clip_coefficient([torch.tensor([0.1])], 1.0) == 1.0  # below the bound: unchanged


def test_fd_epsilon_is_radius_over_norm():
    assert fd_epsilon([torch.tensor([3.0]), torch.tensor([4.0])], 0.01) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="quiz gradient v is zero"):
        fd_epsilon([torch.zeros(3)], 0.01)


# ----- the sample-weights form and the ratio scale -------------------------------------------------------------


def slow_sample_weights(w: list[float], beta: float) -> list[float]:
    n = len(w)
    mean = sum(w) / n
    std = (sum((x - mean) ** 2 for x in w) / (n - 1)) ** 0.5
    raw = [max(0.0, 1 + beta * (x - mean) / std) for x in w]
    return [r * n / sum(raw) for r in raw]


def test_sample_weights_follow_the_standardised_influence_with_mean_one():
    w = [3e-4, -1e-4, 5e-5, -6e-4, 2e-4, 0.0]
    weights = influence_sample_weights(torch.tensor(w), beta=1.0)
    torch.testing.assert_close(weights, torch.tensor(slow_sample_weights(w, 1.0)))
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[3].item() == 0.0  # 1.9 standard deviations below the mean: no weight at β = 1
    assert weights.argmax().item() == 0  # the most helpful sample weighs most
    # Only the ranking inside the batch matters, not the influence's units.
    torch.testing.assert_close(influence_sample_weights(torch.tensor(w) * 1e5, beta=1.0), weights)


@pytest.mark.parametrize(
    ("w", "beta"),
    [([0.1, -0.2, 0.3], 0.0), ([0.2, 0.2, 0.2], 1.0), ([0.5], 1.0)],
    ids=["beta0", "same", "one"],
)
def test_sample_weights_are_online_distillation_when_nothing_distinguishes_samples(w, beta):
    assert torch.equal(influence_sample_weights(torch.tensor(w), beta), torch.ones(len(w)))


def test_sample_weights_are_detached_and_refuse_a_negative_beta():
    w = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    assert not influence_sample_weights(w * 2, 0.5).requires_grad
    with pytest.raises(ValueError, match="beta must be >= 0"):
        influence_sample_weights(w, -1.0)


def test_ratio_scale_sets_the_influence_gradient_norm():
    assert ratio_influence_scale(aux_norm=2.0, influence_norm=1e-4, ratio=0.5) == pytest.approx(1e4)
    assert ratio_influence_scale(aux_norm=2.0, influence_norm=0.0, ratio=0.5) == 0.0
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        ratio_influence_scale(1.0, 1.0, -0.1)
