"""hf_distill.safety.resume_changes: a resume with a changed learning rate or weight decay applies it to the
restored optimizer and schedule (student and teacher); every other changed argument is named."""

from __future__ import annotations

import logging

import pytest
import torch
from testing_utils import TINY_RUN, keyword_dataset, tiny_classifier
from transformers import TrainerCallback, get_scheduler

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
)
from hf_distill.safety.resume_changes import apply_new_hyperparameters, changed_arguments


def _optimizer_and_schedule(lr=1e-3, wd=0.1):
    decay, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW(
        [{"params": [decay], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    return optimizer, schedule, decay


def test_a_new_learning_rate_rescales_the_schedule_at_its_position():
    optimizer, schedule, decay = _optimizer_and_schedule()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 10)
    applied = apply_new_hyperparameters(optimizer, schedule, (1e-3, 5e-4), (0.1, 0.1), [decay])
    assert applied == ["student learning rate 0.001 -> 0.0005"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * 6 / 10] * 2)
    optimizer.step()
    schedule.step()  # the decay goes on from the new peak
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * 5 / 10] * 2)


def test_a_new_weight_decay_goes_to_the_decaying_groups_only():
    optimizer, schedule, decay = _optimizer_and_schedule()
    applied = apply_new_hyperparameters(
        optimizer, schedule, (1e-3, 1e-3), (0.1, 0.0), [decay], role="teacher"
    )
    assert applied == ["teacher weight decay 0.1 -> 0"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    apply_new_hyperparameters(optimizer, schedule, (1e-3, 1e-3), (0.0, 0.05), [decay])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_changed_arguments_ignore_paths_and_compare_values():
    saved = {"temperature": 2.0, "output_dir": "a", "alpha": 0.5, "report_to": []}
    current = {"temperature": 3.0, "output_dir": "b", "alpha": 0.5, "report_to": []}
    assert changed_arguments(saved, current) == {"temperature": (2.0, 3.0)}


class LearningRates(TrainerCallback):
    def __init__(self):
        self.by_step = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("learning_rate", "teacher_learning_rate"):
            if logs and key in logs:
                self.by_step.setdefault(state.global_step, {})[key] = logs[key]


def _kd(output, tokenizer, callbacks=(), **overrides):
    args = DistillationTrainingArguments(
        **{
            **dict(TINY_RUN, output_dir=str(output), max_steps=4, save_strategy="steps", save_steps=2),
            **overrides,
        }
    )
    return DistillationTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(32),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def test_resuming_with_a_lower_learning_rate_uses_it(tmp_path, tokenizer, caplog):
    _kd(tmp_path, tokenizer, learning_rate=1e-3, lr_scheduler_type="linear").train()
    rates = LearningRates()
    resumed = _kd(tmp_path, tokenizer, [rates], learning_rate=2e-4, lr_scheduler_type="linear")
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.resume_changes"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "student learning rate 0.001 -> 0.0002, applied to the restored optimizer" in caplog.text
    # Linear decay over 4 steps from the new peak: the rate logged at step 3 is the one step 3 used.
    assert rates.by_step[3]["learning_rate"] == pytest.approx(2e-4 * (4 - 2) / 4)
    assert "learning_rate: " not in caplog.text  # applied, so not listed among the other changes


def test_a_changed_temperature_is_named_in_a_warning(tmp_path, tokenizer, caplog):
    _kd(tmp_path, tokenizer, temperature=2.0).train()
    resumed = _kd(tmp_path, tokenizer, temperature=4.0, alpha=0.3)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.resume_changes"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "alpha: 0.5 -> 0.3; temperature: 2.0 -> 4.0" in caplog.text
    caplog.clear()
    unchanged = _kd(tmp_path, tokenizer, temperature=2.0)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.resume_changes"):
        unchanged.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert caplog.text == ""


def test_resuming_with_a_new_teacher_learning_rate_uses_it(tmp_path, tokenizer, caplog):
    def online(callbacks=(), **overrides):
        args = OnlineDistillTrainingArguments(
            **{
                **dict(TINY_RUN, output_dir=str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2),
                "teacher_lr_scheduler_type": "constant",
                **overrides,
            }
        )
        return OnlineDistillTrainer(
            model=tiny_classifier(1, seed=2),
            teacher_model=tiny_classifier(2, seed=1),
            args=args,
            train_dataset=keyword_dataset(32),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )

    online(teacher_learning_rate=1e-4, teacher_weight_decay=0.0).train()
    rates = LearningRates()
    resumed = online([rates], teacher_learning_rate=3e-4, teacher_weight_decay=0.01)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.resume_changes"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "teacher learning rate 0.0001 -> 0.0003; teacher weight decay 0 -> 0.01" in caplog.text
    assert rates.by_step[3]["teacher_learning_rate"] == pytest.approx(3e-4)
    groups = resumed.teacher_optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]
