"""DistillationTrainer on tiny BERT models built here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    VOCAB,
    keyword_dataset,
    tiny_bert_config,
    tiny_classifier,
    tiny_run_args,
    tiny_tokenizer,
)
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
)

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    add_teacher_inputs,
    cache_teacher_logits,
    kl_divergence,
)


def make_args(tmp_path, **overrides) -> DistillationTrainingArguments:
    defaults = dict(
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
    )
    return tiny_run_args(DistillationTrainingArguments, tmp_path, **{**defaults, **overrides})


def one_batch(trainer: DistillationTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def loss_of(trainer: DistillationTrainer, batch: dict) -> torch.Tensor:
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch))


def test_training_lowers_loss_changes_student_and_never_touches_teacher(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    args = make_args(tmp_path, num_train_epochs=8, alpha=0.5)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(64),
        processing_class=tokenizer,
    )
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    for name, value in trainer.teacher_model.state_dict().items():
        assert torch.equal(teacher_before[name], value), name
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher_model.parameters())


def test_logs_distillation_and_task_components_that_add_up(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    args = make_args(tmp_path, alpha=0.3, max_steps=3)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(32),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["distill_loss"] > 0 and h["task_loss"] > 0
        assert h["loss"] == pytest.approx(0.3 * h["distill_loss"] + 0.7 * h["task_loss"], rel=1e-3)


def test_teacher_stays_in_eval_mode_when_flipped(tmp_path, tokenizer):
    teacher = tiny_classifier(layers=2, seed=1, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    student = tiny_classifier(layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    batch = one_batch(trainer)
    trainer.teacher_model.train()  # e.g. a user callback calling .train() on every module it sees
    first = loss_of(trainer, batch)
    second = loss_of(trainer, batch)
    assert not trainer.teacher_model.training
    assert torch.equal(first, second)


def test_loss_matches_hand_computed_combination(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    args = make_args(tmp_path, alpha=0.25, temperature=3.0)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    batch = one_batch(trainer)
    loss = loss_of(trainer, batch)
    inputs = model_inputs(batch)
    with torch.no_grad():
        z_s = student(**inputs).logits
        z_t = teacher.eval()(**inputs).logits
    expected = 0.25 * kl_divergence(z_s, z_t, temperature=3.0) + 0.75 * F.cross_entropy(z_s, batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_saved_folder_is_the_student_alone(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.config.num_hidden_layers == 1
    assert set(reloaded.state_dict()) == set(student.state_dict())
    for name, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert "model.safetensors" in files and not any("teacher" in f for f in files)


def test_ensemble_of_identical_teachers_equals_single_teacher(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    data = keyword_dataset(16)
    single = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        processing_class=tokenizer,
    )
    ensemble = DistillationTrainer(
        model=student,
        teacher_model=[teacher, copy.deepcopy(teacher)],
        args=make_args(tmp_path, teacher_weights=[0.3, 0.7]),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = one_batch(single)
    assert loss_of(ensemble, batch).item() == pytest.approx(loss_of(single, batch).item(), rel=1e-5)


def test_ensemble_target_is_weighted_mixture(tmp_path, tokenizer):
    student = tiny_classifier(layers=1, seed=2)
    teachers = [tiny_classifier(layers=2, seed=s) for s in (1, 3)]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teachers,
        args=make_args(tmp_path, teacher_weights=[1.0, 3.0], temperature=2.0),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    batch = one_batch(trainer)
    inputs = model_inputs(batch)
    combined = trainer.teacher_logits(inputs, {})
    with torch.no_grad():
        probs = [F.softmax(t(**inputs).logits / 2.0, -1) for t in teachers]
    torch.testing.assert_close(F.softmax(combined / 2.0, -1), 0.25 * probs[0] + 0.75 * probs[1])


def test_teacher_inputs_with_same_tokenizer_match_plain_path(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    data = keyword_dataset(16)
    with_teacher_columns = data.add_column("teacher_input_ids", data["input_ids"]).add_column(
        "teacher_attention_mask", data["attention_mask"]
    )
    plain = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        processing_class=tokenizer,
    )
    routed = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=with_teacher_columns,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )
    batch = one_batch(routed)  # remove_unused_columns is on: teacher_ columns and idx must survive it
    assert {"teacher_input_ids", "teacher_attention_mask", "idx"} <= set(batch)
    plain_batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    assert loss_of(routed, batch).item() == pytest.approx(loss_of(plain, plain_batch).item(), rel=1e-6)


def test_teacher_with_its_own_tokenizer(tmp_path, tokenizer):
    # The teacher's vocabulary is larger and spells words differently; it must read its own token ids.
    teacher_tok = tiny_tokenizer(tmp_path / "teacher_tok", vocab_size=80, prefix="t")
    teacher = tiny_classifier(layers=2, seed=1, vocab_size=80)
    student = tiny_classifier(layers=1, seed=2)
    texts = {"text": [" ".join(f"w{i}" for i in range(8, 8 + n)) for n in range(2, 10)], "label": [0, 1] * 4}
    import datasets

    data = datasets.Dataset.from_dict(texts)
    data = data.map(lambda r: tokenizer(r["text"]), batched=True)
    # The teacher spells student word w<i> as t<i+16>: the same text, other token ids.
    teacher_text = data.map(
        lambda r: {"text_t": [" ".join(f"t{int(w[1:]) + 16}" for w in t.split()) for t in r["text"]]},
        batched=True,
    )

    with pytest.raises(ValueError, match="different vocabularies.*add_teacher_inputs"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path),
            train_dataset=data,
            processing_class=tokenizer,
        )

    routed = add_teacher_inputs(teacher_text, teacher_tok, "text_t").remove_columns(["text", "text_t"])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=routed,
        processing_class=tokenizer,
        teacher_processing_class=teacher_tok,
    )
    batch = one_batch(trainer)
    assert batch["teacher_input_ids"].max() == batch["input_ids"].max() + 16  # the teacher's own ids
    with torch.no_grad():
        expected_t = teacher.eval()(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits
    student_inputs = {k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "labels"}
    torch.testing.assert_close(
        trainer.teacher_logits(
            student_inputs,
            {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]},
        ),
        expected_t,
    )
    with pytest.raises(ValueError, match="no teacher_ input columns.*add_teacher_inputs"):
        trainer.teacher_logits(student_inputs, {})  # the teacher would read the student's ids as its own
    trainer.train()  # and it trains


def test_cached_logits_match_live_teacher_and_skip_it(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    data = keyword_dataset(16)
    cached = cache_teacher_logits(data, teacher, tokenizer=tokenizer, batch_size=5)
    assert len(cached[0]["teacher_logits"]) == 2
    live = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        processing_class=tokenizer,
    )
    from_cache = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=cached,
        processing_class=tokenizer,
    )
    batch = one_batch(from_cache)
    assert "teacher_logits" in batch
    live_loss = loss_of(live, {k: v for k, v in batch.items() if k != "teacher_logits"})

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran although its logits were cached")

    from_cache.teacher_models[0].forward = refuse
    assert loss_of(from_cache, batch).item() == pytest.approx(live_loss.item(), rel=1e-5)


def test_teacher_from_local_path(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=str(tmp_path / "teacher"),
        args=make_args(tmp_path),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    for name, value in teacher.state_dict().items():
        assert torch.equal(trainer.teacher_model.state_dict()[name], value)


def test_teacher_path_without_a_trained_head_is_refused_unless_allowed(
    tmp_path, tokenizer, tiny_pair, caplog
):
    from transformers import BertModel

    _, student = tiny_pair
    BertModel(tiny_bert_config(layers=2)).save_pretrained(tmp_path / "pretrained")  # an encoder, no head
    common = dict(model=student, teacher_model=str(tmp_path / "pretrained"), processing_class=tokenizer)
    with pytest.raises(
        ValueError, match=r"no trained sequence-classification head.*classifier\.weight.*Fine-tune"
    ):
        DistillationTrainer(args=make_args(tmp_path), train_dataset=keyword_dataset(16), **common)
    with caplog.at_level("WARNING", logger="hf_distill.teacher"):
        trainer = DistillationTrainer(
            args=make_args(tmp_path, allow_untrained_teacher_head=True),
            train_dataset=keyword_dataset(16),
            **common,
        )
    assert "starts from an untrained head" in caplog.text
    assert trainer.teacher_model.bert.encoder.layer[0].attention.self.query.weight.abs().sum() > 0


def test_evaluation_warns_when_the_student_predicts_one_class(tmp_path, tokenizer, tiny_pair, caplog):
    teacher, student = tiny_pair
    with torch.no_grad():  # a head that always says class 1, whatever the input
        student.classifier.weight.zero_()
        student.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    data = keyword_dataset(16)  # labels alternate 0, 1
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    with caplog.at_level("WARNING", logger="hf_distill.safety.collapse"):
        metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == 0.5
    assert "The student (kd) predicted class 1 on all 16 evaluation rows" in caplog.text
    assert metrics["eval_collapsed_to_class"] == 1  # logged, so the model card can flag it


def test_evaluate_reports_the_students_task_loss(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    data = keyword_dataset(32)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=0.9),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    loader = trainer.get_eval_dataloader()
    total, count = 0.0, 0
    student.eval()
    with torch.no_grad():
        for batch in loader:
            logits = student(**model_inputs(batch)).logits
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            count += len(batch["labels"])
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    predictions = trainer.predict(data)
    assert predictions.predictions.shape == (32, 2)


def test_regression_distils_teacher_prediction_by_mse(tmp_path, tokenizer):
    teacher = tiny_classifier(layers=2, num_labels=1, seed=1)
    student = tiny_classifier(layers=1, num_labels=1, seed=2)
    data = keyword_dataset(16).map(lambda r: {"label": float(r["label"]) * 5.0})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=1.0),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = one_batch(trainer)
    inputs = model_inputs(batch)
    with torch.no_grad():
        expected = F.mse_loss(student(**inputs).logits, teacher.eval()(**inputs).logits)
    assert loss_of(trainer, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_classification_ignores_masked_positions(tmp_path, tokenizer):
    config = tiny_bert_config(layers=2, num_labels=3)
    torch.manual_seed(0)
    teacher = BertForTokenClassification(config)
    student = BertForTokenClassification(BertConfig(**{**config.to_dict(), "num_hidden_layers": 1}))
    data = (
        keyword_dataset(16)
        .map(lambda r: {"labels": [-100] + [t % 3 for t in r["input_ids"][1:]]})
        .remove_columns("label")
    )
    from transformers import DataCollatorForTokenClassification

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=1.0, temperature=2.0),
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
    )
    batch = one_batch(trainer)
    inputs = model_inputs(batch)
    with torch.no_grad():
        z_s, z_t = student(**inputs).logits, teacher.eval()(**inputs).logits
    per_token = []
    for b in range(z_s.shape[0]):
        for t in range(z_s.shape[1]):
            if batch["labels"][b, t] != -100:
                per_token.append(kl_divergence(z_s[b, t][None], z_t[b, t][None], temperature=2.0))
    expected = torch.stack(per_token).mean()
    assert loss_of(trainer, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    # Trainer's num_items_in_batch (tokens across the accumulated batch) normalises the sum instead.
    trainer.model.train()
    with torch.no_grad():
        normalised = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(100))
    assert normalised.item() == pytest.approx(expected.item() * len(per_token) / 100, rel=1e-5)


def test_causal_lm_distils_shifted_positions(tmp_path):
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(config)
    student = GPT2LMHeadModel(GPT2Config(**{**config.to_dict(), "n_layer": 1}))
    ids = torch.randint(0, VOCAB, (4, 12))
    labels = ids.clone()
    labels[:, :3] = -100  # e.g. a prompt that is not trained on
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=1.0, temperature=1.0, per_device_train_batch_size=4),
        train_dataset=data,
    )
    batch = one_batch(trainer)
    with torch.no_grad():
        z_s, z_t = (
            student(input_ids=batch["input_ids"]).logits,
            teacher.eval()(input_ids=batch["input_ids"]).logits,
        )
    # logits at position t predict token t + 1: the positions that count are those whose next label is kept
    kept = batch["labels"][:, 1:] != -100
    expected = kl_divergence(z_s[:, :-1][kept], z_t[:, :-1][kept], temperature=1.0)
    assert loss_of(trainer, batch).item() == pytest.approx(expected.item(), rel=1e-5)


# ----- errors raised before any training work -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"alpha": 1.5}, "alpha must be a finite number in \\[0, 1\\]"),
        ({"distill_loss": "cosine"}, "distill_loss='cosine' is unknown"),
        ({"jsd_beta": -0.1}, "jsd_beta must be a finite number in"),
        ({"teacher_weights": [1.0, -1.0]}, "teacher_weights\\[1\\] must be a finite number >= 0"),
        ({"teacher_model_init_kwargs": "{not json"}, "not valid JSON"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_init_kwargs_json_string_is_parsed(tmp_path):
    args = make_args(tmp_path, teacher_model_init_kwargs='{"revision": "main"}')
    assert args.teacher_model_init_kwargs == {"revision": "main"}


def test_label_count_mismatch(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="predicts 3 outputs but the student predicts 2.*num_labels"):
        DistillationTrainer(
            model=tiny_classifier(layers=1),
            teacher_model=tiny_classifier(layers=2, num_labels=3),
            args=make_args(tmp_path),
            train_dataset=keyword_dataset(8),
            processing_class=tokenizer,
        )


def test_missing_labels_with_task_loss(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    unlabeled = keyword_dataset(8).remove_columns("label")
    with pytest.raises(ValueError, match="no label column.*alpha=1.0"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path, alpha=0.5),
            train_dataset=unlabeled,
            processing_class=tokenizer,
        )
    # Pure distillation needs no labels.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=1.0, max_steps=1),
        train_dataset=unlabeled,
        processing_class=tokenizer,
    )
    trainer.train()
    assert "task_loss" not in trainer.state.log_history[0]


def test_other_bad_inputs(tmp_path, tokenizer, tiny_pair):
    teacher, student = tiny_pair
    data = keyword_dataset(8)
    with pytest.raises(ValueError, match="needs teacher_model"):
        DistillationTrainer(model=student, args=make_args(tmp_path), train_dataset=data)
    with pytest.raises(TypeError, match="DistillationTrainingArguments"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
        )
    with pytest.raises(ValueError, match="teacher_weights has 1 entries for 2 teachers"):
        DistillationTrainer(
            model=student,
            teacher_model=[teacher, copy.deepcopy(teacher)],
            args=make_args(tmp_path, teacher_weights=[1.0]),
        )
    with pytest.raises(ValueError, match="share parameters"):
        DistillationTrainer(model=student, teacher_model=student, args=make_args(tmp_path))
    with pytest.raises(TypeError, match="teacher_model must be"):
        DistillationTrainer(model=student, teacher_model=3, args=make_args(tmp_path))
