"""hf_distill.master_weights: a bf16 teacher's AdamW steps follow float32 ones within bf16 rounding, in the
optimizer alone and in a teacher that learns with `OnlineDistillTrainer` (resumed from a checkpoint too)."""

from __future__ import annotations

import io

import pytest
import torch
from testing_utils import keyword_dataset, tiny_classifier, tiny_run_args

from hf_distill import OnlineDistillTrainer, OnlineDistillTrainingArguments
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


# ----- a bf16 teacher that learns --------------------------------------------------------------------------------


def _teacher_update(tmp_path, tokenizer, dtype, master: bool = True, **overrides):
    teacher = tiny_classifier(2, seed=1).to(dtype)
    start = [p.detach().float().clone() for p in teacher.parameters()]
    args = tiny_run_args(
        OnlineDistillTrainingArguments,
        tmp_path,
        **{"max_steps": 10, "teacher_fp32_master_weights": master, **overrides},
    )
    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(160),
        processing_class=tokenizer,
    )
    trainer.train()
    params = list(trainer.teacher_model.parameters())
    optimizer = trainer.teacher_optimizer
    weights = optimizer.float32_weights(params) if isinstance(optimizer, MasterWeightsAdamW) else params
    update = torch.cat([(w.detach().float() - s).flatten() for w, s in zip(weights, start, strict=True)])
    return trainer, update


def test_a_bf16_teachers_update_follows_the_fp32_one(tmp_path, tokenizer):
    _, reference = _teacher_update(tmp_path / "fp32", tokenizer, torch.float32)
    trainer, update = _teacher_update(tmp_path / "bf16", tokenizer, torch.bfloat16)
    assert isinstance(trainer.teacher_optimizer, MasterWeightsAdamW)
    # The same elements move (~90% of them), along the fp32 trajectory up to bf16 forward/backward noise.
    assert (update != 0).float().mean() == pytest.approx((reference != 0).float().mean().item(), abs=0.01)
    assert ((update - reference).norm() / reference.norm()).item() < 0.2
    # The model holds the master weights rounded to bf16.
    params = list(trainer.teacher_model.parameters())
    for p, w in zip(params, trainer.teacher_optimizer.float32_weights(params), strict=True):
        assert torch.equal(p, w.to(torch.bfloat16))
    # Without master weights, AdamW on the bf16 weights rounds most updates away.
    _, pure = _teacher_update(tmp_path / "pure", tokenizer, torch.bfloat16, master=False)
    assert ((pure - reference).norm() / reference.norm()).item() > 0.5


def test_a_bf16_teachers_master_weights_resume_exactly(tmp_path, tokenizer):
    straight, _ = _teacher_update(tmp_path / "straight", tokenizer, torch.bfloat16, max_steps=4)
    _teacher_update(
        tmp_path / "first", tokenizer, torch.bfloat16, max_steps=4, save_strategy="steps", save_steps=2
    )
    teacher = tiny_classifier(2, seed=1).to(torch.bfloat16)
    resumed = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=teacher,
        args=tiny_run_args(OnlineDistillTrainingArguments, tmp_path / "resumed", max_steps=4),
        train_dataset=keyword_dataset(160),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "out" / "checkpoint-2"))
    mine, theirs = list(resumed.teacher_model.parameters()), list(straight.teacher_model.parameters())
    for a, b in zip(
        resumed.teacher_optimizer.float32_weights(mine),
        straight.teacher_optimizer.float32_weights(theirs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
