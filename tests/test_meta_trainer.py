"""MetaDistillTrainer on tiny BERT models: the meta-gradient against finite differences, the real step,
meta_every, the teacher's task loss, activation checkpointing, LoRA, resume, and the errors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    assert_same_parameters,
    keyword_dataset,
    tiny_classifier,
    tiny_classifier_with_dropout,
    tiny_run_args,
)
from transformers import TrainerCallback

import hf_distill.trainers.meta_trainer
from hf_distill import MetaDistillTrainer, MetaDistillTrainingArguments, glue_compute_metrics, kl_divergence


def make_args(tmp_path, **overrides) -> MetaDistillTrainingArguments:
    defaults = dict(
        learning_rate=1e-3,
        teacher_learning_rate=1e-3,
        pilot_learning_rate=0.5,  # large, so that the meta-gradient is far from rounding noise
        quiz_split=0.25,
        alpha=0.7,
        temperature=2.0,
        max_grad_norm=0,
        teacher_max_grad_norm=0,
    )
    return tiny_run_args(MetaDistillTrainingArguments, tmp_path, **{**defaults, **overrides})


def make_trainer(tmp_path, tokenizer, teacher=None, student=None, n=32, callbacks=None, **overrides):
    return MetaDistillTrainer(
        model=student if student is not None else tiny_classifier(1, seed=2),
        teacher_model=teacher if teacher is not None else tiny_classifier(2, seed=1),
        args=make_args(tmp_path, **overrides),
        train_dataset=keyword_dataset(n),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def float64_pair():
    return tiny_classifier(2, seed=1).double(), tiny_classifier(1, seed=2).double()


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def capture_teacher_gradients(trainer) -> list[dict[str, torch.Tensor]]:
    """The teacher's gradient at each teacher step (clipping is off in these tests), by name."""
    captured, original = [], trainer.teacher_optimizer_step

    def step():
        named = trainer.teacher_model.named_parameters()
        captured.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        original()

    trainer.teacher_optimizer_step = step
    return captured


def student_optimizer_state(trainer) -> dict[str, dict]:
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {n: optimizer.state[p] for n, p in trainer.model.named_parameters() if p in optimizer.state}


def quiz_loss_after_pilot(student, teacher, batch, quiz, pilot_lr, alpha=0.7, temperature=2.0):
    """Slow and plain: copy the student, one in-place SGD step on its loss, then the quiz CE without dropout."""
    pilot = copy.deepcopy(student).train()
    z_s = pilot(**model_inputs(batch)).logits
    z_t = teacher.train()(**model_inputs(batch)).logits
    loss = alpha * kl_divergence(z_s, z_t, temperature=temperature) + (1 - alpha) * F.cross_entropy(
        z_s, batch["labels"]
    )
    trainable = [p for p in pilot.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)
    with torch.no_grad():
        for p, g in zip(trainable, grads, strict=True):
            p -= pilot_lr * g
    pilot.eval()
    return F.cross_entropy(pilot(**model_inputs(quiz)).logits, quiz["labels"])


def finite_difference(student, teacher, name, index, batch, quiz, pilot_lr, h=1e-4) -> float:
    """Central difference of the quiz loss after the pilot w.r.t. one teacher parameter element."""
    values = []
    for delta in (h, -h):
        shifted = copy.deepcopy(teacher)
        with torch.no_grad():
            dict(shifted.named_parameters())[name][index] += delta
        values.append(quiz_loss_after_pilot(student, shifted, batch, quiz, pilot_lr).item())
    return (values[0] - values[1]) / (2 * h)


# ----- the meta-gradient and the real step ---------------------------------------------------------------------


def test_meta_gradient_equals_finite_difference_of_the_quiz_loss(tmp_path, tokenizer):
    teacher, student = float64_pair()
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    trainer = make_trainer(tmp_path, tokenizer, teacher, student, max_steps=1, pilot_learning_rate=5.0)
    batch = next(iter(trainer.get_train_dataloader()))
    quiz = trainer.quiz_batch(0)
    gradients = capture_teacher_gradients(trainer)
    trainer.train()

    assert len(gradients) == 1
    meta = gradients[0]
    for name, index in [
        ("classifier.weight", (1, 3)),
        ("bert.pooler.dense.weight", (4, 9)),
        ("bert.encoder.layer.1.attention.self.query.weight", (2, 5)),
        ("bert.embeddings.word_embeddings.weight", (2, 1)),  # [CLS], in every row
    ]:
        expected = finite_difference(student_before, teacher_before, name, index, batch, quiz, 5.0)
        assert abs(expected) > 1e-7, name  # a real signal, far above the difference's rounding error
        # Central differences at h = 1e-4 in float64 agree to ~1e-6 relative here; a wrong sign, scale or
        # missing term would be off by O(1).
        assert meta[name][index].item() == pytest.approx(expected, rel=2e-5), name
    log = trainer.state.log_history[0]
    reference = quiz_loss_after_pilot(student_before, teacher_before, batch, quiz, 5.0).item()
    assert log["quiz_loss"] == pytest.approx(reference, abs=2e-6)
    for key in ("quiz_loss", "pilot_grad_norm", "quiz_grad_norm", "teacher_learning_rate", "distill_loss"):
        assert key in log, key
    # teacher_task_weight = 0: the quiz loss is the teacher's only signal.
    assert "teacher_task_loss" not in log


def test_student_step_is_one_real_update_with_the_updated_teacher(tmp_path, tokenizer):
    teacher, student = float64_pair()
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    trainer = make_trainer(tmp_path, tokenizer, teacher, student, max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert any(
        not torch.equal(a, b)
        for a, b in zip(teacher_before.parameters(), trainer.teacher_model.parameters(), strict=True)
    )

    def reference_step(teacher_used):
        reference = copy.deepcopy(student_before).train()
        optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
        with torch.no_grad():
            z_t = teacher_used.eval()(**model_inputs(batch)).logits
        z_s = reference(**model_inputs(batch)).logits
        loss = 0.7 * kl_divergence(z_s, z_t, temperature=2.0) + 0.3 * F.cross_entropy(z_s, batch["labels"])
        loss.backward()
        optimizer.step()
        named = dict(reference.named_parameters())
        return named, {n: optimizer.state[p] for n, p in named.items()}

    params, state = reference_step(copy.deepcopy(trainer.teacher_model))
    trained_state = student_optimizer_state(trainer)
    assert set(trained_state) == set(state)
    for name, value in student.named_parameters():
        torch.testing.assert_close(value, params[name], rtol=1e-10, atol=1e-12, msg=name)
        assert int(trained_state[name]["step"]) == 1  # one real step: the pilot did not step the optimizer
        for key in ("exp_avg", "exp_avg_sq"):  # the gradient itself, which Adam's first step hides
            torch.testing.assert_close(
                trained_state[name][key], state[name][key], rtol=1e-10, atol=1e-16, msg=name
            )
    # The comparison can fail: with the teacher before its update, the student's gradient differs.
    _, stale = reference_step(teacher_before)
    assert any(
        not torch.allclose(trained_state[n]["exp_avg"], stale[n]["exp_avg"], rtol=1e-8, atol=0) for n in stale
    )


def test_teacher_task_weight_adds_the_teachers_task_gradient(tmp_path, tokenizer):
    weight = 0.3
    results = []
    for w in (0.0, weight):
        teacher, student = float64_pair()
        trainer = make_trainer(
            tmp_path / str(w), tokenizer, teacher, student, max_steps=1, teacher_task_weight=w
        )
        batch = next(iter(trainer.get_train_dataloader()))
        gradients = capture_teacher_gradients(trainer)
        trainer.train()
        results.append(gradients[0])
    assert "teacher_task_loss" in trainer.state.log_history[0]

    teacher = tiny_classifier(2, seed=1).double().train()
    task_loss = F.cross_entropy(teacher(**model_inputs(batch)).logits, batch["labels"])
    task_grads = dict(
        zip(
            dict(teacher.named_parameters()),
            torch.autograd.grad(task_loss, list(teacher.parameters())),
            strict=True,
        )
    )
    without, with_task = results
    assert any(not torch.allclose(with_task[n], without[n]) for n in without)
    for name, grad in task_grads.items():
        torch.testing.assert_close(
            with_task[name] - without[name], weight * grad, rtol=1e-8, atol=1e-14, msg=name
        )


def test_activation_checkpointing_gives_the_same_meta_gradient(tmp_path, tokenizer):
    results = []
    for checkpointing in (False, True):
        teacher, student = float64_pair()
        trainer = make_trainer(
            tmp_path / str(checkpointing),
            tokenizer,
            teacher,
            student,
            max_steps=1,
            activation_checkpointing=checkpointing,
        )
        layer_calls = []  # checkpointing recomputes the layer's forward (not its hooks) in the backward passes
        student.bert.encoder.layer[0].intermediate.register_forward_hook(
            lambda *a, calls=layer_calls: calls.append(1)
        )
        gradients = capture_teacher_gradients(trainer)
        trainer.train()
        state = student_optimizer_state(trainer)
        results.append((gradients[0], {n: s["exp_avg"] for n, s in state.items()}, len(layer_calls)))
    (meta_off, student_off, calls_off), (meta_on, student_on, calls_on) = results
    assert calls_on > calls_off  # checkpointing really recomputed the layer during the backward passes
    for name in meta_off:
        torch.testing.assert_close(meta_on[name], meta_off[name], rtol=1e-9, atol=1e-15, msg=name)
    for name in student_off:
        torch.testing.assert_close(student_on[name], student_off[name], rtol=1e-9, atol=1e-15, msg=name)


def test_lora_student_and_lora_teacher(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    def lora(model):
        return get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))

    teacher, student = (lora(m) for m in float64_pair())
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    data = keyword_dataset(16, seed=5)
    trainer = MetaDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=1, per_device_eval_batch_size=16, pilot_learning_rate=5.0),
        train_dataset=keyword_dataset(32),
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("sst2"),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    quiz = trainer.quiz_batch(0)
    gradients = capture_teacher_gradients(trainer)
    trainer.train()

    # The first meta-gradient through a LoRA student into a LoRA teacher is the finite difference's.
    name = next(n for n in gradients[0] if "lora_B" in n and "layer.1" in n and "query" in n)
    index = tuple(
        int(i) for i in torch.unravel_index(gradients[0][name].abs().argmax(), gradients[0][name].shape)
    )
    expected = finite_difference(student_before, teacher_before, name, index, batch, quiz, 5.0)
    assert abs(expected) > 1e-7
    assert gradients[0][name][index].item() == pytest.approx(expected, rel=2e-5)
    assert set(gradients[0]) == {n for n, p in teacher.named_parameters() if p.requires_grad}
    for before, after in ((teacher_before, trainer.teacher_model), (student_before, trainer.model)):
        old, new = dict(before.named_parameters()), dict(after.named_parameters())
        assert all(torch.equal(new[n], p) for n, p in old.items() if not p.requires_grad)  # base frozen
        assert any(not torch.equal(new[n], p) for n, p in old.items() if "lora_B" in n)  # adapter learns
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_teacher_accuracy", "eval_teacher_loss"} <= set(metrics)


# ----- meta_every, resume ------------------------------------------------------------------------------------


class TeacherSnapshots(TrainerCallback):
    def __init__(self) -> None:
        self.teacher = None
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append({k: v.clone() for k, v in self.teacher.state_dict().items()})


def test_meta_every_skips_teacher_updates(tmp_path, tokenizer):
    snapshots = TeacherSnapshots()
    trainer = make_trainer(tmp_path, tokenizer, max_steps=3, meta_every=2, callbacks=[snapshots])
    snapshots.teacher = trainer.teacher_model
    initial = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    student_initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher_steps, quiz_steps = [], []
    original_step, original_quiz = trainer.teacher_optimizer_step, trainer.quiz_batch

    def counted_step():
        teacher_steps.append(trainer.state.global_step)
        original_step()

    def counted_quiz(step=None):
        quiz_steps.append(step)
        return original_quiz(step)

    trainer.teacher_optimizer_step, trainer.quiz_batch = counted_step, counted_quiz
    trainer.train()

    assert teacher_steps == [0, 2] and quiz_steps == [0, 1]  # consecutive quiz batches for the updates

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    states = [initial, *snapshots.after_step]
    assert [same(states[i], states[i + 1]) for i in range(3)] == [False, True, False]
    assert not same(student_initial, trainer.model.state_dict())
    # The teacher's linear schedule runs over the student's 3 steps, skipped ones included: it ends at 0.
    assert trainer.teacher_lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert sum("quiz_loss" in entry for entry in trainer.state.log_history) == 2


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, tokenizer):
    def run(output, callbacks=None, resume=None):
        trainer = make_trainer(
            output,
            tokenizer,
            max_steps=3,
            meta_every=2,
            save_strategy="steps",
            save_steps=2,
            callbacks=callbacks,
            teacher_warmup_ratio=0.25,
            pilot_learning_rate=1e-2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "interrupted", callbacks=[StopAfter(2)])
    checkpoint = tmp_path / "interrupted" / "out" / "checkpoint-2"
    assert (checkpoint / "teacher" / "trainable.safetensors").is_file()
    assert not (tmp_path / "interrupted" / "out" / "checkpoint-3").exists()
    resumed = run(tmp_path / "interrupted", resume=str(checkpoint))

    assert resumed.state.global_step == 3  # step 2 (a teacher update) ran after the resume
    for a, b in ((straight.teacher_model, resumed.teacher_model), (straight.model, resumed.model)):
        other = b.state_dict()
        for name, value in a.state_dict().items():
            torch.testing.assert_close(other[name], value, rtol=0, atol=1e-6, msg=name)
    assert resumed.teacher_lr_scheduler.get_last_lr() == straight.teacher_lr_scheduler.get_last_lr()
    fresh = tiny_classifier(2, seed=1).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in resumed.teacher_model.state_dict().items())


# ----- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pilot_learning_rate": 0.0}, "pilot_learning_rate must be a finite number > 0"),
        ({"meta_every": 0}, "meta_every must be an integer >= 1"),
        ({"meta_every": 1.5}, "meta_every must be an integer >= 1"),
        ({"teacher_task_weight": -0.1}, "teacher_task_weight must be a finite number >= 0"),
        ({"alpha": 0.0}, "Set alpha > 0"),
        ({"quiz_split": 1.0}, "quiz_split must be a finite number in"),
        (
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
            "'use_reentrant': False",
        ),
    ],
)
def test_bad_arguments(tmp_path, tokenizer, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tokenizer, **overrides)


def test_settings_without_double_backward_are_refused_before_training(tmp_path, tokenizer):
    student = tiny_classifier(1, seed=2)
    student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="student has reentrant activation checkpointing"):
        make_trainer(tmp_path, tokenizer, student=student)
    teacher = tiny_classifier(2, seed=1)
    teacher.activation_checkpointing_enable(activation_checkpointing_kwargs={"preserve_rng_state": True})
    with pytest.raises(ValueError, match="teacher has reentrant"):  # torch's default use_reentrant is True
        make_trainer(tmp_path, tokenizer, teacher=teacher)
    student = tiny_classifier(1, seed=2)
    student.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*'sdpa'"):
        make_trainer(tmp_path, tokenizer, student=student)
    with pytest.raises(ValueError, match="set torch_compile=False"):
        make_trainer(tmp_path, tokenizer, torch_compile=True)


def test_an_op_without_double_backward_fails_clearly_before_any_update(tmp_path, tokenizer, monkeypatch):
    # Without the switch to SDPA's math backend, the fused CPU kernel has no double backward.
    monkeypatch.setattr(
        hf_distill.trainers.meta_trainer, "sdpa_kernel", lambda *backends: contextlib.nullcontext()
    )
    trainer = make_trainer(tmp_path, tokenizer, max_steps=2)
    student_before = copy.deepcopy(trainer.model.state_dict())
    teacher_before = copy.deepcopy(trainer.teacher_model.state_dict())
    with pytest.raises(
        RuntimeError, match="double backward.*derivative for .*attention.* is not implemented"
    ) as error:
        trainer.train()
    assert "before this step updated either model" in str(error.value)
    assert "attn_implementation='eager' or 'sdpa'" in str(error.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, trainer.teacher_model.state_dict()[k]) for k, v in teacher_before.items())


def test_teacher_activation_checkpointing_gives_the_same_meta_steps(tmp_path, tokenizer):
    """Non-reentrant recomputation of the teacher supports the meta-gradient: the same two steps."""
    trainers = {}
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing),
            tokenizer,
            teacher=tiny_classifier_with_dropout(2, seed=1),
            max_steps=2,
            teacher_activation_checkpointing=checkpointing,
        )
        trainer.train()
        assert trainer.teacher_model.is_activation_checkpointing == checkpointing
        trainers[checkpointing] = trainer
    assert_same_parameters(trainers[False].teacher_model, trainers[True].teacher_model, "teacher.")
    assert_same_parameters(trainers[False].model, trainers[True].model, "student.")


def test_a_batch_the_teacher_would_misread_is_refused_as_in_the_distillation_trainer(tmp_path, tokenizer):
    from hf_distill.data.batch import DistillationBatch

    trainer = make_trainer(tmp_path, tokenizer)
    batch = DistillationBatch.from_collated(next(iter(trainer.get_train_dataloader())))
    trainer._teachers_need_own_inputs = lambda: [0]  # as for a teacher with a vocabulary of its own
    with pytest.raises(ValueError, match="no teacher_ input columns.*add_teacher_inputs"):
        trainer._teacher_outputs_with_graph(batch)
    with pytest.raises(ValueError, match="no teacher_ input columns.*add_teacher_inputs"):
        trainer.teacher_logits(batch.student, {})


@pytest.mark.parametrize("teacher_task_weight", [0.0, 0.3])
def test_two_micro_batches_of_four_make_the_step_of_one_batch_of_eight(
    tmp_path, tokenizer, teacher_task_weight
):
    runs = []
    for sizes in (
        dict(per_device_train_batch_size=8),
        dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    ):
        teacher, student = float64_pair()
        trainer = make_trainer(
            tmp_path / str(len(runs)),
            tokenizer,
            teacher,
            student,
            n=32,  # 24 training rows: three steps of 8
            teacher_task_weight=teacher_task_weight,
            **sizes,
        )
        gradients = capture_teacher_gradients(trainer)
        trainer.train()
        runs.append((trainer, gradients))
    (whole, whole_gradients), (accumulated, accumulated_gradients) = runs
    assert accumulated.state.global_step == whole.state.global_step == 3
    assert len(accumulated_gradients) == len(whole_gradients) == 3
    for expected, actual in zip(whole_gradients, accumulated_gradients, strict=True):
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-8, atol=1e-12, msg=name)
    for (name, expected), actual in zip(
        whole.teacher_model.named_parameters(), accumulated.teacher_model.parameters(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12, msg=f"teacher {name}")
    for (name, expected), actual in zip(
        whole.model.named_parameters(), accumulated.model.parameters(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12, msg=f"student {name}")
    keys = ["quiz_loss", "pilot_grad_norm", "quiz_grad_norm", "loss"]
    keys += ["teacher_task_loss"] if teacher_task_weight else []
    for key in keys:
        expected = [log[key] for log in whole.state.log_history if key in log]
        assert len(expected) == 3, key  # logged at every step
        torch.testing.assert_close(
            torch.tensor([log[key] for log in accumulated.state.log_history if key in log]),
            torch.tensor(expected),
            rtol=1e-6,
            atol=1e-9,
            msg=key,
        )


def test_accumulated_meta_step_replays_each_micro_batch_with_its_dropout_masks(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        teacher=tiny_classifier_with_dropout(2, seed=1),
        student=tiny_classifier_with_dropout(1, seed=2),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    losses, original = [], trainer._pilot_loss

    def recorded(*args, **kwargs):
        loss, outputs = original(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss, outputs

    trainer._pilot_loss = recorded
    trainer.train()
    # First-order pass, then the replay for the meta-gradient: each micro-batch sees the same masks twice.
    assert len(losses) == 4
    torch.testing.assert_close(losses[2:], losses[:2], rtol=0, atol=0)


def test_token_level_accumulation_follows_trainers_num_items_normalisation(tmp_path):
    """A causal LM's losses are normalised by the step's kept tokens, not divided by the micro-batches."""
    from test_chunked import lm_dataset, tiny_llama

    student, teacher = tiny_llama(1, 0).double(), tiny_llama(2, 1).double()
    runs = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        args = make_args(
            tmp_path / str(accumulation),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            pilot_learning_rate=5.0,
            optim="sgd",  # Adam's first step is lr·sign(g): float noise in a tiny gradient could flip it
        )
        trainer = MetaDistillTrainer(
            model=copy.deepcopy(student),
            teacher_model=copy.deepcopy(teacher),
            args=args,
            train_dataset=lm_dataset(16),  # rows with different numbers of kept tokens
            quiz_dataset=lm_dataset(8),
        )
        trainer.train()
        runs.append(trainer)
    for role in ("teacher_model", "model"):
        for (name, expected), actual in zip(
            getattr(runs[0], role).named_parameters(), getattr(runs[1], role).parameters(), strict=True
        ):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13, msg=f"{role} {name}")
