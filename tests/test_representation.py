"""Representation distillation: the pure losses against slow computations, then the trainers on tiny BERTs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import keyword_dataset, tiny_bert_config, tiny_classifier
from transformers import BertForSequenceClassification

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    LGTMTrainer,
    LGTMTrainingArguments,
    MetaDistillTrainer,
    MetaDistillTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
    cache_teacher_logits,
)
from hf_distill.losses.representation import (
    HEADS_FILE,
    MemoryBank,
    RepresentationHeads,
    attention_loss,
    hidden_state_loss,
    info_nce_loss,
    layer_map,
    pool,
)

# ----- pure functions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("uniform", {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}),
        ("skip", {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}),
        ("last", {1: 7, 2: 8, 3: 9, 4: 10, 5: 11}),
    ],
)
def test_layer_map_presets_12_to_6(preset, expected):
    assert layer_map(preset, 6, 12) == expected


def test_layer_map_other_shapes_and_explicit_maps():
    assert layer_map("uniform", 3, 12) == {1: 4, 2: 8, 3: 12}
    assert layer_map("skip", 4, 12) == {1: 3, 2: 6, 3: 9}
    assert layer_map("last", 3, 4) == {1: 2, 2: 3}
    assert layer_map("uniform", 1, 2) == {1: 2}
    assert layer_map({"2": 8, 0: 0}, 3, 12) == {0: 0, 2: 8}
    assert layer_map(json.dumps({"1": 4}), 3, 12) == {1: 4}
    with pytest.raises(ValueError, match="out of range"):
        layer_map({4: 1}, 3, 12)
    with pytest.raises(ValueError, match="out of range"):
        layer_map({1: 13}, 3, 12)
    with pytest.raises(ValueError, match="maps no layer"):
        layer_map("skip", 1, 2)
    with pytest.raises(ValueError, match="at least as deep"):
        layer_map("last", 4, 2)
    with pytest.raises(ValueError, match="neither a preset"):
        layer_map("every_other", 3, 12)


def test_pooling_against_a_loop():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mean = pool(hidden, mask, "mean")
    for b in range(3):
        n = int(mask[b].sum())
        torch.testing.assert_close(mean[b], hidden[b, :n].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    assert pool(hidden, mask, "tokens") is hidden


def test_hidden_state_losses_against_slow_formulas():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    slow_mse = sum(((s[i] / s[i].norm() - t[i] / t[i].norm()) ** 2).sum() for i in range(4)) / 4
    slow_cos = sum(1 - (s[i] @ t[i]) / (s[i].norm() * t[i].norm()) for i in range(4)) / 4
    torch.testing.assert_close(hidden_state_loss(s, t, "mse"), slow_mse)
    torch.testing.assert_close(hidden_state_loss(s, t, "cosine"), slow_cos)
    torch.testing.assert_close(hidden_state_loss(s, t, "mse"), 2 * slow_cos)
    assert hidden_state_loss(t * 3.0, t, "mse") < 1e-6  # scale-free: normalised vectors
    tokens_s, tokens_t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = hidden_state_loss(tokens_s[mask.bool()], tokens_t[mask.bool()], "cosine")
    torch.testing.assert_close(hidden_state_loss(tokens_s, tokens_t, "cosine", mask), kept)


def test_attention_losses_against_slow_formulas():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    key_bias = (1 - mask[:, None, None, :].float()) * -1e9
    s = (torch.randn(2, 2, 3, 3) + key_bias).softmax(-1)
    t = (torch.randn(2, 2, 3, 3) + key_bias).softmax(-1)
    squares, pairs, kls, rows = 0.0, 0, 0.0, 0
    for b in range(2):
        for h in range(2):
            for q in range(3):
                if not mask[b, q]:
                    continue
                rows += 1
                kls += sum(
                    float(t[b, h, q, k] * math.log(t[b, h, q, k] / s[b, h, q, k]))
                    for k in range(3)
                    if mask[b, k]
                )
                for k in range(3):
                    if mask[b, k]:
                        squares += float((s[b, h, q, k] - t[b, h, q, k]) ** 2)
                        pairs += 1
    assert attention_loss(s, t, "mse", mask).item() == pytest.approx(squares / pairs, rel=1e-5)
    assert attention_loss(s, t, "kl", mask).item() == pytest.approx(kls / rows, rel=1e-5)
    assert attention_loss(t, t, "kl", mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same head count"):
        attention_loss(s, t[:, :1], "mse", mask)


def test_info_nce_equals_hand_computed_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    bank = torch.tensor([[1.0, 1.0]])
    tau = 0.5
    # ŝ = s / |s|, t̂ = t / |t|: ŝ0 = (1, 0), ŝ1 = (0, 1); t̂0 = (0.6, 0.8), t̂1 = (0, −1); bank: (1, 1)/√2.
    r = 1 / math.sqrt(2)
    scores = [[0.6, 0.0, r], [0.8, -1.0, r]]  # row i: ŝ_i · [t̂0, t̂1, bank]
    expected_batch = (
        -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(0.0 / tau)))
        - math.log(math.exp(-1.0 / tau) / (math.exp(0.8 / tau) + math.exp(-1.0 / tau)))
    ) / 2
    expected_bank = 0.0
    for i in range(2):
        denominator = sum(math.exp(x / tau) for x in scores[i])
        expected_bank -= math.log(math.exp(scores[i][i] / tau) / denominator) / 2
    assert info_nce_loss(s, t, tau).item() == pytest.approx(expected_batch, rel=1e-6)
    assert info_nce_loss(s, t, tau, negatives=bank).item() == pytest.approx(expected_bank, rel=1e-6)


def test_info_nce_falls_as_the_student_copies_the_teacher():
    torch.manual_seed(0)
    teacher, noise = torch.randn(16, 8), torch.randn(16, 8)
    bank = torch.randn(32, 8)
    losses = [
        info_nce_loss((1 - a) * noise + a * teacher, teacher, 0.1, bank).item() for a in (0, 0.5, 0.9, 1)
    ]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.25 * losses[0]
    # Through the heads: with g_s = g_t, copying the teacher's embeddings lowers the CRD loss too.
    heads = RepresentationHeads(8, 8, crd_dim=4, crd_num_negatives=8)
    heads.crd_student.load_state_dict(heads.crd_teacher.state_dict())
    heads.memory_bank.push(bank[:8])
    copied = heads.crd_loss(teacher, teacher, 0.1).item()
    heads.memory_bank.count.fill_(0)
    heads.memory_bank.push(bank[:8])
    assert copied < heads.crd_loss(noise, teacher, 0.1).item()


def test_memory_bank_is_a_fifo_queue():
    bank = MemoryBank(size=4, dim=1)
    assert bank.negatives().shape == (0, 1)
    bank.push(torch.tensor([[1.0], [2.0], [3.0]]))
    assert bank.negatives().flatten().tolist() == [1.0, 2.0, 3.0]
    bank.push(torch.tensor([[4.0], [5.0]]))
    assert sorted(bank.negatives().flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    bank.push(torch.arange(10.0, 16.0).unsqueeze(1))  # more than the size: the newest four
    assert sorted(bank.negatives().flatten().tolist()) == [12.0, 13.0, 14.0, 15.0]


def test_projection_heads_exist_exactly_when_widths_differ():
    assert len(RepresentationHeads(32, 32, [1, 2]).hidden_projections) == 0
    heads = RepresentationHeads(32, 48, [1, 2], crd_dim=8, crd_num_negatives=5)
    assert sorted(heads.hidden_projections) == ["1", "2"]
    assert heads.project_hidden(1, torch.randn(3, 32)).shape == (3, 48)
    assert heads.crd_student.in_features == 32 and heads.crd_teacher.in_features == 48
    assert heads.memory_bank.embeddings.shape == (5, 48)


# ----- trainers ---------------------------------------------------------------------------------------------

COMMON = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=1e-3,
    num_train_epochs=1,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
TEACHER_ARGS = dict(teacher_learning_rate=1e-3, quiz_split=0.25, max_grad_norm=0)
REPRESENTATION = dict(hidden_distill_weight=1.0, crd_weight=0.5, crd_dim=8, crd_num_negatives=16)


def wide_teacher(layers: int = 2, seed: int = 1, **overrides) -> BertForSequenceClassification:
    """A teacher of hidden width 48 (the tiny student's is 32)."""
    config = tiny_bert_config(layers, **overrides)
    config.hidden_size, config.intermediate_size = 48, 96
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def kd_trainer(tmp_path, tokenizer, teacher=None, student=None, n=32, **overrides) -> DistillationTrainer:
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **overrides})
    return DistillationTrainer(
        model=student if student is not None else tiny_classifier(1, seed=2),
        teacher_model=teacher if teacher is not None else tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(n),
        processing_class=tokenizer,
    )


def test_trainer_builds_projections_only_for_differing_widths(tmp_path, tokenizer):
    same = kd_trainer(tmp_path, tokenizer, hidden_distill_weight=1.0, hidden_layer_map={1: 2, 0: 0})
    assert len(same.representation_heads.hidden_projections) == 0
    wide = kd_trainer(tmp_path, tokenizer, teacher=wide_teacher(), hidden_distill_weight=1.0)
    assert sorted(wide.representation_heads.hidden_projections) == ["1"]
    off = kd_trainer(tmp_path, tokenizer)
    assert off.representation_heads is None


def test_kd_trains_with_every_term_and_logs_them_adding_up(tmp_path, tokenizer):
    teacher = wide_teacher(attn_implementation="eager")
    student = tiny_classifier(1, seed=2, attn_implementation="eager")
    weights = dict(hidden_distill_weight=0.7, attention_distill_weight=2.0, crd_weight=0.3)
    trainer = kd_trainer(
        tmp_path,
        tokenizer,
        teacher=teacher,
        student=student,
        max_steps=3,
        alpha=0.4,
        attention_loss="kl",
        hidden_pooling="mean",
        crd_dim=8,
        **weights,
    )
    heads_before = {k: v.clone() for k, v in trainer.representation_heads.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        expected = 0.4 * h["distill_loss"] + 0.6 * h["task_loss"]
        expected += 0.7 * h["hidden_loss"] + 2.0 * h["attention_loss"] + 0.3 * h["crd_loss"]
        assert h["loss"] == pytest.approx(expected, rel=1e-3)
    after = trainer.representation_heads.state_dict()
    assert all(not torch.equal(heads_before[k], after[k]) for k in heads_before)  # the heads learn
    assert all(p.grad is None for p in trainer.representation_heads.parameters())  # cleared after each step


def test_heads_are_checkpointed_restored_and_never_saved_with_the_student(tmp_path, tokenizer):
    data = keyword_dataset(48)

    def run(output, resume=None, save=False):
        args = DistillationTrainingArguments(
            output_dir=str(output),
            **{**COMMON, "save_strategy": "steps" if save else "no"},
            save_steps=2,
            max_steps=4,
            hidden_layer_map="uniform",
            **REPRESENTATION,
        )
        trainer = DistillationTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=wide_teacher(),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "interrupted", save=True)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    saved = load_file(str(checkpoint / HEADS_FILE))
    assert "hidden_projections.1.weight" in saved and "memory_bank.embeddings" in saved
    assert not list(checkpoint.glob(f".{HEADS_FILE}*.tmp"))
    student_keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert not any("projection" in k or "crd" in k or "memory_bank" in k for k in student_keys)

    resumed = run(tmp_path / "interrupted", resume=str(checkpoint))
    expected = straight.representation_heads.state_dict()
    for name, value in resumed.representation_heads.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6)

    resumed.save_model(str(tmp_path / "student"))
    files = sorted(p.name for p in (tmp_path / "student").iterdir())
    assert HEADS_FILE not in files
    keys = load_file(str(tmp_path / "student" / "model.safetensors")).keys()
    assert set(keys) == set(tiny_classifier(1, seed=2).state_dict())

    fresh = kd_trainer(tmp_path / "other", tokenizer, teacher=wide_teacher(), **REPRESENTATION)
    with pytest.raises(ValueError, match="its save did not finish"):  # not a checkpoint at all
        fresh.train(resume_from_checkpoint=str(tmp_path / "straight"))
    (checkpoint / HEADS_FILE).unlink()  # a checkpoint that lost its heads names the file
    with pytest.raises(ValueError, match=rf"{HEADS_FILE} is missing"):
        fresh.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / "checkpoint_manifest.json").unlink()  # unverifiable (older): the heads' own check
    (checkpoint / "distillation_args.json").unlink()
    with pytest.raises(FileNotFoundError, match="no representation heads"):
        fresh.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("kind", ["online", "lgtm", "meta"])
def test_teacher_updating_trainers_accept_the_options(tmp_path, tokenizer, kind):
    classes = {
        "online": (OnlineDistillTrainer, OnlineDistillTrainingArguments, {"teacher_learning_rate": 1e-3}),
        "lgtm": (LGTMTrainer, LGTMTrainingArguments, TEACHER_ARGS),
        "meta": (MetaDistillTrainer, MetaDistillTrainingArguments, TEACHER_ARGS),
    }
    trainer_class, args_class, extra = classes[kind]
    args = args_class(
        output_dir=str(tmp_path / "out"),
        **{**COMMON, **extra, "save_strategy": "steps"},
        max_steps=2,
        save_steps=2,
        **REPRESENTATION,
    )
    trainer = trainer_class(
        model=tiny_classifier(1, seed=2),
        teacher_model=wide_teacher(),
        args=args,
        train_dataset=keyword_dataset(40),
        processing_class=tokenizer,
    )
    before = {k: v.clone() for k, v in trainer.representation_heads.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(h["hidden_loss"] > 0 and h["crd_loss"] > 0 for h in logs)
    assert "teacher_learning_rate" in logs[0]  # the teacher side is unchanged
    after = trainer.representation_heads.state_dict()
    assert not torch.equal(before["hidden_projections.1.weight"], after["hidden_projections.1.weight"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / HEADS_FILE).is_file() and (checkpoint / "teacher").is_dir()


# ----- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_distill_weight": -1.0}, "hidden_distill_weight must be"),
        ({"crd_weight": float("nan")}, "crd_weight must be"),
        ({"hidden_pooling": "max"}, "hidden_pooling='max' is unknown"),
        ({"hidden_loss": "l1"}, "hidden_loss='l1' is unknown"),
        ({"attention_loss": "js"}, "attention_loss='js' is unknown"),
        ({"crd_pooling": "tokens"}, "crd_pooling='tokens' is unknown"),
        ({"crd_temperature": 0.0}, "crd_temperature must be a finite number > 0"),
        ({"crd_dim": 0}, "crd_dim must be"),
        ({"crd_num_negatives": -3}, "crd_num_negatives must be"),
        ({"hidden_layer_map": "{1: 2"}, "neither a preset"),
        ({"hidden_layer_map": {"a": 1}}, "integer layer numbers"),
    ],
)
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainingArguments(output_dir=str(tmp_path), **overrides)


def test_json_layer_map_argument_is_parsed(tmp_path):
    args = DistillationTrainingArguments(output_dir=str(tmp_path), hidden_layer_map='{"1": 2}')
    assert args.hidden_layer_map == {1: 2}
    assert (
        OnlineDistillTrainingArguments(output_dir=str(tmp_path), hidden_layer_map="skip").hidden_layer_map
        == "skip"
    )


def test_settings_that_cannot_work_are_refused_before_training(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        kd_trainer(tmp_path, tokenizer, attention_distill_weight=1.0)  # sdpa returns no attention weights
    heads4 = tiny_classifier(2, seed=1, attn_implementation="eager")
    heads4.config.num_attention_heads = 4
    with pytest.raises(ValueError, match="2 attention heads and the teacher 4"):
        kd_trainer(
            tmp_path,
            tokenizer,
            teacher=heads4,
            student=tiny_classifier(1, seed=2, attn_implementation="eager"),
            attention_distill_weight=1.0,
        )
    with pytest.raises(ValueError, match="out of range"):
        kd_trainer(tmp_path, tokenizer, hidden_distill_weight=1.0, hidden_layer_map={2: 1})
    with pytest.raises(ValueError, match="ensemble"):
        kd_trainer(
            tmp_path,
            tokenizer,
            teacher=[tiny_classifier(2, seed=1), tiny_classifier(2, seed=3)],
            crd_weight=1.0,
        )
    teacher = tiny_classifier(2, seed=1)
    cached = cache_teacher_logits(keyword_dataset(16), teacher, tokenizer, batch_size=8)
    with pytest.raises(ValueError, match="holds no hidden states"):
        DistillationTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=teacher,
            args=DistillationTrainingArguments(
                output_dir=str(tmp_path / "out"), **COMMON, hidden_distill_weight=1.0
            ),
            train_dataset=cached,
            processing_class=tokenizer,
        )
