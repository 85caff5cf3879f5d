"""The sparse forward KL of a top-k teacher cache, and DistillationTrainer training on such a cache."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from testing_utils import VOCAB, assert_same_parameters, tiny_run_args, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    cache_teacher_logits,
    kl_divergence,
    sparse_forward_kl,
)
from hf_distill.losses.sparse import aligned_topk


def top_k_targets(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities, tail log-probability) of the K most likely classes of each row."""
    log_q = torch.log_softmax(teacher_logits, -1)
    values, ids = log_q.topk(k, -1)
    tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, tail


def reference_loss(z_s, ids, log_q, tail_log_q, tail: str, temperature: float) -> torch.Tensor:
    """The sparse loss, one position at a time in float64, from the definitions."""
    total = torch.zeros((), dtype=torch.float64)
    for n in range(z_s.shape[0]):
        if tail == "renormalize":
            q = torch.softmax(log_q[n] / temperature, -1)
            p = torch.softmax(z_s[n, ids[n]] / temperature, -1)
            total = total + temperature**2 * (q * (q.log() - p.log())).sum()
        else:
            p_all = torch.softmax(z_s[n], -1)
            p = torch.cat([p_all[ids[n]], (1 - p_all[ids[n]].sum()).reshape(1)])
            q = torch.cat([log_q[n].exp(), tail_log_q[n].exp().reshape(1)])
            total = total + (q * (q.log() - p.log())).sum()
    return total / z_s.shape[0]


@pytest.mark.parametrize(
    ("tail", "temperature"), [("renormalize", 1.0), ("renormalize", 2.5), ("bucket", 1.0)]
)
def test_with_k_equal_to_the_vocabulary_both_variants_equal_the_dense_kl(tail, temperature):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 20, dtype=torch.float64) * 3, torch.randn(6, 20, dtype=torch.float64) * 3
    ids, log_q, tail_log_q = top_k_targets(z_t, 20)
    assert torch.isinf(tail_log_q).all()
    z_s.requires_grad_(True)
    sparse = sparse_forward_kl(z_s, ids, log_q, tail_log_q, tail, temperature)
    dense = kl_divergence(z_s, z_t, temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    (sparse_grad,) = torch.autograd.grad(sparse, z_s)
    (dense_grad,) = torch.autograd.grad(dense, z_s)
    assert torch.isfinite(sparse_grad).all()
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("tail", "temperature"), [("renormalize", 1.0), ("renormalize", 2.0), ("bucket", 1.0)]
)
def test_value_and_gradient_match_a_per_position_computation(tail, temperature):
    torch.manual_seed(1)
    z_s, z_t = torch.randn(5, 30, dtype=torch.float64) * 2, torch.randn(5, 30, dtype=torch.float64) * 2
    ids, log_q, tail_log_q = top_k_targets(z_t, 7)
    z_s.requires_grad_(True)
    loss = sparse_forward_kl(z_s, ids, log_q, tail_log_q, tail, temperature)
    expected = reference_loss(z_s, ids, log_q, tail_log_q, tail, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, z_s)
    (expected_grad,) = torch.autograd.grad(expected, z_s)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    if tail == "renormalize":  # only the teacher's K tokens are read
        outside = torch.ones_like(grad, dtype=torch.bool).scatter(-1, ids, False)
        assert grad[outside].abs().max() == 0
    assert torch.autograd.gradcheck(
        lambda z: sparse_forward_kl(z, ids, log_q, tail_log_q, tail, temperature),
        (z_s.detach().requires_grad_(),),
    )


def test_bucket_is_the_renormalised_loss_weighted_by_the_top_mass_plus_a_binary_kl():
    # Chain rule of KL: bucket = Q · renormalize + KL(Bernoulli(Q) ‖ Bernoulli(P)), Q and P the teacher's and
    # the student's mass on the K tokens; hence Q · renormalize <= bucket <= the dense KL.
    torch.manual_seed(2)
    z_s, z_t = torch.randn(50, 40, dtype=torch.float64) * 2, torch.randn(50, 40, dtype=torch.float64) * 2
    ids, log_q, tail_log_q = top_k_targets(z_t, 5)
    renormalised = sparse_forward_kl(z_s, ids, log_q, tail_log_q, "renormalize", reduction="none")
    bucket = sparse_forward_kl(z_s, ids, log_q, tail_log_q, "bucket", reduction="none")
    top_q = log_q.exp().sum(-1)
    top_p = torch.softmax(z_s, -1).gather(-1, ids).sum(-1)
    binary = top_q * (top_q / top_p).log() + (1 - top_q) * ((1 - top_q) / (1 - top_p)).log()
    torch.testing.assert_close(bucket, top_q * renormalised + binary, rtol=1e-10, atol=1e-12)
    assert (bucket >= top_q * renormalised - 1e-12).all()
    assert (bucket <= kl_divergence(z_s, z_t, reduction="none") + 1e-12).all()


def test_the_bucket_loss_can_be_below_the_renormalised_one():
    # "bucket >= renormalize" does not hold: a student with the teacher's top mass (P = Q) but another shape
    # inside the top K has bucket = Q · renormalize < renormalize.
    log_q = torch.tensor([[0.3, 0.2]], dtype=torch.float64).log()
    tail = torch.tensor([0.5], dtype=torch.float64).log()
    z_s = torch.tensor([[0.1, 0.4, 0.25, 0.25]], dtype=torch.float64).log()
    ids = torch.tensor([[0, 1]])
    renormalised = sparse_forward_kl(z_s, ids, log_q, tail, "renormalize")
    bucket = sparse_forward_kl(z_s, ids, log_q, tail, "bucket")
    assert renormalised > 0
    torch.testing.assert_close(bucket, 0.5 * renormalised)


def test_half_precision_log_probabilities_stay_close_and_the_bucket_is_renormalised():
    torch.manual_seed(3)
    z_s, z_t = torch.randn(8, 100) * 3, torch.randn(8, 100) * 3
    ids, log_q, tail_log_q = top_k_targets(z_t, 16)
    for tail in ("renormalize", "bucket"):
        exact = sparse_forward_kl(z_s, ids, log_q, tail_log_q, tail)
        half = sparse_forward_kl(z_s, ids.int(), log_q.half(), tail_log_q, tail)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, exact, rtol=2e-3, atol=1e-4)


def test_bad_arguments_are_refused():
    z, ids, log_q, tail = (
        torch.randn(2, 10),
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
        torch.zeros(2),
    )
    with pytest.raises(ValueError, match="tail='bucket' needs temperature=1.0"):
        sparse_forward_kl(z, ids, log_q, tail, "bucket", temperature=2.0)
    with pytest.raises(ValueError, match="needs tail_logprob"):
        sparse_forward_kl(z, ids, log_q, None, "bucket")
    with pytest.raises(ValueError, match="tail='top' is unknown"):
        sparse_forward_kl(z, ids, log_q, tail, "top")
    with pytest.raises(ValueError, match="exceed the student's vocabulary"):
        sparse_forward_kl(z[:, :2], ids, log_q, tail)


# ----- DistillationTrainer on a top-k cache ----------------------------------------------------------------


def tiny_lm(layers: int, seed: int, vocab_size: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=2, n_positions=32, resid_pdrop=0, embd_pdrop=0,
        attn_pdrop=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def lm_rows(n: int = 12, length: int = 10) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def lm_args(tmp_path, name: str, **overrides) -> DistillationTrainingArguments:
    defaults = dict(
        per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, output_dir=str(tmp_path / name)
    )
    return tiny_run_args(DistillationTrainingArguments, tmp_path, **{**defaults, **overrides})


@pytest.mark.parametrize(
    ("tail", "alpha", "temperature"),
    [("renormalize", 1.0, 2.0), ("renormalize", 0.5, 2.0), ("bucket", 1.0, 1.0), ("bucket", 0.5, 1.0)],
)
def test_training_on_a_full_top_k_cache_equals_training_with_the_live_teacher(
    tmp_path, tail, alpha, temperature
):
    teacher, student = tiny_lm(2, seed=0), tiny_lm(1, seed=1)
    data = lm_rows()
    cached = cache_teacher_logits(data, teacher, top_k=VOCAB, logprob_dtype="float32", batch_size=5)
    # SGD: Adam's first steps divide each gradient by its own size, which turns float noise in near-zero
    # gradients (the sparse loss sums in another order) into visible differences.
    settings = dict(alpha=alpha, temperature=temperature, topk_tail=tail, optim="sgd", learning_rate=0.5)
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=lm_args(tmp_path, "live", **settings),
        train_dataset=data,
    )  # fmt: skip
    live.train()
    from_cache = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=lm_args(tmp_path, "cache", **settings),
        train_dataset=cached,
    )  # fmt: skip

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran although its top k were cached")

    from_cache.teacher_models[0].forward = refuse
    from_cache.train()
    assert from_cache.state.global_step == 3
    assert_same_parameters(live.model, from_cache.model, f"{tail}, alpha={alpha}: ")
    assert not torch.equal(student.transformer.wte.weight, from_cache.model.transformer.wte.weight)


def test_a_smaller_top_k_is_what_the_sparse_loss_gives(tmp_path):
    teacher, student = tiny_lm(2, seed=0), tiny_lm(1, seed=1)
    cached = cache_teacher_logits(lm_rows(4), teacher, top_k=8, batch_size=4)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=lm_args(tmp_path, "k8", alpha=1.0, temperature=2.0),
        train_dataset=cached,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        z_s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    kept = batch["labels"][:, 1:] != -100
    ids, log_q = batch["teacher_topk_ids"][:, :-1][kept], batch["teacher_topk_logprobs"][:, :-1][kept]
    expected = sparse_forward_kl(z_s[kept], ids, log_q, temperature=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(
        kl_divergence(z_s[kept], teacher(batch["input_ids"]).logits[:, :-1][kept], 2.0).item(), rel=1e-3
    )


def test_a_student_with_another_tokenizer_is_refused(tmp_path):
    teacher, student = tiny_lm(2, seed=0), tiny_lm(1, seed=1)
    teacher_tokenizer = tiny_tokenizer(tmp_path / "teacher_tok", prefix="w")
    student_tokenizer = tiny_tokenizer(tmp_path / "student_tok", prefix="v")
    cached = cache_teacher_logits(lm_rows(4), teacher, tokenizer=teacher_tokenizer, top_k=8)
    with pytest.raises(ValueError, match="made with the tokenizer .*differs from the student's tokenizer"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=lm_args(tmp_path, "tok"), train_dataset=cached,
            processing_class=student_tokenizer,
        )  # fmt: skip
    same = DistillationTrainer(
        model=student, teacher_model=teacher, args=lm_args(tmp_path, "same"), train_dataset=cached,
        processing_class=tiny_tokenizer(tmp_path / "copy_tok", prefix="w"),
    )  # fmt: skip
    assert same.teacher_models[0] is teacher


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill_loss": "jsd"}, "the sparse loss is forward KL"),
        ({"topk_tail": "bucket", "temperature": 2.0}, "topk_tail='bucket' needs temperature=1.0"),
        ({"hidden_distill_weight": 1.0}, "representation terms"),
    ],
)
def test_what_the_sparse_loss_cannot_train_is_refused_when_the_trainer_is_built(tmp_path, overrides, message):
    teacher = tiny_lm(2, seed=0)
    cached = cache_teacher_logits(lm_rows(4), teacher, top_k=8)
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(
            model=tiny_lm(1, seed=1), teacher_model=teacher, args=lm_args(tmp_path, "x", **overrides),
            train_dataset=cached,
        )  # fmt: skip


def test_a_student_vocabulary_without_the_cached_ids_is_refused(tmp_path):
    cached = cache_teacher_logits(lm_rows(4), tiny_lm(2, seed=0), top_k=VOCAB)  # a teacher of 64 tokens
    with pytest.raises(
        ValueError, match=f"holds token id {VOCAB - 1}, beyond the student's vocabulary of 32"
    ):
        DistillationTrainer(
            model=tiny_lm(1, seed=1, vocab_size=32), teacher_model=tiny_lm(2, seed=0, vocab_size=32),
            args=lm_args(tmp_path, "v"), train_dataset=cached,
        )  # fmt: skip


def test_an_unknown_topk_tail_is_refused(tmp_path):
    with pytest.raises(ValueError, match="topk_tail='top' is unknown"):
        lm_args(tmp_path, "t", topk_tail="top")


def test_gathering_the_cached_columns_first_gives_the_same_loss_and_gradient():
    # The renormalised loss reads only the K cached columns: picking them before the positions avoids a copy
    # of the (N, V) logits and changes nothing.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(11)[:4] for _ in range(10)]).view(2, 5, 4)
    logprobs = torch.log_softmax(torch.randn(2, 5, 4, dtype=torch.float64), -1)
    tail = torch.full((2, 5), -3.0, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, 4], [5, -100, 6, 7, 8]])
    losses, grads = [], []
    for gathered in (False, True):
        parts = aligned_topk(logits, ids, logprobs, tail, labels, None, True, cached_columns_only=gathered)
        assert parts[0].shape[-1] == (4 if gathered else 11)
        loss = sparse_forward_kl(*parts, tail="renormalize", temperature=2.0, reduction="sum")
        (grad,) = torch.autograd.grad(loss, logits)
        losses.append(loss.detach())
        grads.append(grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
