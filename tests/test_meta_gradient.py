"""hf_distill.meta_gradient: the differentiable pilot step and the meta-gradient against closed forms."""

from __future__ import annotations

import pytest
import torch
from testing_utils import tiny_classifier

from hf_distill.losses.meta_gradient import check_second_order_support, meta_gradient, pilot_step


def quadratic_pilot(eta: float):
    """L(θ, t) = ½‖θ − t‖², so θ' = θ − η(θ − t) and ∂θ'/∂t = η·I."""
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    loss = 0.5 * (theta - teacher).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    return theta, teacher, pilot_step([theta], [grad], eta)


def test_pilot_step_is_a_plain_gradient_step_that_keeps_the_graph():
    theta, teacher, (pilot,) = quadratic_pilot(0.25)
    expected = theta.detach() - 0.25 * (theta.detach() - teacher.detach())
    torch.testing.assert_close(pilot.detach(), expected)
    (d_teacher,) = torch.autograd.grad(pilot.sum(), teacher)
    torch.testing.assert_close(d_teacher, torch.full((3,), 0.25, dtype=torch.float64))


def test_meta_gradient_is_the_chain_rule_through_the_pilot():
    eta = 0.25
    theta, teacher, pilot = quadratic_pilot(eta)
    target = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    quiz_grad = [pilot[0].detach() - target]  # Q(θ') = ½‖θ' − y‖²: v = θ' − y
    (got,) = meta_gradient(pilot, quiz_grad, [teacher])
    torch.testing.assert_close(got, eta * quiz_grad[0])  # ∂Q/∂t = (∂θ'/∂t)ᵀ v = η v
    assert theta.grad is None  # the student's .grad is never touched


def test_meta_gradient_adds_weighted_extra_losses_and_leaves_unused_parameters_none():
    _, teacher, pilot = quadratic_pilot(0.5)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    extra = (teacher.pow(2).sum(), 3.0)  # weight 3: adds 3 · 2t
    got_teacher, got_unused = meta_gradient(
        pilot, [torch.ones(3, dtype=torch.float64)], [teacher, unused], [extra]
    )
    torch.testing.assert_close(got_teacher, 0.5 * torch.ones(3, dtype=torch.float64) + 6.0 * teacher.detach())
    assert got_unused is None


def test_second_order_checks_refuse_what_cannot_be_differentiated_twice():
    student, teacher = tiny_classifier(1), tiny_classifier(2)

    class Args:
        torch_compile = True

    with pytest.raises(ValueError, match="torch_compile=False"):
        check_second_order_support(student, teacher, Args())
    student.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        check_second_order_support(student, teacher, object())
