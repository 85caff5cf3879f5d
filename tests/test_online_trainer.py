"""OnlineDistillTrainer and the machinery every teacher-updating trainer shares, on tiny BERT models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    assert_same_parameters,
    keyword_dataset,
    tiny_classifier,
    tiny_classifier_with_dropout,
    tiny_run_args,
    tiny_tokenizer,
)

from hf_distill import (
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
    add_teacher_inputs,
    cache_teacher_logits,
    glue_compute_metrics,
    kl_divergence,
)


def make_args(tmp_path, **overrides) -> OnlineDistillTrainingArguments:
    defaults = dict(
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        teacher_learning_rate=1e-3,
    )
    return tiny_run_args(OnlineDistillTrainingArguments, tmp_path, **{**defaults, **overrides})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def test_one_step_is_teacher_update_then_student_update_with_updated_teacher(tmp_path, tokenizer):
    teacher, student = tiny_classifier(2, seed=1), tiny_classifier(1, seed=2)
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    args = make_args(
        tmp_path,
        max_steps=1,
        teacher_alpha=0.4,
        alpha=0.5,
        temperature=2.0,
        max_grad_norm=0,
        teacher_max_grad_norm=0,
    )
    trainer = OnlineDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(8),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()

    # The same step by hand: plain AdamW for each model, the order of docs/algorithms.md, "Online distillation".
    inputs, labels = model_inputs(batch), batch["labels"]
    t_opt = torch.optim.AdamW(ref_teacher.parameters(), lr=1e-3, weight_decay=0.0)
    s_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-3, weight_decay=0.0)
    z_s = ref_student(**inputs).logits
    z_t = ref_teacher(**inputs).logits
    teacher_loss = 0.4 * kl_divergence(z_t, z_s.detach(), temperature=2.0) + 0.6 * F.cross_entropy(
        z_t, labels
    )
    teacher_loss.backward()
    t_opt.step()
    with torch.no_grad():
        z_t_updated = ref_teacher(**inputs).logits
    student_loss = 0.5 * kl_divergence(z_s, z_t_updated, temperature=2.0) + 0.5 * F.cross_entropy(z_s, labels)
    student_loss.backward()
    s_opt.step()

    for name, value in ref_teacher.state_dict().items():
        torch.testing.assert_close(trainer.teacher_model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in ref_student.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    log = trainer.state.log_history[0]
    assert {"teacher_kl", "teacher_task_loss", "teacher_learning_rate", "distill_loss", "task_loss"} <= set(
        log
    )


def test_gradient_accumulation_steps_teacher_at_the_same_boundaries(tmp_path, tokenizer):
    """GA=2 × batch 4 equals one step on batch 8 for both models (dropout-free, mean losses)."""
    results = []
    for ga, batch_size in ((1, 8), (2, 4)):
        teacher, student = tiny_classifier(2, seed=1), tiny_classifier(1, seed=2)
        args = make_args(
            tmp_path / f"ga{ga}",
            max_steps=2,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=ga,
            max_grad_norm=0,
            teacher_max_grad_norm=0,
        )
        data = keyword_dataset(16)
        trainer = OnlineDistillTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
        )
        steps = []
        original = trainer.teacher_optimizer_step

        def counting_step(original=original, steps=steps, trainer=trainer):
            steps.append(trainer.state.global_step)
            original()

        trainer.teacher_optimizer_step = counting_step
        trainer.train()
        assert steps == [0, 1]  # one teacher step per optimisation step, before the student's
        results.append((params(trainer.teacher_model), params(student)))
    # Padding differs between the two layouts (per-batch padding), hence a float tolerance.
    (t1, s1), (t2, s2) = results
    for name in t1:
        torch.testing.assert_close(t1[name], t2[name], rtol=1e-4, atol=1e-5)
    for name in s1:
        torch.testing.assert_close(s1[name], s2[name], rtol=1e-4, atol=1e-5)


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    data = keyword_dataset(48)

    def run(output, max_steps, resume=None, save_steps=None):
        teacher, student = tiny_classifier(2, seed=1), tiny_classifier(1, seed=2)
        args = make_args(
            output,
            max_steps=max_steps,
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
            teacher_warmup_ratio=0.25,
        )
        trainer = OnlineDistillTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight", max_steps=8)
    first = run(tmp_path / "interrupted", max_steps=8, save_steps=4)
    checkpoint = tmp_path / "interrupted" / "out" / "checkpoint-4"
    assert (checkpoint / "teacher" / "trainable.safetensors").is_file()
    assert (checkpoint / "teacher" / "optimizer.pt").is_file() and (
        checkpoint / "teacher" / "scheduler.pt"
    ).is_file()
    del first
    resumed = run(tmp_path / "interrupted", max_steps=8, resume=str(checkpoint))

    for name, value in params(straight.teacher_model).items():
        torch.testing.assert_close(params(resumed.teacher_model)[name], value, rtol=0, atol=1e-6)
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=0, atol=1e-6)
    assert resumed.teacher_lr_scheduler.get_last_lr() == straight.teacher_lr_scheduler.get_last_lr()
    assert any(
        not torch.equal(v, params(tiny_classifier(2, seed=1))[k])
        for k, v in params(resumed.teacher_model).items()
    )


def test_resume_without_teacher_state_is_refused(tmp_path, tokenizer):
    data = keyword_dataset(16)
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1),
        teacher_model=tiny_classifier(2),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    import shutil

    shutil.rmtree(checkpoint / "teacher")
    fresh = OnlineDistillTrainer(
        model=tiny_classifier(1),
        teacher_model=tiny_classifier(2),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"checkpoint-2/teacher/\S+ is missing"):
        fresh.train(resume_from_checkpoint=True)
    # Without the checkpoint's manifest (written before manifests), the teacher's own check still refuses.
    (checkpoint / "checkpoint_manifest.json").unlink()
    (checkpoint / "distillation_args.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no teacher state"):
        fresh.train(resume_from_checkpoint=True)


def test_evaluate_reports_the_teachers_metrics(tmp_path, tokenizer):
    teacher, student = tiny_classifier(2, seed=1), tiny_classifier(1, seed=2)
    data = keyword_dataset(24)
    trainer = OnlineDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("mrpc"),
    )
    metrics = trainer.evaluate()
    assert {"eval_teacher_loss", "eval_teacher_accuracy", "eval_teacher_f1", "eval_accuracy"} <= set(metrics)
    teacher.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            logits = teacher(**model_inputs(batch)).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(correct / 24)
    assert metrics["eval_teacher_loss"] == pytest.approx(total_loss / 24, rel=1e-5)

    silent = OnlineDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, evaluate_teacher=False),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    assert not any(k.startswith("eval_teacher") for k in silent.evaluate())


def test_the_teacher_is_evaluated_on_its_own_inputs(tmp_path, tokenizer):
    """Trainer's evaluation loop with the teacher in the student's place: the teacher reads its teacher_
    columns (its own tokenisation), the metrics are its own, and nothing of the student's is reported."""
    import datasets

    teacher_tok = tiny_tokenizer(tmp_path / "teacher_tok", vocab_size=80, prefix="t")
    teacher, student = tiny_classifier(2, seed=1, vocab_size=80), tiny_classifier(1, seed=2)
    texts = [" ".join(f"w{8 + (i * 7 + k) % 40}" for k in range(2 + i % 5)) for i in range(20)]
    data = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(20)]})
    data = data.map(lambda r: tokenizer(r["text"]), batched=True)
    data = data.map(  # the teacher spells student word w<i> as t<i+16>
        lambda r: {"text_t": [" ".join(f"t{int(w[1:]) + 16}" for w in t.split()) for t in r["text"]]},
        batched=True,
    )
    data = add_teacher_inputs(data, teacher_tok, "text_t").remove_columns(["text", "text_t"])
    trainer = OnlineDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, per_device_eval_batch_size=8),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        teacher_processing_class=teacher_tok,
        compute_metrics=glue_compute_metrics("mrpc"),
    )
    teacher.train()
    metrics = trainer.evaluate_teacher()
    # An untrained tiny teacher may predict one class everywhere: the metric that says so is the only extra.
    assert set(metrics) - {"eval_teacher_collapsed_to_class"} == {
        "eval_teacher_loss",
        "eval_teacher_accuracy",
        "eval_teacher_f1",
    }
    assert teacher.training  # its mode is restored for training
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
            assert torch.equal(ids[:, 1], batch["input_ids"][:, 1] + 16)  # the teacher's own ids
            logits = teacher.eval()(input_ids=ids, attention_mask=mask).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(correct / 20)
    assert metrics["eval_teacher_loss"] == pytest.approx(total_loss / 20, rel=1e-5)


def test_lora_teacher_updates_only_its_adapter(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_classifier(2, seed=1)
    teacher = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    frozen_before = {n: p.detach().clone() for n, p in teacher.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in teacher.named_parameters() if "lora_B" in n}
    args = make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(24),
        processing_class=tokenizer,
    )
    trainer.train()
    after = dict(trainer.teacher_model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen_before.items())
    assert any(not torch.equal(after[n], v) for n, v in lora_before.items())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / "teacher" / "trainable.safetensors"))
    assert set(saved) == {n for n, p in teacher.get_base_model().named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in saved)  # SEQ_CLS also trains the head
    trainer.save_teacher(tmp_path / "teacher_out")
    assert (tmp_path / "teacher_out" / "adapter_model.safetensors").is_file()


def test_save_teacher_writes_reloadable_teacher_with_tokenizer(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_teacher(tmp_path / "teacher")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    for name, value in trainer.teacher_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value)
    assert AutoTokenizer.from_pretrained(tmp_path / "teacher").get_vocab() == tokenizer.get_vocab()


# ----- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_learning_rate": 0.0}, "teacher_learning_rate must be a finite number > 0"),
        ({"teacher_alpha": 1.2}, "teacher_alpha must be a finite number in \\[0, 1\\]"),
        ({"teacher_warmup_ratio": 1.0}, "teacher_warmup_ratio"),
        ({"teacher_lr_scheduler_type": "sawtooth"}, "teacher_lr_scheduler_type='sawtooth' is unknown"),
        ({"teacher_max_grad_norm": -1.0}, "teacher_max_grad_norm"),
    ],
)
def test_bad_teacher_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_teacher_without_trainable_parameters(tmp_path, tokenizer):
    teacher = tiny_classifier(2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        OnlineDistillTrainer(model=tiny_classifier(1), teacher_model=teacher, args=make_args(tmp_path))


def test_shared_parameters_ensemble_and_cached_logits_are_refused(tmp_path, tokenizer):
    student = tiny_classifier(1)
    with pytest.raises(ValueError, match="share parameters"):
        OnlineDistillTrainer(model=student, teacher_model=student, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="trains one teacher"):
        OnlineDistillTrainer(
            model=student, teacher_model=[tiny_classifier(2), tiny_classifier(2)], args=make_args(tmp_path)
        )
    teacher = tiny_classifier(2)
    cached = cache_teacher_logits(keyword_dataset(8), teacher, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="cached logits would be stale"):
        OnlineDistillTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path),
            train_dataset=cached,
            processing_class=tokenizer,
        )


def test_teacher_activation_checkpointing_gives_the_same_steps(tmp_path, tokenizer):
    """The teacher's activations recomputed in its backward (its dropout replayed): the same two steps."""
    trainers = {}
    for checkpointing in (False, True):
        trainer = OnlineDistillTrainer(
            model=tiny_classifier_with_dropout(1, seed=2),
            teacher_model=tiny_classifier_with_dropout(2, seed=1),
            args=make_args(
                tmp_path / str(checkpointing), max_steps=2, teacher_activation_checkpointing=checkpointing
            ),
            train_dataset=keyword_dataset(32),
            processing_class=tokenizer,
        )
        trainer.train()
        assert trainer.teacher_model.is_activation_checkpointing == checkpointing
        trainers[checkpointing] = trainer
    assert_same_parameters(trainers[False].teacher_model, trainers[True].teacher_model, "teacher.")
    assert_same_parameters(trainers[False].model, trainers[True].model, "student.")


def test_teacher_optimizer_is_torch_fused_adamw_with_trainer_style_decay_groups(tmp_path, tokenizer):
    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path, max_steps=2, teacher_weight_decay=0.1),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    optimizer = trainer.teacher_optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {n for n, p in trainer.teacher_model.named_parameters() if id(p) in decayed}
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    )
    assert names and not any("bias" in n or "LayerNorm" in n for n in names)


def test_the_teacher_is_evaluated_without_taking_the_students_place(tmp_path, tokenizer, caplog):
    teacher, student = tiny_classifier(2, seed=1), tiny_classifier(1, seed=2)
    with torch.no_grad():  # a teacher that predicts class 0 everywhere: its collapse is named as its own
        teacher.classifier.bias.copy_(torch.tensor([100.0, -100.0]))
    data = keyword_dataset(24)
    trainer = OnlineDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("mrpc"),
    )
    seen = []
    prediction_step = trainer.prediction_step

    def spy(model, inputs, *args, **kwargs):
        seen.append((model, trainer.model, trainer.model_wrapped))
        return prediction_step(model, inputs, *args, **kwargs)

    trainer.prediction_step = spy
    with caplog.at_level(logging.WARNING):
        metrics = trainer.evaluate_teacher()
    assert seen and all(m is teacher and s is student and w is student for m, s, w in seen)
    assert metrics["eval_teacher_accuracy"] == pytest.approx(sum(1 for r in data if r["label"] == 0) / 24)
    assert "The teacher (online) predicted class 0" in caplog.text
    assert "The student" not in caplog.text


def test_a_teacher_frozen_by_a_distillation_trainer_is_refused_with_the_cause_and_the_fix(
    tmp_path, tokenizer
):
    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    teacher = tiny_classifier(2, seed=1)
    DistillationTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=teacher,
        args=tiny_run_args(DistillationTrainingArguments, tmp_path / "kd"),
        train_dataset=keyword_dataset(8),
        processing_class=tokenizer,
    )
    with pytest.raises(
        ValueError,
        match=r"a DistillationTrainer built on this teacher froze it.*requires_grad_\(True\).*copy\.deepcopy",
    ):
        OnlineDistillTrainer(
            model=tiny_classifier(1, seed=2), teacher_model=teacher, args=make_args(tmp_path)
        )
    teacher.requires_grad_(True)  # the fix the message names
    online = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2), teacher_model=teacher, args=make_args(tmp_path)
    )
    assert online.teacher_model is teacher


def test_a_collapsed_teacher_is_logged_with_its_class(tmp_path, tokenizer):
    # A teacher whose classifier always answers 1 is flagged in its metrics (and so in the model card).
    teacher = tiny_classifier(2, seed=1)
    with torch.no_grad():
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    trainer = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=keyword_dataset(16),
        eval_dataset=keyword_dataset(8),
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("mrpc"),
    )
    assert trainer.evaluate_teacher()["eval_teacher_collapsed_to_class"] == 1


def test_save_on_each_node_is_refused_for_a_sharded_teacher(tmp_path, tokenizer, monkeypatch):
    # Under FSDP2 the teacher is gathered on the main process only: other nodes would save an empty one.
    import hf_distill.trainers.learning_teacher_trainer as learning_teacher_trainer

    monkeypatch.setattr(learning_teacher_trainer, "is_fsdp2", lambda accelerator: True)
    with pytest.raises(ValueError, match="save_on_each_node=True with a teacher FSDP2 shards"):
        OnlineDistillTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=tiny_classifier(2, seed=1),
            args=make_args(tmp_path, save_on_each_node=True),
            train_dataset=keyword_dataset(8),
            processing_class=tokenizer,
        )
