"""LGTMTrainer on tiny BERT models: the step's effects, its cost in passes, quiz hygiene and errors."""

from __future__ import annotations

import copy
import logging
import weakref

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
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainerCallback

from hf_distill import LGTMTrainer, LGTMTrainingArguments, kl_divergence


def make_args(tmp_path, **overrides) -> LGTMTrainingArguments:
    defaults = dict(
        learning_rate=1e-3,
        teacher_learning_rate=1e-3,
        quiz_split=0.25,
        temperature=1.0,
        max_grad_norm=0,
    )
    return tiny_run_args(LGTMTrainingArguments, tmp_path, **{**defaults, **overrides})


def make_trainer(tmp_path, tokenizer, n=48, **overrides) -> LGTMTrainer:
    return LGTMTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path, **overrides),
        train_dataset=keyword_dataset(n),
        processing_class=tokenizer,
    )


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def reference_student_step(student_before, teacher, batch) -> tuple[torch.nn.Module, torch.Tensor]:
    """One AdamW step (fresh state) of a copy of the student on 0.5·KL + 0.5·CE against ``teacher``'s
    logits; returns the stepped copy and those logits."""
    reference = copy.deepcopy(student_before).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        z_t = teacher.eval()(**model_inputs(batch)).logits
    z_s = reference(**model_inputs(batch)).logits
    (0.5 * kl_divergence(z_s, z_t, temperature=1.0) + 0.5 * F.cross_entropy(z_s, batch["labels"])).backward()
    optimizer.step()
    return reference, z_t


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_one_step_updates_teacher_then_student_with_the_updated_teacher(tmp_path, tokenizer, mode):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, influence_mode=mode, alpha=0.5)
    student = trainer.model
    student_before = copy.deepcopy(student)
    teacher_before = copy.deepcopy(trainer.teacher_model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()

    teacher_after = trainer.teacher_model
    assert any(
        not torch.equal(a, b)
        for a, b in zip(teacher_before.parameters(), teacher_after.parameters(), strict=True)
    )
    # The real student step: AdamW on the student's loss against the *updated* teacher, from a clean state.
    reference, z_t = reference_student_step(student_before, teacher_after, batch)
    for (name, value), expected in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    # The lookahead did not advance the student's optimizer: one real step only.
    state = (
        trainer.optimizer.optimizer.state
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer.state
    )
    assert {int(s["step"]) for s in state.values()} == {1}

    record = trainer.latest_influence
    assert record["step"] == 0 and record["influence"].shape == (8,)
    assert torch.equal(record["idx"], batch["idx"])
    teacher_probs = z_t.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    torch.testing.assert_close(record["teacher_gold_prob"], teacher_probs)
    log = trainer.state.log_history[0]
    for key in (
        "influence_mean",
        "influence_std",
        "influence_min",
        "influence_max",
        "influence_frac_negative",
        "teacher_grad_norm_aux",
        "teacher_grad_norm_influence",
        "quiz_loss",
    ):
        assert key in log, key


def test_finite_difference_and_exact_modes_agree(tmp_path, tokenizer):
    results = []
    for mode in ("finite_difference", "exact"):
        trainer = make_trainer(tmp_path / mode, tokenizer, max_steps=2, influence_mode=mode)
        trainer.train()
        results.append(trainer.latest_influence["influence"])
    torch.testing.assert_close(results[0], results[1], rtol=2e-2, atol=1e-7)


def test_influence_scale_changes_the_teacher_update(tmp_path, tokenizer):
    """With a large λ the influence term dominates the teacher's gradient; with λ = 0 it is online KD."""
    teachers = []
    for scale in (0.0, 1e4):
        trainer = make_trainer(tmp_path / str(scale), tokenizer, max_steps=1, influence_scale=scale)
        trainer.train()
        teachers.append(dict(trainer.teacher_model.named_parameters()))
        log = trainer.state.log_history[0]
        if scale == 0.0:
            assert log["teacher_grad_norm_influence"] == 0.0
        else:
            assert log["teacher_grad_norm_influence"] > log["teacher_grad_norm_aux"]
    assert any(not torch.equal(teachers[0][n], teachers[1][n]) for n in teachers[0])


def test_sample_weights_form_weights_each_samples_teacher_distillation_term(tmp_path, tokenizer, monkeypatch):
    """The teacher's gradient is that of α_t · mean_i ŵ_i KL_i(p_s ‖ p_t) + (1 − α_t) · CE, with ŵ the normalised
    influence: a sample with weight 0 adds nothing to the distillation term (checked against a manual loss)."""
    import hf_distill.trainers.lgtm_trainer as lgtm_module

    chosen = torch.tensor([0.0, 2.0, 1.0, 0.0, 1.5, 0.5, 1.0, 2.0])
    seen = {}

    def fixed_weights(influence, beta):
        seen["influence"], seen["beta"] = influence.detach().clone(), beta
        return chosen

    monkeypatch.setattr(lgtm_module, "influence_sample_weights", fixed_weights)
    trainer = make_trainer(
        tmp_path, tokenizer, max_steps=1, influence_form="sample_weights", influence_weight_beta=0.7
    )
    student_before = copy.deepcopy(trainer.model)
    teacher_before = copy.deepcopy(trainer.teacher_model)
    batch = next(iter(trainer.get_train_dataloader()))
    grads = {}
    original_step = trainer.teacher_optimizer_step

    def capture_then_step():
        grads.update(
            {n: p.grad.clone() for n, p in trainer.teacher_model.named_parameters() if p.grad is not None}
        )
        original_step()

    trainer.teacher_optimizer_step = capture_then_step
    trainer.train()

    assert seen["beta"] == 0.7
    torch.testing.assert_close(seen["influence"], trainer.latest_influence["influence"])
    z_t = teacher_before.train()(**model_inputs(batch)).logits
    with torch.no_grad():
        z_s = student_before.train()(**model_inputs(batch)).logits
    per_sample = kl_divergence(z_t, z_s, temperature=1.0, reduction="none")  # KL(p_s ‖ p_t)
    loss = 0.4 * (chosen * per_sample).mean() + 0.6 * F.cross_entropy(z_t, batch["labels"])
    loss.backward(retain_graph=True)
    for name, p in teacher_before.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # Not online distillation's gradient: the weights changed the teacher's update.
    teacher_before.zero_grad()
    online = 0.4 * per_sample.mean() + 0.6 * F.cross_entropy(z_t, batch["labels"])
    online.backward()
    assert any(not torch.allclose(grads[n], p.grad) for n, p in teacher_before.named_parameters())
    log = trainer.state.log_history[0]
    assert log["sample_weight_frac_zero"] == pytest.approx(0.25) and log["sample_weight_max"] == 2.0
    assert "influence_scale" not in log  # no λ in this form


def test_influence_grad_ratio_sets_the_influence_share_of_the_teacher_gradient(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, influence_grad_ratio=0.5)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["teacher_grad_norm_influence"] == pytest.approx(0.5 * log["teacher_grad_norm_aux"], rel=1e-4)
    assert log["influence_scale"] > 100 * 1e-3  # far above the teacher's learning rate on these models


class PassCounter:
    """Counts forward calls of a module and backward passes through its outputs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.forwards = 0
        self.backwards = 0
        module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        self.forwards += 1
        logits = output.logits
        if logits.requires_grad:

            def count(grad):
                self.backwards += 1

            logits.register_hook(count)


@pytest.mark.parametrize(("mode", "student_forwards"), [("finite_difference", 5), ("exact", 4)])
def test_passes_per_step(tmp_path, tokenizer, mode, student_forwards):
    # logging_steps large: the separate-norm backward of logging steps is not in the count.
    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, influence_mode=mode, logging_steps=1000)
    student_counter = PassCounter(trainer.model)
    teacher_counter = PassCounter(trainer.teacher_model)
    trainer.train()
    steps = 2
    # Teacher: one forward with its graph (aux + both influence terms) and one no-grad forward for the soft
    # labels of the updated teacher; one backward.
    assert teacher_counter.forwards == 2 * steps
    assert teacher_counter.backwards == 1 * steps
    # Student: the lookahead's forward, the quiz forward at θs', θs+ and θs− (FD) or one jvp (exact), and
    # the real step's forward (the lookahead's graph is not kept for it).
    assert student_counter.forwards == student_forwards * steps
    # Backwards through the student: the lookahead gradient, the quiz gradient, the real step.
    assert student_counter.backwards == 3 * steps


def test_pre_update_student_learns_from_the_teacher_before_its_update(tmp_path, tokenizer):
    """pre_update: the same teacher update as the faithful step; the student's step uses the old teacher."""
    faithful = make_trainer(tmp_path / "updated", tokenizer, max_steps=1, alpha=0.5)
    faithful.train()
    trainer = make_trainer(
        tmp_path / "pre", tokenizer, max_steps=1, alpha=0.5, lgtm_student_targets="pre_update"
    )
    teacher_before = copy.deepcopy(trainer.teacher_model)
    student_before = copy.deepcopy(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()

    # The teacher's LGTM update does not depend on which soft labels the student's real step uses.
    for (name, value), expected in zip(
        trainer.teacher_model.named_parameters(), faithful.teacher_model.parameters(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(trainer.latest_influence["influence"], faithful.latest_influence["influence"])
    # The student: one AdamW step on its loss against the teacher *before* its update.
    reference, z_t = reference_student_step(student_before, teacher_before, batch)
    for (name, value), expected in zip(trainer.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    # ... which is not the faithful student (the comparison can fail).
    assert any(
        not torch.allclose(a, b, atol=1e-6)
        for a, b in zip(trainer.model.parameters(), faithful.model.parameters(), strict=True)
    )
    teacher_probs = z_t.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    torch.testing.assert_close(trainer.latest_influence["teacher_gold_prob"], teacher_probs)


def test_pre_update_saves_a_teacher_forward_and_a_student_forward_and_backward(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, max_steps=2, logging_steps=1000, lgtm_student_targets="pre_update"
    )
    student_counter = PassCounter(trainer.model)
    teacher_counter = PassCounter(trainer.teacher_model)
    trainer.train()
    steps = 2
    assert teacher_counter.forwards == 1 * steps and teacher_counter.backwards == 1 * steps
    assert student_counter.forwards == 4 * steps  # training forward, quiz at θs', θs+ and θs−
    assert student_counter.backwards == 2 * steps  # the real step (also the lookahead's) and the quiz


class SavedActivations:
    """Weak references to what autograd saves during a module's forwards (its parameters left out), so a
    test can ask which of those graphs are still alive."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.refs: list[weakref.ref] = []
        self._parameters = {p.data_ptr() for p in module.parameters()}
        self._hooks = None
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def _enter(self, module, args):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def _exit(self, module, args, output):
        self._hooks.__exit__(None, None, None)

    def _pack(self, tensor):
        if tensor.is_floating_point() and tensor.data_ptr() not in self._parameters:
            self.refs.append(weakref.ref(tensor))
        return tensor

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


@pytest.mark.parametrize("targets", ["updated", "pre_update"])
def test_no_student_graph_outlives_its_backward_and_the_teacher_graph_ends_with_the_step(
    tmp_path, tokenizer, targets
):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, logging_steps=1, lgtm_student_targets=targets)
    student = SavedActivations(trainer.model)
    teacher = SavedActivations(trainer.teacher_model)
    at_quiz, at_step_end = [], []
    quiz_batch = trainer.quiz_batch

    def checked_quiz_batch():
        at_quiz.append((student.alive(), teacher.alive(), len(student.refs)))
        return quiz_batch()

    class AtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            at_step_end.append((student.alive(), teacher.alive()))

    trainer.quiz_batch = checked_quiz_batch
    trainer.add_callback(AtStepEnd())
    trainer.train()
    assert len(at_quiz) == 2
    for student_alive, teacher_alive, student_saved in at_quiz:
        # The student's training forward saved activations, and none is alive once the influence passes
        # start; the teacher's one forward is (its graph serves the auxiliary loss and the influence).
        assert student_saved > 0 and student_alive == 0
        assert teacher_alive > 0
    assert at_step_end == [(0, 0), (0, 0)]


def test_quiz_rows_never_appear_in_training_batches(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, n=40, num_train_epochs=2)
    quiz_ids = set(trainer.quiz_dataset["idx"])
    assert len(quiz_ids) == 10
    train_ids = set()
    for batch in trainer.get_train_dataloader():
        train_ids |= set(batch["idx"].tolist())
    assert train_ids.isdisjoint(quiz_ids) and len(train_ids) == 30
    seen = []
    original = trainer.quiz_batch

    def spy(step=None):
        batch = original(step)
        seen.extend(batch["idx"].tolist())
        return batch

    trainer.quiz_batch = spy
    trainer.train()
    assert set(seen) <= quiz_ids and len(seen) == 8 * trainer.state.global_step


def test_eval_set_as_quiz_is_explicit_and_warned(tmp_path, tokenizer, caplog):
    data = keyword_dataset(24)
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainers.quiz_trainer"):
        trainer = LGTMTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=make_args(tmp_path),
            train_dataset=keyword_dataset(24, seed=3),
            eval_dataset=data,
            quiz_dataset=data,
            processing_class=tokenizer,
        )
    assert "no longer clean" in caplog.text
    assert len(trainer.train_dataset) == 24  # nothing carved out of the training set


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"influence_mode": "approx"}, "influence_mode='approx' is unknown"),
        ({"fd_radius": 0.0}, "fd_radius must be a finite number > 0"),
        ({"influence_loss": "ce"}, "influence_loss='ce' is unknown"),
        ({"lookahead": "adam"}, "lookahead='adam' is unknown"),
        ({"influence_scale": -1.0}, "influence_scale must be a finite number >= 0"),
        ({"influence_form": "weights"}, "influence_form='weights' is unknown"),
        ({"influence_weight_beta": -1.0}, "influence_weight_beta must be a finite number >= 0"),
        ({"influence_weight_beta": float("inf")}, "influence_weight_beta must be a finite number >= 0"),
        ({"influence_grad_ratio": 0.0}, "influence_grad_ratio must be a finite number > 0"),
        ({"influence_grad_ratio": float("nan")}, "influence_grad_ratio must be a finite number > 0"),
        ({"influence_form": "sample_weights", "influence_scale": 1.0}, "has no λ"),
        ({"influence_scale": 1.0, "influence_grad_ratio": 0.1}, "both set λ"),
        ({"quiz_split": 0.0}, "quiz_split must be a finite number in"),
        ({"influence_loss": "student_kl", "distill_loss": "dist"}, "per-sample distillation loss"),
        ({"lgtm_student_targets": "old"}, "lgtm_student_targets='old' is unknown"),
        (
            {"lgtm_student_targets": "pre_update", "hidden_distill_weight": 1.0},
            "use lgtm_student_targets='updated'",
        ),
    ],
)
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_unsupported_settings_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="single-label sequence classification"):
        LGTMTrainer(
            model=tiny_classifier(1, num_labels=1),
            teacher_model=tiny_classifier(2, num_labels=1),
            args=make_args(tmp_path),
            train_dataset=keyword_dataset(16).map(lambda r: {"label": float(r["label"])}),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="pre_update.*gradient_accumulation_steps=1"):
        make_trainer(tmp_path, tokenizer, gradient_accumulation_steps=2, lgtm_student_targets="pre_update")
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, optim="sgd")
    student_before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(ValueError, match="lookahead='sgd'"):
        trainer.train()
    assert all(
        torch.equal(v, trainer.model.state_dict()[k]) for k, v in student_before.items()
    )  # no step taken


def test_teacher_activation_checkpointing_gives_the_same_steps_and_keeps_less(tmp_path, tokenizer):
    """Recomputing the teacher's activations replays its dropout: the same updates, fewer kept tensors."""
    results = {}
    for checkpointing in (False, True):
        trainer = LGTMTrainer(
            model=tiny_classifier_with_dropout(1, seed=2),
            teacher_model=tiny_classifier_with_dropout(2, seed=1),
            args=make_args(
                tmp_path / str(checkpointing),
                max_steps=2,
                logging_steps=1,
                teacher_activation_checkpointing=checkpointing,
            ),
            train_dataset=keyword_dataset(48),
            processing_class=tokenizer,
        )
        teacher = SavedActivations(trainer.teacher_model)
        alive_at_quiz = []
        quiz_batch = trainer.quiz_batch

        def checked_quiz_batch(quiz_batch=quiz_batch, teacher=teacher, alive_at_quiz=alive_at_quiz):
            alive_at_quiz.append(teacher.alive())
            return quiz_batch()

        trainer.quiz_batch = checked_quiz_batch
        trainer.train()
        results[checkpointing] = (trainer, alive_at_quiz)

    (plain, plain_alive), (checkpointed, checkpointed_alive) = results[False], results[True]
    assert checkpointed.teacher_model.is_activation_checkpointing
    assert_same_parameters(plain.teacher_model, checkpointed.teacher_model, "teacher.")
    assert_same_parameters(plain.model, checkpointed.model, "student.")
    assert all(0 < c < p / 2 for c, p in zip(checkpointed_alive, plain_alive, strict=True))


def test_teacher_activation_checkpointing_needs_a_model_that_supports_it(tmp_path, tokenizer):
    teacher = tiny_classifier(2, seed=1)
    teacher.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="teacher_activation_checkpointing=True, but the teacher"):
        LGTMTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=teacher,
            args=make_args(tmp_path, teacher_activation_checkpointing=True),
            train_dataset=keyword_dataset(48),
            processing_class=tokenizer,
        )


def test_teacher_update_refuses_student_gradients_without_their_logits(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    grads = [torch.zeros_like(p) for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="student_grads without student_logits"):
        trainer.lgtm_teacher_update(trainer.model, batch, student_grads=grads)


# ----- golden test: the fast step against the reference's order, written out slowly ----------------------------


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · KL(p ‖ q) of each row, with p = softmax(p_logits / τ), q = softmax(q_logits / τ)."""
    log_p = F.log_softmax(p_logits.float() / tau, -1)
    log_q = F.log_softmax(q_logits.float() / tau, -1)
    return tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def adamw(model: torch.nn.Module, lr: float, eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)


def set_grads(params: list, grads: list) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g


class SlowLGTM:
    """LGTM's step in the reference's order: a deep copy of the student for the lookahead, which steps with its
    own copy of the student's AdamW; the quiz gradient v on the copy; the teacher's gradient of the auxiliary
    loss plus, for finite differences, the teacher's gradients at θs ± εv (one copy of the student each), or,
    for the exact influence, the reverse-over-reverse product ∇θt (∇θs mean_i ℓ_i · v); then the student's
    real step against the updated teacher."""

    def __init__(self, student, teacher, args: LGTMTrainingArguments) -> None:
        self.student, self.teacher, self.args = student, teacher, args
        self.student_optimizer = adamw(student, args.learning_rate, args.adam_epsilon)
        self.teacher_optimizer = adamw(teacher, args.teacher_learning_rate, args.adam_epsilon)

    def student_loss(self, z_s, z_t, labels):
        a = self.args
        return a.alpha * kl_rows(z_t, z_s, a.temperature).mean() + (1 - a.alpha) * F.cross_entropy(
            z_s, labels
        )

    def influence_loss(self, z_s, z_t):  # teacher_kl: α_t · KL(p_s ‖ p_t), the student's outputs as targets
        return self.args.teacher_alpha * kl_rows(z_s, z_t, self.args.temperature)

    def step(self, batch, quiz) -> None:
        a, x, y = self.args, model_inputs(batch), batch["labels"]
        teacher_params = list(self.teacher.parameters())
        # 1. Lookahead: an optimizer step of a deep copy of the student.
        shadow = copy.deepcopy(self.student).train()
        shadow_optimizer = adamw(shadow, a.learning_rate, a.adam_epsilon)
        shadow_optimizer.load_state_dict(copy.deepcopy(self.student_optimizer.state_dict()))
        with torch.no_grad():
            z_t = self.teacher.train()(**x).logits
        z_s = shadow(**x).logits
        self.student_loss(z_s, z_t, y).backward()
        torch.nn.utils.clip_grad_norm_(shadow.parameters(), a.max_grad_norm)
        shadow_optimizer.step()
        z_s_here = z_s.detach()
        # 2. v: the quiz gradient at θs', without dropout.
        shadow.eval().zero_grad()
        F.cross_entropy(shadow(**model_inputs(quiz)).logits, quiz["labels"]).backward()
        v = [p.grad.clone() for p in shadow.parameters()]
        # 3. The teacher's gradient: the auxiliary loss, then the influence term.
        z_t = self.teacher(**x).logits
        aux = a.teacher_alpha * kl_rows(z_s_here, z_t, a.temperature).mean()
        aux = aux + (1 - a.teacher_alpha) * F.cross_entropy(z_t, y)
        grads = [g for g in torch.autograd.grad(aux, teacher_params, allow_unused=True)]
        for index, g in enumerate(self.influence_gradient(x, v)):
            if g is not None:
                grads[index] = g if grads[index] is None else grads[index] + g
        set_grads(teacher_params, grads)
        torch.nn.utils.clip_grad_norm_(teacher_params, a.teacher_max_grad_norm)
        self.teacher_optimizer.step()
        self.teacher_optimizer.zero_grad()
        # 4. The student's real step against the updated teacher.
        with torch.no_grad():
            z_t = self.teacher.eval()(**x).logits
        self.student_loss(self.student.train()(**x).logits, z_t, y).backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), a.max_grad_norm)
        self.student_optimizer.step()
        self.student_optimizer.zero_grad()

    def influence_gradient(self, x, v) -> list:
        """∇θt of −λ · mean_i w_i, w_i = ∇θs ℓ_i · v at the student's current parameters θs."""
        a, teacher_params = self.args, list(self.teacher.parameters())
        if a.influence_mode == "finite_difference":
            epsilon = a.fd_radius / torch.sqrt(sum((d.double() ** 2).sum() for d in v)).item()
            total = [None] * len(teacher_params)
            for sign in (1.0, -1.0):
                probe = copy.deepcopy(self.student).eval()
                with torch.no_grad():
                    for p, d in zip(probe.parameters(), v, strict=True):
                        p.add_(sign * epsilon * d)
                    z_probe = probe(**x).logits
                loss = self.influence_loss(z_probe, self.teacher(**x).logits).mean()
                scale = -a.influence_scale * sign / (2 * epsilon)
                for i, g in enumerate(torch.autograd.grad(loss, teacher_params, allow_unused=True)):
                    if g is not None:
                        total[i] = scale * g if total[i] is None else total[i] + scale * g
            return total
        probe = copy.deepcopy(self.student).eval()
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            loss = self.influence_loss(probe(**x).logits, self.teacher(**x).logits).mean()
            student_grads = torch.autograd.grad(loss, list(probe.parameters()), create_graph=True)
            mean_influence = sum((g * d).sum() for g, d in zip(student_grads, v, strict=True))
            influence = -a.influence_scale * mean_influence
            return list(torch.autograd.grad(influence, teacher_params, allow_unused=True))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_golden_step_matches_the_reference_order(tmp_path, tokenizer, mode, steps):
    """The fast LGTM step (functional lookahead, one teacher forward and backward) equals the slow step in the
    reference's order to float32 noise, teacher and student, after one and after three steps."""
    overrides = dict(
        max_steps=steps,
        influence_mode=mode,
        alpha=0.5,
        temperature=2.0,
        teacher_alpha=0.4,
        influence_scale=1.0,  # λ large enough that an error in the influence term shows
        max_grad_norm=1.0,
        teacher_max_grad_norm=1.0,
        lr_scheduler_type="constant",
        teacher_lr_scheduler_type="constant",
        optim="adamw_torch",
        # Adam divides by √v + ε: with a tiny ε, a gradient entry that is zero up to rounding (e.g. a key bias,
        # to which softmax attention is blind) becomes a full-size step whose sign is rounding noise. A
        # larger ε keeps such entries small, so the comparison sees the computation, not that amplification.
        adam_epsilon=1e-3,
    )
    fast = make_trainer(tmp_path, tokenizer, **overrides)
    slow = SlowLGTM(copy.deepcopy(fast.model), copy.deepcopy(fast.teacher_model), fast.args)
    batches = [b for _, b in zip(range(steps), fast.get_train_dataloader(), strict=False)]
    fast.train()
    for step, batch in enumerate(batches):
        slow.step(batch, fast.quiz_batch(step))
    assert_same_parameters(slow.teacher, fast.teacher_model, "teacher ")
    assert_same_parameters(slow.student, fast.model, "student ")
    initial = tiny_classifier(2, seed=1)
    moved = max(
        (a - b).abs().max() for a, b in zip(slow.teacher.parameters(), initial.parameters(), strict=True)
    )
    assert moved > 1e-4  # the teacher did learn: the comparison is not between two untouched copies


def test_distillation_meta_and_lgtm_weigh_their_losses_by_one_rule(tmp_path, tokenizer):
    from hf_distill import (
        DistillationTrainer,
        DistillationTrainingArguments,
        MetaDistillTrainer,
        MetaDistillTrainingArguments,
    )

    def build(trainer_class, args):  # each trainer its own models: the distillation one freezes its teacher
        return trainer_class(
            model=tiny_classifier(1, seed=2),
            teacher_model=tiny_classifier(2, seed=1),
            args=args,
            train_dataset=keyword_dataset(32),
            processing_class=tokenizer,
        )

    trainers = [
        build(DistillationTrainer, tiny_run_args(DistillationTrainingArguments, tmp_path / "kd", alpha=0.3)),
        build(MetaDistillTrainer, tiny_run_args(MetaDistillTrainingArguments, tmp_path / "meta", alpha=0.3)),
        build(LGTMTrainer, make_args(tmp_path / "lgtm", alpha=0.3)),
    ]
    distill, task = torch.tensor(0.8), torch.tensor(2.0)
    for trainer in trainers:
        assert trainer.student_loss(distill, task).item() == pytest.approx(0.3 * 0.8 + 0.7 * 2.0)
        assert trainer.student_loss(distill, None) is distill  # no task loss: the distillation term alone
    # LGTM's lookahead loss, from logits, follows the same rule.
    generator = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(4, 2, generator=generator), torch.randn(4, 2, generator=generator)
    labels = torch.tensor([0, 1, 1, 0])
    expected = 0.3 * kl_divergence(z_s, z_t, temperature=1.0) + 0.7 * F.cross_entropy(z_s, labels)
    torch.testing.assert_close(trainers[2]._student_objective(z_s, z_t, labels), expected)


def test_online_and_lgtm_teachers_learn_from_one_online_loss(tmp_path, tokenizer):
    from hf_distill import OnlineDistillTrainer, OnlineDistillTrainingArguments
    from hf_distill.data.batch import DistillationBatch

    settings = dict(teacher_alpha=0.4, temperature=2.0)
    online = OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=tiny_run_args(OnlineDistillTrainingArguments, tmp_path / "online", **settings),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    lgtm = make_trainer(tmp_path, tokenizer, **settings)
    batch = DistillationBatch.from_collated(next(iter(online.get_train_dataloader())))
    z_s = torch.randn(batch.labels.shape[0], 2, generator=torch.Generator().manual_seed(0))
    z_t = online.teacher_models[0](**batch.features).logits
    kl = kl_divergence(z_t, z_s, temperature=2.0, scale_by_temperature_squared=True)
    expected = 0.4 * kl + 0.6 * F.cross_entropy(z_t, batch.labels)
    torch.testing.assert_close(online.teacher_objective(batch, z_s), expected)
    torch.testing.assert_close(lgtm._teacher_aux_loss(z_t, z_s, batch.labels), expected)
    for trainer in (online, lgtm):
        assert list(trainer._logged_components) == ["teacher_kl", "teacher_task_loss"]
        torch.testing.assert_close(trainer._logged_components["teacher_kl"][0], kl.detach())


def test_callbacks_given_without_a_trainer_are_bound_and_those_given_one_keep_it(tmp_path, tokenizer):
    from types import SimpleNamespace

    from hf_distill import InfluenceLoggerCallback

    unbound = InfluenceLoggerCallback(output_file=tmp_path / "unbound.jsonl")
    elsewhere = SimpleNamespace(latest_influence=None)
    given = InfluenceLoggerCallback(output_file=tmp_path / "given.jsonl", trainer=elsewhere)
    trainer = LGTMTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path),
        train_dataset=keyword_dataset(48),
        processing_class=tokenizer,
        callbacks=[unbound, given],
    )
    assert unbound.trainer is trainer
    assert given.trainer is elsewhere


@pytest.mark.parametrize("student_targets", ["updated", "pre_update"])
def test_the_step_influence_record_comes_from_one_hook(tmp_path, tokenizer, student_targets):
    class TaggedRecords(LGTMTrainer):
        def influence_record(self, weights, batch, student_logits):
            return {**super().influence_record(weights, batch, student_logits), "tag": "hook"}

    trainer = TaggedRecords(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path, max_steps=1, lgtm_student_targets=student_targets),
        train_dataset=keyword_dataset(48),
        processing_class=tokenizer,
    )
    assert trainer.latest_influence is None
    trainer.train()
    record = trainer.latest_influence
    assert record["tag"] == "hook" and record["step"] == 0
    # The teacher column is filled from the soft labels of the student's real step, in both orders.
    assert record["teacher_gold_prob"].shape == record["influence"].shape == (8,)
    assert torch.all((record["teacher_gold_prob"] > 0) & (record["teacher_gold_prob"] < 1))


class RecordEveryStep(TrainerCallback):
    """Keeps each optimisation step's influence record."""

    def __init__(self) -> None:
        self.trainer, self.records = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.records.append(self.trainer.latest_influence)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(influence_mode="finite_difference"),
        dict(influence_mode="exact", influence_form="sample_weights", max_grad_norm=1.0),
    ],
)
def test_two_micro_batches_of_four_make_the_step_of_one_batch_of_eight(tmp_path, tokenizer, overrides):
    runs = []
    for sizes in (
        dict(per_device_train_batch_size=8),
        dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    ):
        recorder = RecordEveryStep()
        trainer = LGTMTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=tiny_classifier(2, seed=1),
            args=make_args(tmp_path / str(len(runs)), alpha=0.5, **sizes, **overrides),
            train_dataset=keyword_dataset(32),  # 24 training rows: three steps of 8
            processing_class=tokenizer,
            callbacks=[recorder],
        )
        recorder.trainer = trainer
        trainer.train()
        runs.append((trainer, recorder.records))
    (whole, whole_records), (accumulated, accumulated_records) = runs
    assert accumulated.state.global_step == whole.state.global_step == 3
    assert_same_parameters(whole.teacher_model, accumulated.teacher_model, "teacher ")
    assert_same_parameters(whole.model, accumulated.model, "student ")
    # One record per optimisation step, one row per sample of the step, as without accumulation.
    assert len(accumulated_records) == len(whole_records) == 3
    for expected, actual in zip(whole_records, accumulated_records, strict=True):
        assert actual["step"] == expected["step"]
        assert torch.equal(actual["idx"], expected["idx"]) and actual["idx"].shape == (8,)
        for key in ("influence", "student_gold_prob", "teacher_gold_prob"):
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    for key in ("quiz_loss", "influence_mean", "loss"):
        expected = [log[key] for log in whole.state.log_history if key in log]
        assert len(expected) == 3, key  # logged at every step
        torch.testing.assert_close(
            torch.tensor([log[key] for log in accumulated.state.log_history if key in log]),
            torch.tensor(expected),
            rtol=1e-4,
            atol=1e-6,
            msg=key,
        )


def test_pre_update_is_refused_under_fsdp2(tmp_path, tokenizer, monkeypatch):
    # Its teacher step reads the student's gradient after the backward, which FSDP2 leaves sharded.
    import hf_distill.trainers.lgtm_trainer as lgtm_trainer

    monkeypatch.setattr(lgtm_trainer, "is_fsdp2", lambda accelerator: True)
    with pytest.raises(ValueError, match="which FSDP2 leaves sharded; use lgtm_student_targets='updated'"):
        make_trainer(tmp_path, tokenizer, lgtm_student_targets="pre_update")
    make_trainer(tmp_path / "updated", tokenizer)  # the default form is accepted
