"""hf_distill.master_weights: a bf16 teacher's AdamW steps follow float32 ones within bf16 rounding."""

from __future__ import annotations

import io

import pytest
import torch

from hf_distill.teacher.master_weights import MasterWeightsAdamW, has_half_precision


def _run(params: list[torch.Tensor], optimizer, grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def setting():
    torch.manual_seed(0)
    start = [0.02 * torch.randn(64, 32), 0.02 * torch.randn(32)]  # the scale of transformer weights
    grads = [[torch.randn_like(p) for p in start] for _ in range(10)]
    return start, grads


def test_bf16_with_master_weights_follows_fp32_within_bf16_rounding(setting):
    start, grads = setting
    reference = [p.clone().requires_grad_(True) for p in start]
    _run(reference, torch.optim.AdamW(reference, lr=3e-5), grads)
    half = [p.to(torch.bfloat16).requires_grad_(True) for p in start]
    optimizer = MasterWeightsAdamW(half, lr=3e-5)
    _run(half, optimizer, grads)
    for got, want in zip(half, reference, strict=True):
        # The model holds the float32 trajectory rounded to bf16 (the gradients were rounded too: a tiny drift).
        torch.testing.assert_close(
            got.float(), want.detach().to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6
        )
    changed = sum(
        (h.float() != s.to(torch.bfloat16).float()).sum().item() for h, s in zip(half, start, strict=True)
    )
    assert changed / sum(p.numel() for p in start) > 0.5  # the updates survive, unlike pure-bf16 AdamW:
    pure = [p.to(torch.bfloat16).requires_grad_(True) for p in start]
    _run(pure, torch.optim.AdamW(pure, lr=3e-5), grads)
    pure_changed = sum((q != s.to(torch.bfloat16)).sum().item() for q, s in zip(pure, start, strict=True))
    assert pure_changed < changed / 2


def test_float32_parameters_are_stepped_in_place(setting):
    start, grads = setting
    mixed = [start[0].clone().requires_grad_(True), start[1].to(torch.bfloat16).requires_grad_(True)]
    optimizer = MasterWeightsAdamW([{"params": mixed, "weight_decay": 0.0}], lr=1e-3)
    assert optimizer.param_groups[0]["params"][0] is mixed[0]
    assert optimizer.param_groups[0]["params"][1].dtype == torch.float32
    reference = start[0].clone().requires_grad_(True)
    _run([reference], torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.0), [[g[0]] for g in grads])
    _run(mixed, optimizer, grads)
    torch.testing.assert_close(mixed[0], reference)
    assert mixed[1].grad is None  # zero_grad clears the model's half-precision gradients too


def test_state_dict_resumes_the_exact_master_weights(setting):
    start, grads = setting
    straight = [p.to(torch.bfloat16).requires_grad_(True) for p in start]
    _run(straight, MasterWeightsAdamW(straight, lr=3e-5), grads)

    first = [p.to(torch.bfloat16).requires_grad_(True) for p in start]
    optimizer = MasterWeightsAdamW(first, lr=3e-5)
    _run(first, optimizer, grads[:4])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = [
        p.detach().clone().requires_grad_(True) for p in first
    ]  # what the checkpoint's bf16 weights give
    fresh = MasterWeightsAdamW(resumed, lr=3e-5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _run(resumed, fresh, grads[4:])
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


def test_a_state_of_another_size_is_refused(setting):
    start, _ = setting
    one = MasterWeightsAdamW([start[0].to(torch.bfloat16).requires_grad_(True)], lr=1e-3)
    two = MasterWeightsAdamW([p.to(torch.bfloat16).requires_grad_(True) for p in start], lr=1e-3)
    state = two.state_dict()
    state["param_groups"] = one.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="do not match"):
        one.load_state_dict(state)


def test_has_half_precision():
    assert has_half_precision([torch.zeros(1), torch.zeros(1, dtype=torch.float16)])
    assert not has_half_precision([torch.zeros(1)])
