"""Fault injection: every fault and bad input of the reliability page (docs/reliability.md), each with the outcome it must get."""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from testing_utils import TINY_RUN, keyword_dataset, tiny_classifier, tiny_run_args
from transformers import TrainerCallback

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    LGTMTrainer,
    LGTMTrainingArguments,
    MetaDistillTrainer,
    MetaDistillTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
)
from hf_distill.data.quiz import split_quiz
from hf_distill.safety.checksums import CheckpointIntegrityError
from hf_distill.safety.nonfinite import NonFiniteError, first_nonfinite_parameter
from hf_distill.teacher.checkpoint import gather_teacher_state, save_teacher_state

# ----- arguments that would pass a plain `x > 0` test and still give non-finite models ----------------------


@pytest.mark.parametrize(
    ("args_class", "name", "value", "valid"),
    [
        (DistillationTrainingArguments, "temperature", math.inf, "> 0"),
        (DistillationTrainingArguments, "temperature", math.nan, "> 0"),
        (DistillationTrainingArguments, "alpha", math.nan, "in [0, 1]"),
        (DistillationTrainingArguments, "jsd_beta", math.nan, "in [0, 1]"),
        (DistillationTrainingArguments, "dist_intra_weight", math.inf, ">= 0"),
        (DistillationTrainingArguments, "crd_temperature", math.inf, "> 0"),
        (DistillationTrainingArguments, "hidden_distill_weight", math.nan, ">= 0"),
        (DistillationTrainingArguments, "learning_rate", math.inf, ">= 0"),
        (DistillationTrainingArguments, "max_grad_norm", math.nan, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_learning_rate", math.inf, "> 0"),
        (OnlineDistillTrainingArguments, "teacher_max_grad_norm", math.nan, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_weight_decay", math.inf, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_warmup_ratio", math.nan, "in [0, 1)"),
        (OnlineDistillTrainingArguments, "teacher_alpha", math.nan, "in [0, 1]"),
        (MetaDistillTrainingArguments, "pilot_learning_rate", math.inf, "> 0"),
        (MetaDistillTrainingArguments, "teacher_task_weight", math.inf, ">= 0"),
        (MetaDistillTrainingArguments, "quiz_split", math.nan, "in (0, 1)"),
        (LGTMTrainingArguments, "fd_radius", math.inf, "> 0"),
        (LGTMTrainingArguments, "influence_scale", math.nan, ">= 0"),
        (LGTMTrainingArguments, "influence_scale", math.inf, ">= 0"),
    ],
)
def test_non_finite_arguments_are_refused_with_their_range(tmp_path, args_class, name, value, valid):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite number {valid}, got")):
        tiny_run_args(args_class, tmp_path, **{name: value})


def test_teacher_weights_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_weights\[1\] must be a finite number >= 0, got inf"):
        tiny_run_args(DistillationTrainingArguments, tmp_path, teacher_weights=[1.0, math.inf])


# ----- what leaves the machine ---------------------------------------------------------------------------------

SECRET = "hf_abcdefSECRET123"


def _files_containing(folder: Path, needle: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_a_token_in_teacher_model_init_kwargs_is_in_no_saved_file(tmp_path, tokenizer):
    args = tiny_run_args(
        DistillationTrainingArguments,
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        teacher_model_init_kwargs={"token": SECRET},
    )
    trainer = DistillationTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "training_args.bin").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "training_args.bin").is_file()
    assert _files_containing(tmp_path, SECRET) == []
    assert trainer.args.teacher_model_init_kwargs["token"] == SECRET


# ----- checkpoints whose teacher state is missing or damaged ---------------------------------------------------


def _online_trainer(output: Path, tokenizer, **overrides) -> OnlineDistillTrainer:
    args = OnlineDistillTrainingArguments(
        **{
            **dict(TINY_RUN, output_dir=str(output), max_steps=4, teacher_warmup_ratio=0.5),
            "save_strategy": "steps",
            "save_steps": 2,
            **overrides,
        }
    )
    return OnlineDistillTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(32),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def online_checkpoint(tmp_path_factory, tokenizer) -> Path:
    output = tmp_path_factory.mktemp("online_run")
    _online_trainer(output, tokenizer).train()
    return output / "checkpoint-2"


@pytest.fixture
def checkpoint_copy(online_checkpoint, tmp_path) -> Path:
    target = tmp_path / "checkpoint-2"
    shutil.copytree(online_checkpoint, target)
    return target


def _resume(checkpoint: Path, tokenizer, **overrides) -> OnlineDistillTrainer:
    trainer = _online_trainer(checkpoint.parent / "resumed", tokenizer, **overrides)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_the_teachers_optimizer_or_schedule_is_refused(checkpoint_copy, tokenizer, name):
    (checkpoint_copy / "teacher" / name).unlink()
    with pytest.raises(
        CheckpointIntegrityError, match=rf"lost teacher/{name}.*allow_partial_teacher_checkpoint=True"
    ):
        _resume(checkpoint_copy, tokenizer)


def test_allow_partial_teacher_checkpoint_resumes_with_a_warning(checkpoint_copy, tokenizer, caplog):
    (checkpoint_copy / "teacher" / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="hf_distill.teacher"):
        trainer = _resume(checkpoint_copy, tokenizer, allow_partial_teacher_checkpoint=True)
    assert "without the teacher's scheduler.pt" in caplog.text
    assert trainer.state.global_step == 4


def test_zeros_over_half_the_teachers_weights_are_refused(checkpoint_copy, tokenizer):
    weights = checkpoint_copy / "teacher" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"trainable\.safetensors does not match the SHA-256"):
        _resume(checkpoint_copy, tokenizer)


def test_a_truncated_teacher_file_gets_our_message_naming_it(checkpoint_copy, tokenizer):
    weights = checkpoint_copy / "teacher" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        CheckpointIntegrityError, match=r"trainable\.safetensors has 1000 bytes but was written"
    ):
        _resume(checkpoint_copy, tokenizer)
    # A checkpoint from before manifests: the loader's failure is still reported with the file's name.
    (checkpoint_copy / "teacher" / "manifest.json").unlink()
    (checkpoint_copy / "checkpoint_manifest.json").unlink()
    (checkpoint_copy / "distillation_args.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"trainable\.safetensors cannot be read"):
        _resume(checkpoint_copy, tokenizer)


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning(checkpoint_copy, tokenizer, caplog):
    (checkpoint_copy / "teacher" / "manifest.json").unlink()
    (checkpoint_copy / "checkpoint_manifest.json").unlink()
    (checkpoint_copy / "distillation_args.json").unlink()
    with caplog.at_level(logging.WARNING, logger="hf_distill"):
        trainer = _resume(checkpoint_copy, tokenizer)
    assert "checkpoint_manifest.json (written before checkpoints were verified)" in caplog.text
    assert "teacher state in" in caplog.text and "cannot be verified" in caplog.text
    assert trainer.state.global_step == 4


# ----- data the quiz-driven trainers choke on ------------------------------------------------------------------


def _quiz_trainer(trainer_class, tmp_path, tokenizer, train_dataset, **kwargs):
    args_class = LGTMTrainingArguments if trainer_class is LGTMTrainer else MetaDistillTrainingArguments
    args = tiny_run_args(args_class, tmp_path, quiz_split=0.25, **kwargs.pop("args", {}))
    return trainer_class(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **kwargs,
    )


def _with_labels(dataset: datasets.Dataset, labels: list[int]) -> datasets.Dataset:
    return dataset.remove_columns("label").add_column("label", labels)


def test_lgtm_ignores_rows_labelled_minus_100(tmp_path, tokenizer):
    data = keyword_dataset(48)
    labels = [-100 if i % 5 == 0 else label for i, label in enumerate(data["label"])]
    trainer = _quiz_trainer(
        LGTMTrainer,
        tmp_path,
        tokenizer,
        _with_labels(data, labels),
        args={"max_steps": 3, "max_grad_norm": 0},
    )
    assert -100 not in trainer.quiz_dataset["label"]  # quiz rows without a label teach nothing: left out
    trainer.train()
    record = trainer.latest_influence
    ignored = torch.tensor([labels[i] == -100 for i in record["idx"].tolist()])
    assert ignored.any()
    assert torch.isnan(record["student_gold_prob"][ignored]).all()
    assert torch.isfinite(record["student_gold_prob"][~ignored]).all()
    assert torch.isfinite(record["influence"]).all()
    for p in trainer.teacher_model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("trainer_class", [LGTMTrainer, MetaDistillTrainer])
def test_quiz_trainers_without_labels_are_refused_when_built(tmp_path, tokenizer, trainer_class):
    unlabelled = keyword_dataset(32).remove_columns("label")
    with pytest.raises(
        ValueError, match=r"quiz data has no label column.*give quiz_dataset .*'label' column"
    ):
        _quiz_trainer(
            trainer_class,
            tmp_path,
            tokenizer,
            unlabelled,
            args={"alpha": 1.0, **({"teacher_alpha": 1.0} if trainer_class is LGTMTrainer else {})},
        )
    with pytest.raises(ValueError, match=r"quiz data has no label column"):
        _quiz_trainer(trainer_class, tmp_path, tokenizer, keyword_dataset(32), quiz_dataset=unlabelled)


def test_lgtm_with_a_labelled_quiz_but_unlabelled_training_data_is_refused(tmp_path, tokenizer):
    unlabelled = keyword_dataset(32).remove_columns("label")
    with pytest.raises(ValueError, match=r"LGTMTrainer needs labels in train_dataset"):
        _quiz_trainer(
            LGTMTrainer,
            tmp_path,
            tokenizer,
            unlabelled,
            quiz_dataset=keyword_dataset(8),
            args={"alpha": 1.0, "teacher_alpha": 1.0},
        )


@pytest.mark.parametrize("trainer_class", [LGTMTrainer, MetaDistillTrainer])
def test_empty_training_or_quiz_sets_are_refused_when_built(tmp_path, tokenizer, trainer_class):
    empty = keyword_dataset(4).select([])
    with pytest.raises(ValueError, match=r"The training set \(train_dataset\) is empty"):
        _quiz_trainer(trainer_class, tmp_path, tokenizer, empty)
    with pytest.raises(ValueError, match=r"The quiz set \(quiz_dataset\) is empty"):
        _quiz_trainer(trainer_class, tmp_path, tokenizer, keyword_dataset(16), quiz_dataset=empty)


def test_an_empty_training_set_is_refused_by_every_trainer(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"The training set \(train_dataset\) is empty"):
        DistillationTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=tiny_run_args(DistillationTrainingArguments, tmp_path),
            train_dataset=keyword_dataset(4).select([]),
        )


@pytest.mark.parametrize("column", ["label", "labels"])
def test_labels_outside_the_classes_are_named_when_built(tmp_path, tokenizer, column):
    data = keyword_dataset(40)
    labels = list(data["label"])
    labels[17] = 2
    data = data.remove_columns("label").add_column(column, labels)
    with pytest.raises(ValueError, match=rf"'{column}' column holds 2 at row 17 .*outside \[0, 2\)"):
        DistillationTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=tiny_run_args(DistillationTrainingArguments, tmp_path),
            train_dataset=data,
        )
    with pytest.raises(ValueError, match=r"evaluation data's 'label' column holds -3 at row 0"):
        DistillationTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=tiny_run_args(DistillationTrainingArguments, tmp_path),
            train_dataset=keyword_dataset(8),
            eval_dataset=_with_labels(keyword_dataset(4), [-3, 0, 1, 0]),
        )


def test_quiz_split_stratifies_the_trainers_label_column(tmp_path, tokenizer):
    # 40 rows, a class of 3: every seed must give it a quiz row, whichever column holds the labels.
    labels = [2 if i < 3 else i % 2 for i in range(40)]
    data = keyword_dataset(40).remove_columns("label").add_column("labels", labels)
    for seed in range(10):
        _, quiz = split_quiz(data, 0.1, label_column="labels", seed=seed)
        assert 2 in quiz["labels"], seed
    trainer = LGTMTrainer(
        model=tiny_classifier(1, seed=2, num_labels=3),
        teacher_model=tiny_classifier(2, seed=1, num_labels=3),
        args=tiny_run_args(LGTMTrainingArguments, tmp_path, quiz_split=0.1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert 2 in trainer.quiz_dataset["labels"]


# ----- non-finite values ---------------------------------------------------------------------------------------

TRAINERS = {
    "kd": (DistillationTrainer, DistillationTrainingArguments),
    "online": (OnlineDistillTrainer, OnlineDistillTrainingArguments),
    "meta": (MetaDistillTrainer, MetaDistillTrainingArguments),
    "lgtm": (LGTMTrainer, LGTMTrainingArguments),
}


def _trainer(method: str, tmp_path, tokenizer, teacher=None, student=None, **overrides):
    trainer_class, args_class = TRAINERS[method]
    extra = {"quiz_split": 0.25} if method in ("meta", "lgtm") else {}
    return trainer_class(
        model=student if student is not None else tiny_classifier(1, seed=2),
        teacher_model=teacher if teacher is not None else tiny_classifier(2, seed=1),
        args=tiny_run_args(args_class, tmp_path, **{"max_steps": 4, **extra, **overrides}),
        train_dataset=keyword_dataset(64),
        processing_class=tokenizer,
    )


def _poison(module: torch.nn.Module, when) -> None:
    """Make ``module``'s output NaN whenever ``when()`` holds (a fault injected into one forward)."""
    module.register_forward_hook(lambda _, __, output: output * math.nan if when() else output)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", list(TRAINERS))
def test_a_teacher_with_one_nan_weight_is_refused_when_built(tmp_path, tokenizer, method):
    teacher = tiny_classifier(2, seed=1)
    with torch.no_grad():
        teacher.classifier.weight[0, 3] = math.nan
    with pytest.raises(
        NonFiniteError, match=r"teacher's weights hold NaN values \(first in classifier\.weight\)"
    ):
        _trainer(method, tmp_path, tokenizer, teacher=teacher)


def test_a_learning_rate_that_overflows_stops_with_the_step_and_the_weight(tmp_path, tokenizer):
    trainer = _trainer("kd", tmp_path, tokenizer, learning_rate=1e38, max_grad_norm=0)
    with pytest.raises(
        NonFiniteError, match=r"at optimisation step 2.*; the student's weights hold (NaN|infinite)"
    ):
        trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("method", ["online", "lgtm"])
def test_a_teacher_update_that_overflows_stops_naming_the_teacher(tmp_path, tokenizer, method):
    trainer = _trainer(method, tmp_path, tokenizer, teacher_learning_rate=1e38, teacher_max_grad_norm=0)
    with pytest.raises(
        NonFiniteError,
        match=r"The teacher's (logits|gradient) (is|are) (NaN|infinite) at optimisation step [12]",
    ):
        trainer.train()


@pytest.mark.parametrize("method", list(TRAINERS))
def test_nan_teacher_logits_stop_training_by_default(tmp_path, tokenizer, method):
    trainer = _trainer(method, tmp_path, tokenizer)
    _poison(trainer.teacher_models[0].classifier, lambda: trainer.state.global_step == 2)
    with pytest.raises(
        NonFiniteError, match=r"NaN at optimisation step 3.*; the teacher's weights are all finite"
    ):
        trainer.train()
    for model in (trainer.model, trainer.teacher_models[0]):
        assert first_nonfinite_parameter(model) is None  # nothing was updated with it


@pytest.mark.parametrize("method", list(TRAINERS))
def test_skip_leaves_both_models_untouched_for_that_step_and_counts_it(tmp_path, tokenizer, method):
    trainer = _trainer(method, tmp_path, tokenizer, nonfinite="skip")
    snapshots = {}

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            snapshots[state.global_step] = (_snapshot(trainer.model), _snapshot(trainer.teacher_models[0]))

    trainer.add_callback(Snapshots())
    _poison(trainer.teacher_models[0].classifier, lambda: trainer.state.global_step == 1)
    trainer.train()
    student_after, teacher_after = _snapshot(trainer.model), _snapshot(trainer.teacher_models[0])
    for step, (student, teacher) in snapshots.items():
        later = snapshots.get(step + 1, (student_after, teacher_after))
        moved = [not torch.equal(student[n], later[0][n]) for n in student]
        if step == 1:  # the poisoned step: neither model changed
            assert not any(moved)
            assert all(torch.equal(teacher[n], later[1][n]) for n in teacher)
        else:
            assert any(moved)
    logged = [entry["nonfinite_skipped_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0, 1, 1, 1]
    trainer.save_model(str(tmp_path / "saved"))  # finite: saved


def test_skip_stops_after_too_many_steps_in_a_row(tmp_path, tokenizer):
    trainer = _trainer("online", tmp_path, tokenizer, nonfinite="skip", max_consecutive_nonfinite_skips=2)
    _poison(trainer.teacher_models[0].classifier, lambda: True)
    with pytest.raises(NonFiniteError, match=r"3 optimisation steps in a row"):
        trainer.train()


@pytest.mark.parametrize("method", ["meta", "lgtm"])
def test_a_nan_quiz_loss_is_named(tmp_path, tokenizer, method):
    trainer = _trainer(method, tmp_path, tokenizer)
    student = trainer.model
    # The quiz passes run the student without dropout (eval mode): poison only those.
    _poison(student.classifier, lambda: not student.training)
    with pytest.raises(NonFiniteError, match=r"The quiz loss is NaN at optimisation step 1"):
        trainer.train()


def test_non_finite_weights_are_never_written(tmp_path, tokenizer):
    trainer = _trainer("online", tmp_path, tokenizer)
    with torch.no_grad():
        trainer.model.classifier.bias[0] = math.inf
        trainer.teacher_models[0].classifier.bias[1] = math.nan
    with pytest.raises(NonFiniteError, match=r"Refusing to save the student: .*infinite .*classifier\.bias"):
        trainer.save_model(str(tmp_path / "student"))
    with pytest.raises(NonFiniteError, match=r"Refusing to push the student"):
        trainer.push_to_hub()
    with pytest.raises(NonFiniteError, match=r"Refusing to save the teacher: .*NaN"):
        trainer.save_teacher(str(tmp_path / "teacher"))
    with pytest.raises(NonFiniteError, match=r"Refusing to write the teacher into a checkpoint"):
        save_teacher_state(
            tmp_path / "checkpoint", gather_teacher_state(trainer.teacher_models[0], None, None)
        )
    assert not (tmp_path / "student").exists() and not (tmp_path / "checkpoint" / "teacher").exists()


# ----- data the models cannot read, refused when the trainer is built ---------------------------------------


@pytest.mark.parametrize("trainer_class", [MetaDistillTrainer, LGTMTrainer])
def test_quiz_labels_outside_the_classes_are_refused_when_built(tmp_path, tokenizer, trainer_class):
    quiz = _with_labels(keyword_dataset(8, seed=3), [0, 1, 5, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"quiz data's 'label' column holds 5 at row 2 .*outside \[0, 2\)"):
        _quiz_trainer(trainer_class, tmp_path, tokenizer, keyword_dataset(32), quiz_dataset=quiz)


@pytest.mark.parametrize(
    ("labels", "kind", "fix"),
    [
        (lambda i: ["neg", "pos"][i % 2], "string", "class_encode_column"),
        (lambda i: float(i % 2), "float", "num_labels=1"),
        (lambda i: bool(i % 2), "boolean", "cast_column"),
        (lambda i: [i % 2], "list of integer", r"row\['label'\]\[0\]"),
    ],
)
@pytest.mark.parametrize("method", ["kd", "lgtm"])
def test_labels_of_the_wrong_kind_are_refused_with_their_fix(tmp_path, tokenizer, method, labels, kind, fix):
    data = keyword_dataset(32)
    data = data.remove_columns("label").add_column("label", [labels(i) for i in range(len(data))])
    trainer_class, args_class = TRAINERS[method]
    extra = {"quiz_split": 0.25} if method == "lgtm" else {}
    with pytest.raises(ValueError, match=rf"'label' column holds {kind} values, but .*{fix}"):
        trainer_class(
            model=tiny_classifier(1, seed=2),
            teacher_model=tiny_classifier(2, seed=1),
            args=tiny_run_args(args_class, tmp_path, **extra),
            train_dataset=data,
            processing_class=tokenizer,
        )


def test_rows_longer_than_a_models_positions_are_refused_before_training(tmp_path, tokenizer):
    # The tiny models allow 64 positions; an evaluation row of 80 tokens would fail only after training.
    long_eval = keyword_dataset(4, length=100, seed=5)
    longest = max(len(ids) for ids in long_eval["input_ids"])
    assert longest > 64
    with pytest.raises(
        ValueError, match=rf"evaluation data's row \d+ has {longest} tokens .*student accepts at most 64"
    ):
        DistillationTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=tiny_run_args(DistillationTrainingArguments, tmp_path),
            train_dataset=keyword_dataset(8),
            eval_dataset=long_eval,
            processing_class=tokenizer,
        )


def test_a_second_live_run_in_the_same_output_dir_is_refused_before_training(tmp_path, tokenizer):
    import json
    import socket
    import subprocess
    import sys
    import time

    from hf_distill.safety.run_lock import LOCK_NAME, OutputDirInUseError

    trainer = _trainer("kd", tmp_path, tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": other.pid, "host": socket.gethostname(), "started": time.time()}
        (Path(trainer.args.output_dir) / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(OutputDirInUseError, match=f"pid {other.pid}"):
            trainer.train()
    finally:
        other.kill()
        other.wait()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    trainer.train()  # the other run is gone: its lock is taken over, and the lock is released at the end
    assert not (Path(trainer.args.output_dir) / LOCK_NAME).exists()


# ----- the student's half of a checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_checkpoint(tmp_path_factory, tokenizer) -> Path:
    output = tmp_path_factory.mktemp("kd_run")
    _kd_checkpoint_trainer(output, tokenizer).train()
    return output / "checkpoint-2"


def _kd_checkpoint_trainer(output: Path, tokenizer, **overrides) -> DistillationTrainer:
    args = DistillationTrainingArguments(
        **{
            **dict(TINY_RUN, output_dir=str(output), max_steps=4),
            "save_strategy": "steps",
            "save_steps": 2,
            **overrides,
        }
    )
    return DistillationTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(32),
        processing_class=tokenizer,
    )


@pytest.fixture
def kd_checkpoint_copy(kd_checkpoint, tmp_path) -> Path:
    target = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(kd_checkpoint, target)
    return target


def _resume_kd(checkpoint: Path, tokenizer, **overrides) -> DistillationTrainer:
    trainer = _kd_checkpoint_trainer(checkpoint.parent / "resumed", tokenizer, **overrides)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_zeros_over_half_the_students_weights_are_refused_naming_file_and_digests(
    kd_checkpoint_copy, tokenizer
):
    weights = kd_checkpoint_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointIntegrityError,
        match=r"model\.safetensors does not match the SHA-256 recorded .*: [0-9a-f]{16}… instead of [0-9a-f]{16}….*Start a new run",
    ):
        _resume_kd(kd_checkpoint_copy, tokenizer)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
        ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:1000])),
        ("trainer_state.json", lambda p: p.write_text("{not json")),
    ],
)
def test_a_damaged_student_file_is_named_with_the_checkpoint_to_resume_from(
    tmp_path, tokenizer, name, damage
):
    output = tmp_path / "run"
    _kd_checkpoint_trainer(output, tokenizer, max_steps=6).train()  # checkpoints 2, 4 and 6
    damage(output / "checkpoint-6" / name)
    with pytest.raises(
        CheckpointIntegrityError,
        match=rf"checkpoint-6/{re.escape(name)} has \d+ bytes but was written with \d+.*Resume from .*checkpoint-4",
    ):
        _resume_kd(output / "checkpoint-6", tokenizer)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_the_students_optimizer_or_schedule_is_refused(
    kd_checkpoint_copy, tokenizer, caplog, name
):
    (kd_checkpoint_copy / name).unlink()
    with pytest.raises(
        CheckpointIntegrityError,
        match=rf"lost {name}: resuming would restart .*allow_partial_checkpoint=True",
    ):
        _resume_kd(kd_checkpoint_copy, tokenizer)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.checkpoints"):
        trainer = _resume_kd(kd_checkpoint_copy, tokenizer, allow_partial_checkpoint=True)
    assert f"without {name}" in caplog.text and trainer.state.global_step == 4


def test_resume_true_skips_a_checkpoint_whose_save_did_not_finish(tmp_path, tokenizer, caplog):
    output = tmp_path / "run"
    _kd_checkpoint_trainer(output, tokenizer).train()  # checkpoints 2 and 4
    (output / "checkpoint-4" / "checkpoint_manifest.json").unlink()
    (output / "checkpoint-4" / "trainer_state.json").unlink()  # as if killed before Trainer's last file
    trainer = _kd_checkpoint_trainer(output, tokenizer, max_steps=4)
    seen = []

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    trainer.add_callback(FirstStep())
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.checkpoints"):
        trainer.train(resume_from_checkpoint=True)
    assert "Skipping checkpoint-4: its save did not finish" in caplog.text
    assert seen == [2] and trainer.state.global_step == 4
    # Resumed from checkpoint-2, and checkpoint-4 was written again, complete.
    assert (output / "checkpoint-4" / "checkpoint_manifest.json").is_file()
    with pytest.raises(CheckpointIntegrityError, match="its save did not finish"):
        (output / "checkpoint-4" / "checkpoint_manifest.json").unlink()
        (output / "checkpoint-4" / "trainer_state.json").unlink()
        _resume_kd(output / "checkpoint-4", tokenizer)


# ----- a non-finite gradient from a finite loss, and what a skipped step logs -----------------------------------


def _nan_gradient(parameter: torch.nn.Parameter, when) -> None:
    """Make ``parameter``'s gradient NaN whenever ``when()`` holds, while every loss stays finite."""
    parameter.register_hook(lambda grad: grad * math.nan if when() else grad)


@pytest.mark.parametrize("method", ["kd", "online"])
def test_a_nan_student_gradient_is_skipped_not_applied(tmp_path, tokenizer, method):
    trainer = _trainer(method, tmp_path, tokenizer, nonfinite="skip")
    snapshots = {}

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            snapshots[state.global_step] = _snapshot(trainer.model)

    trainer.add_callback(Snapshots())
    _nan_gradient(trainer.model.classifier.weight, lambda: trainer.state.global_step == 1)
    trainer.train()
    assert first_nonfinite_parameter(trainer.model) is None  # before: every weight NaN
    after_skipped = snapshots[2]
    assert all(torch.equal(snapshots[1][n], after_skipped[n]) for n in after_skipped)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert math.isnan(losses[1]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 1)
    trainer.save_model(str(tmp_path / "saved"))


def test_a_nan_student_gradient_stops_with_a_true_message(tmp_path, tokenizer):
    trainer = _trainer("kd", tmp_path, tokenizer)
    _nan_gradient(trainer.model.classifier.weight, lambda: trainer.state.global_step == 1)
    with pytest.raises(
        NonFiniteError,
        match=r"The student's gradient is NaN at optimisation step 2; the student's weights are all finite.*"
        r"Nothing was updated at this step",
    ):
        trainer.train()
    assert first_nonfinite_parameter(trainer.model) is None


def test_a_training_set_smaller_than_one_dropped_batch_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"has 8 rows, fewer than one batch \(16 rows per device.*drop_last"):
        DistillationTrainer(
            model=tiny_classifier(1),
            teacher_model=tiny_classifier(2),
            args=tiny_run_args(
                DistillationTrainingArguments,
                tmp_path,
                per_device_train_batch_size=16,
                dataloader_drop_last=True,
            ),
            train_dataset=keyword_dataset(8),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("name", ["per_device_train_batch_size", "per_device_eval_batch_size"])
def test_a_batch_size_below_one_is_refused_by_name(tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got 0"):
        tiny_run_args(DistillationTrainingArguments, tmp_path, **{name: 0})


def _poison_after_the_teachers_update(trainer, step: int) -> None:
    """NaN from the teacher's forward that follows its update in optimisation step ``step`` (online: the
    teacher's loss forward, its update, then its forward for the student's soft labels)."""
    calls = {"n": 0}

    class CountPerStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            calls["n"] = 0

    def hook(_, __, output):
        calls["n"] += 1
        return output * math.nan if trainer.state.global_step == step and calls["n"] == 2 else output

    trainer.add_callback(CountPerStep())
    trainer.teacher_models[0].classifier.register_forward_hook(hook)


def test_a_non_finite_value_after_the_teachers_update_says_the_teacher_moved(tmp_path, tokenizer):
    trainer = _trainer("online", tmp_path, tokenizer)
    _poison_after_the_teachers_update(trainer, step=1)
    with pytest.raises(
        NonFiniteError,
        match=r"teacher's logits are NaN at optimisation step 2.*The teacher was updated earlier in this step "
        r"\(before the value went non-finite\); nothing else was\.",
    ):
        trainer.train()


def test_skip_takes_back_the_teachers_update_of_a_skipped_step(tmp_path, tokenizer):
    trainer = _trainer("online", tmp_path, tokenizer, nonfinite="skip")
    snapshots = {}

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            snapshots[state.global_step] = (_snapshot(trainer.model), _snapshot(trainer.teacher_models[0]))

    trainer.add_callback(Snapshots())
    _poison_after_the_teachers_update(trainer, step=1)
    trainer.train()
    (student_before, teacher_before), (student_after, teacher_after) = snapshots[1], snapshots[2]
    assert all(
        torch.equal(teacher_before[n], teacher_after[n]) for n in teacher_before
    )  # before: kept its update
    assert all(torch.equal(student_before[n], student_after[n]) for n in student_before)
    assert any(not torch.equal(snapshots[2][1][n], snapshots[3][1][n]) for n in teacher_before)  # steps on
    logged = [entry["nonfinite_skipped_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0, 1, 1, 1]


def test_a_checkpoint_stopped_just_before_its_manifest_is_refused_by_name(kd_checkpoint_copy, tokenizer):
    # Trainer's own files are all there (trainer_state.json included): only the manifest is missing.
    (kd_checkpoint_copy / "checkpoint_manifest.json").unlink()
    assert (kd_checkpoint_copy / "trainer_state.json").is_file()
    with pytest.raises(
        CheckpointIntegrityError, match="has no checkpoint_manifest.json: its save did not finish"
    ):
        _resume_kd(kd_checkpoint_copy, tokenizer)
