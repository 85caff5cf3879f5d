"""Chunked token-level losses (loss_chunk_size): the pure function against autograd on the full logits, the
trainer against its unchunked path, gradient accumulation, TRL's generalized JSD, and the refusals."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from testing_utils import assert_same_parameters, tiny_run_args
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.losses.chunked import chunked_token_losses
from hf_distill.losses.objectives import DistillationObjective, generalized_jsd

VOCAB, HIDDEN, N = 97, 32, 40

OBJECTIVES = {
    "kl_t1": DistillationObjective("kl", temperature=1.0),
    "kl_t2": DistillationObjective("kl", temperature=2.0),
    "jsd0_t2": DistillationObjective("jsd", temperature=2.0, jsd_beta=0.0),
    "jsd_half_t1": DistillationObjective("jsd", temperature=1.0, jsd_beta=0.5),
    "jsd_half_t2": DistillationObjective("jsd", temperature=2.0, jsd_beta=0.5),
    "jsd1_t2": DistillationObjective("jsd", temperature=2.0, jsd_beta=1.0),
    "reverse_kl_t2": DistillationObjective("reverse_kl", temperature=2.0),
    "mse": DistillationObjective("mse"),
}


def head_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    labels[::5] = -100
    return {
        "hidden": torch.randn(N, HIDDEN, generator=g),
        "weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.3,
        "bias": torch.randn(VOCAB, generator=g),
        "teacher_hidden": torch.randn(N, 24, generator=g),
        "teacher_weight": torch.randn(VOCAB, 24, generator=g) * 0.3,
        "teacher_bias": torch.randn(VOCAB, generator=g),
        "labels": labels,
    }


@pytest.mark.parametrize("chunk_size", [1, 7, 16, N])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_loss_and_gradients_equal_autograd_on_full_logits(chunk_size, name):
    objective, x = OBJECTIVES[name], head_inputs()
    params = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    logits = F.linear(*params)
    distill = objective(logits, teacher_logits, "sum")
    task = F.cross_entropy(logits, x["labels"], ignore_index=-100, reduction="sum")
    expected = 0.3 * distill + 0.7 * task
    expected_grads = torch.autograd.grad(expected, params)

    chunked_params = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    result = chunked_token_losses(
        *chunked_params,
        x["teacher_hidden"],
        x["teacher_weight"],
        x["teacher_bias"],
        objective,
        chunk_size,
        x["labels"],
        distill_weight=0.3,
        task_weight=0.7,
    )
    # A grad_output other than 1 checks that backward scales the stored gradients.
    (2.5 * result.loss).backward()
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.distill_sum, distill.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.task_sum, task.detach(), rtol=1e-5, atol=1e-5)
    for label, param, grad in zip(("hidden", "weight", "bias"), chunked_params, expected_grads, strict=True):
        torch.testing.assert_close(param.grad, 2.5 * grad, rtol=1e-5, atol=1e-6, msg=label)


def test_chunked_loss_without_labels_and_bias_is_the_distillation_alone():
    x = head_inputs(1)
    hidden = x["hidden"].clone().requires_grad_()
    result = chunked_token_losses(
        hidden, x["weight"], None, x["teacher_hidden"], x["teacher_weight"], None, OBJECTIVES["kl_t2"], 7
    )
    expected = OBJECTIVES["kl_t2"](
        hidden @ x["weight"].t(), x["teacher_hidden"] @ x["teacher_weight"].t(), "sum"
    )
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=1e-5)
    assert result.task_sum.item() == 0.0


def test_chunked_loss_refuses_a_batch_wide_objective():
    x = head_inputs()
    with pytest.raises(ValueError, match="whole batch"):
        chunked_token_losses(
            x["hidden"], x["weight"], None, x["teacher_hidden"], x["teacher_weight"], None,
            DistillationObjective("dist"), 4,
        )  # fmt: skip


# ----- TRL's generalized JSD ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl_up_to_the_temperature_squared(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(3, 5, VOCAB, generator=g), torch.randn(3, 5, VOCAB, generator=g) * 2
    labels = torch.randint(0, VOCAB, (3, 5), generator=g)
    labels[0, :2] = -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss
    # TRL's default "batchmean" without labels divides the sum over every position by the batch size, and
    # it never multiplies by τ²: ours with scale_by_temperature_squared=False is TRL's exactly.
    ours = generalized_jsd(student.flatten(0, 1), teacher.flatten(0, 1), beta, temperature, False, "sum") / 3
    theirs = trl_loss(student, teacher, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # With labels TRL averages over the kept positions; ours (τ² by default) is τ² times that.
    kept = labels != -100
    ours_scaled = generalized_jsd(student[kept], teacher[kept], beta, temperature, reduction="mean")
    theirs_masked = trl_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours_scaled, temperature**2 * theirs_masked, rtol=1e-5, atol=1e-6)
    # The chunked path on a head gives the same: its sum is TRL's "sum" times τ².
    x = head_inputs(4)
    logits = F.linear(x["hidden"], x["weight"], x["bias"]).unsqueeze(0)
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"]).unsqueeze(0)
    objective = DistillationObjective("jsd", temperature=temperature, jsd_beta=beta)
    chunked = chunked_token_losses(
        x["hidden"], x["weight"], x["bias"], x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"],
        objective, 7,
    )  # fmt: skip
    reference = trl_loss(logits, teacher_logits, beta=beta, temperature=temperature, reduction="sum")
    torch.testing.assert_close(chunked.distill_sum, temperature**2 * reference, rtol=1e-5, atol=1e-5)


# ----- the trainer ----------------------------------------------------------------------------------------


def tiny_llama(layers: int, seed: int, tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lm_dataset(rows: int = 8, length: int = 12) -> datasets.Dataset:
    """Rows of one length with right padding of different widths (label -100 there) and a 2-token prompt."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, length - row % 5 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def make_trainer(tmp_path, chunk, student=None, teacher=None, **overrides) -> DistillationTrainer:
    settings = dict(
        alpha=0.5, temperature=2.0, learning_rate=1e-2, per_device_train_batch_size=4, max_steps=3
    )
    args = tiny_run_args(
        DistillationTrainingArguments,
        tmp_path / str(chunk),
        loss_chunk_size=chunk,
        **{**settings, **overrides},
    )
    return DistillationTrainer(
        model=student if student is not None else tiny_llama(1, 0),
        teacher_model=teacher if teacher is not None else tiny_llama(2, 1),
        args=args,
        train_dataset=lm_dataset(12),
    )


def logged(trainer: DistillationTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_chunked_equals_unchunked_loss_logs_and_weights(tmp_path, tied):
    student, teacher = tiny_llama(1, 0, tied), tiny_llama(2, 1)
    reference = make_trainer(tmp_path, None, copy.deepcopy(student), copy.deepcopy(teacher))
    chunked = make_trainer(tmp_path, 7, copy.deepcopy(student), copy.deepcopy(teacher))
    batch = next(iter(reference.get_train_dataloader()))
    with torch.no_grad():
        losses = [
            t.compute_loss(t.model.train(), dict(batch), num_items_in_batch=17) for t in (reference, chunked)
        ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    reference.train()
    chunked.train()
    for key in ("loss", "distill_loss", "task_loss"):
        assert logged(chunked, key) == pytest.approx(logged(reference, key), rel=1e-4), key
    assert_same_parameters(reference.model, chunked.model, "student after 3 steps")
    changed = any(
        not torch.equal(a, b) for a, b in zip(student.parameters(), chunked.model.parameters(), strict=True)
    )
    assert changed, "the student did not train"


def test_trainer_chunked_equals_unchunked_for_a_lora_student(tmp_path):
    peft = pytest.importorskip("peft")
    student = tiny_llama(1, 0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    teacher = tiny_llama(2, 1)
    trainers = [
        make_trainer(
            tmp_path, chunk, peft.get_peft_model(copy.deepcopy(student), config), copy.deepcopy(teacher)
        )
        for chunk in (None, 6)
    ]
    batch = next(iter(trainers[0].get_train_dataloader()))
    trainers[1].model.load_state_dict(trainers[0].model.state_dict())
    losses = []
    for trainer in trainers:
        loss = trainer.compute_loss(trainer.model.train(), dict(batch), num_items_in_batch=17)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in t.model.named_parameters() if p.requires_grad} for t in trainers]
    assert any("lora" in name for name in grads[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_trainer_chunked_without_labels_distils_the_attended_positions(tmp_path):
    data = lm_dataset(8).remove_columns("labels")
    trainers = [
        DistillationTrainer(
            model=tiny_llama(1, 0),
            teacher_model=tiny_llama(2, 1),
            args=tiny_run_args(
                DistillationTrainingArguments,
                tmp_path / str(chunk),
                alpha=1.0,
                loss_chunk_size=chunk,
                max_steps=1,
            ),
            train_dataset=data,
        )
        for chunk in (None, 5)
    ]
    batch = next(iter(trainers[0].get_train_dataloader()))
    with torch.no_grad():
        losses = [t.compute_loss(t.model.train(), dict(batch)) for t in trainers]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_2x4_equals_1x8(tmp_path):
    student, teacher = tiny_llama(1, 0), tiny_llama(2, 1)
    runs = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        trainer = make_trainer(
            tmp_path / f"ga{accumulation}", 5, copy.deepcopy(student), copy.deepcopy(teacher),
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
            optim="sgd",  # Adam's first step is lr·sign(g): float noise in a tiny gradient flips it
        )  # fmt: skip
        trainer.train_dataset = lm_dataset(8)
        trainer.train()
        runs.append(trainer)
    assert_same_parameters(runs[0].model, runs[1].model, "1x8 against 2x4")
    assert logged(runs[1], "loss") == pytest.approx(logged(runs[0], "loss"), rel=1e-5)


# ----- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_chunk_size": 0}, "integer >= 1"),
        ({"loss_chunk_size": 4, "distill_loss": "dist"}, "whole batch"),
        ({"loss_chunk_size": 4, "hidden_distill_weight": 1.0}, "representation"),
    ],
)
def test_arguments_refuse_what_chunks_cannot_compute(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_args(DistillationTrainingArguments, tmp_path, **overrides)


def test_trainer_refuses_an_ensemble_and_a_classifier(tmp_path, tiny_pair):
    with pytest.raises(ValueError, match="ensemble"):
        DistillationTrainer(
            model=tiny_llama(1, 0),
            teacher_model=[tiny_llama(2, 1), tiny_llama(2, 2)],
            args=tiny_run_args(DistillationTrainingArguments, tmp_path, loss_chunk_size=4),
            train_dataset=lm_dataset(),
        )
    teacher, student = tiny_pair
    with pytest.raises(ValueError, match="causal language model"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=tiny_run_args(DistillationTrainingArguments, tmp_path, loss_chunk_size=4),
            train_dataset=datasets.Dataset.from_dict({"input_ids": [[2, 9, 10]], "label": [1]}),
        )


def test_trainer_refuses_logits_changed_after_the_head(tmp_path):
    student = tiny_llama(1, 0)
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        make_trainer(tmp_path, 4, student)
