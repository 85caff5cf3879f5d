"""Distil a GLUE task with any hf_distill method: the student alone, KD, online, meta or LGTM.

Like transformers' ``run_glue.py``, with a teacher. For example, LGTM on MRPC with a fine-tuned teacher
and a student made of its first 3 layers::

    python examples/run_glue_lgtm.py --method lgtm --task_name mrpc \\
        --teacher_model_name_or_path path/to/finetuned-teacher --student_num_layers 3 \\
        --alpha 1.0 --temperature 1.0 --learning_rate 5e-5 --num_train_epochs 6 \\
        --output_dir out/mrpc-lgtm

Offline, on local files, fine-tuning the teacher first from a pretrained checkpoint (reused next time)::

    python examples/run_glue_lgtm.py --method kd --task_name mrpc --data_dir ../shared/data/glue/mrpc \\
        --teacher_model_name_or_path path/to/pretrained --teacher_finetune_epochs 3 \\
        --student_num_layers 3 --output_dir out/mrpc-kd

``--method`` picks the trainer and its arguments: ``finetune`` (`transformers.Trainer`, no teacher),
``kd`` (`DistillationTrainer`), ``online`` (`OnlineDistillTrainer`), ``meta`` (`MetaDistillTrainer`),
``lgtm`` (`LGTMTrainer`); ``--help`` after ``--method X`` lists X's arguments. ``--config run.json`` (or
.yaml) gives arguments from a file; the command line overrides it. Without any of ``--do_train``,
``--do_eval``, ``--do_predict`` the script trains and evaluates. See docs/examples.md for every option
and output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    InfluenceLoggerCallback,
    LGTMTrainer,
    LGTMTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
    glue_compute_metrics,
    split_quiz,
)
from hf_distill.glue import (
    GLUE_SUBMISSION_FILES,
    TRAINABLE_GLUE_TASKS,
    eval_split_names,
    glue_label_names,
    glue_num_labels,
    load_glue,
    metric_task,
    predictions_from_logits,
    test_split_names,
    tokenize_glue,
    write_glue_predictions,
)

logger = logging.getLogger("run_glue_lgtm")

METHODS = ("finetune", "kd", "online", "meta", "lgtm")
LEARNING_TEACHER = frozenset({"online", "meta", "lgtm"})
QUIZ_METHODS = frozenset({"meta", "lgtm"})
TEACHER_CACHE_FILE = "hf_distill_teacher.json"


def trainer_classes(method: str) -> tuple[type[Trainer], type[TrainingArguments]]:
    """(trainer, arguments class) of ``method``; the meta trainer is imported only when asked for."""
    if method == "finetune":
        return Trainer, TrainingArguments
    if method == "kd":
        return DistillationTrainer, DistillationTrainingArguments
    if method == "online":
        return OnlineDistillTrainer, OnlineDistillTrainingArguments
    if method == "lgtm":
        return LGTMTrainer, LGTMTrainingArguments
    if method == "meta":
        try:
            from hf_distill import MetaDistillTrainer, MetaDistillTrainingArguments
        except ImportError as err:
            raise ValueError(
                f"--method meta needs hf_distill.MetaDistillTrainer, which this installation lacks ({err})."
            ) from err
        return MetaDistillTrainer, MetaDistillTrainingArguments
    raise ValueError(f"Unknown --method {method!r}; choose one of {', '.join(METHODS)}.")


# ----- arguments -----------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The method, the teacher and the student."""

    method: str = field(
        default="lgtm",
        metadata={"help": f"Training method: {', '.join(METHODS)}.", "choices": METHODS},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: a checkpoint fine-tuned on the task, or (with --teacher_finetune_epochs) a "
            "pretrained model the script fine-tunes first. Not needed for --method finetune."
        },
    )
    teacher_finetune_epochs: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, fine-tune the teacher from --teacher_model_name_or_path for this many epochs on "
            "the training data first, save it to --teacher_output_dir and reuse it on later runs with the "
            "same settings."
        },
    )
    teacher_finetune_learning_rate: float = field(
        default=5e-5, metadata={"help": "Learning rate of the teacher's fine-tuning."}
    )
    teacher_finetune_seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the teacher's fine-tuning (kept apart from --seed so seeds share a teacher)."
        },
    )
    teacher_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the fine-tuned teacher is saved and looked for (default: <output_dir>/teacher)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The student's initialisation (default: the teacher's starting checkpoint, "
            "--teacher_model_name_or_path)."
        },
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the first k transformer layers of the student's checkpoint (a DistilBERT/PKD-"
            "style student made of the teacher's first k layers)."
        },
    )
    init_classifier_to_zero: bool = field(
        default=False,
        metadata={
            "help": "Zero the student's classifier output layer, and the teacher's when it learns (online, "
            "meta, lgtm), as the LGTM reference's --init_classifier_to_zero."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the student's checkpoint)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and data."})
    model_revision: str = field(
        default="main", metadata={"help": "Revision of Hub models (branch, tag, commit)."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown --method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.method != "finetune" and self.teacher_model_name_or_path is None:
            raise ValueError(f"--method {self.method} needs --teacher_model_name_or_path.")
        if self.teacher_model_name_or_path is None and self.model_name_or_path is None:
            raise ValueError("Give the student with --model_name_or_path (or a teacher to take it from).")
        if self.teacher_finetune_epochs < 0:
            raise ValueError(f"--teacher_finetune_epochs must be >= 0, got {self.teacher_finetune_epochs}.")
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise ValueError(f"--student_num_layers must be >= 1, got {self.student_num_layers}.")


@dataclass
class DataArguments:
    """The GLUE task and where its data comes from."""

    task_name: str = field(default=None, metadata={"help": f"GLUE task: {', '.join(TRAINABLE_GLUE_TASKS)}."})
    dataset_name: str = field(
        default="glue",
        metadata={
            "help": "Hub dataset loaded as load_dataset(dataset_name, task_name) when no local files are given."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with train/validation/test files (.jsonl, .json, .tsv or .csv; mnli: "
            "validation_matched, validation_mismatched, test_matched, test_mismatched)."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Training file (replaces data_dir's)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file (mnli: matched)."})
    test_file: str | None = field(
        default=None, metadata={"help": "Test file for --do_predict (mnli: matched)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every row to max_seq_length (default: pad each batch to its longest row)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use the first N rows of each validation set."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use the first N test rows."})
    quiz_holdout: float | None = field(
        default=None,
        metadata={
            "help": "Hold this fraction of the training data out for every method (stratified by label; the "
            "same rows whatever the method or seed): meta and lgtm use it as their quiz data, no method "
            "trains on it, the teacher is not fine-tuned on it, and the student's score on it goes to "
            "quiz_results.json, for choosing hyperparameters without the validation set. Unset: meta and "
            "lgtm carve their own quiz set (--quiz_split), the other methods train on everything."
        },
    )
    quiz_holdout_seed: int = field(default=42, metadata={"help": "Seed of the --quiz_holdout split."})

    def __post_init__(self) -> None:
        if self.task_name is None:
            raise ValueError(f"--task_name is required: one of {', '.join(TRAINABLE_GLUE_TASKS)}.")
        self.task_name = self.task_name.lower().replace("-", "")
        if self.task_name not in TRAINABLE_GLUE_TASKS:
            raise ValueError(
                f"Unknown --task_name {self.task_name!r}; choose one of {', '.join(TRAINABLE_GLUE_TASKS)}."
            )
        if self.quiz_holdout is not None and not 0.0 < self.quiz_holdout < 1.0:
            raise ValueError(f"--quiz_holdout must be in (0, 1), got {self.quiz_holdout}.")


def _config_to_argv(config: dict[str, Any]) -> list[str]:
    """``{"alpha": 1.0, "report_to": ["none"]}`` → ``["--alpha", "1.0", "--report_to", "none"]``."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def load_config(path: str) -> dict[str, Any]:
    """A JSON or YAML file of arguments (a mapping of argument names to values)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml  # a dependency of transformers

        config = yaml.safe_load(text)
    else:
        config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a mapping of argument names to values.")
    return config


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (and ``--config``) into the three argument dataclasses of ``--method``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--config", *argv]  # transformers' convention: the file as the first argument
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    known, rest = pre.parse_known_args(argv)
    config = load_config(known.config) if known.config else {}
    method = known.method or config.get("method") or ModelArguments.method
    _, args_class = trainer_classes(method)
    parser = HfArgumentParser((ModelArguments, DataArguments, args_class))
    # The file's arguments come first, so the command line overrides them.
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=_config_to_argv(config) + rest + ["--method", method]
    )
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
    return model_args, data_args, training_args


# ----- models ------------------------------------------------------------------------------------------------


def _has_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def load_classifier(
    path: str, task: str, model_args: ModelArguments, num_layers: int | None = None, role: str = "student"
) -> nn.Module:
    """A sequence classifier for ``task`` from ``path``; ``num_layers`` keeps only the first layers."""
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(path, **hub)
    num_labels = glue_num_labels(task)
    if _has_classifier(config) and config.num_labels != num_labels:
        raise ValueError(
            f"The {role} checkpoint {path} has a classifier with {config.num_labels} outputs, but {task} needs "
            f"{num_labels}; was it fine-tuned on another task?"
        )
    overrides: dict[str, Any] = {"num_labels": num_labels}
    names = glue_label_names(task)
    if names is not None:
        overrides["id2label"] = dict(enumerate(names))
        overrides["label2id"] = {name: i for i, name in enumerate(names)}
    if num_layers is not None:
        available = getattr(config, "num_hidden_layers", None)
        if available is not None and num_layers > available:
            raise ValueError(f"--student_num_layers {num_layers} exceeds the {available} layers of {path}.")
        overrides["num_hidden_layers"] = num_layers
    return AutoModelForSequenceClassification.from_pretrained(path, **overrides, **hub)


def zero_classifier(model: nn.Module) -> None:
    """Zero the output layer of the classification head (the reference's ``init_classifier_as_zero``).

    Only the last linear layer: zeroing a two-layer head (RoBERTa's) entirely would leave it no gradient.
    """
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if not linears:
        raise ValueError(
            f"--init_classifier_to_zero: no linear classifier head found on {type(model).__name__}."
        )
    with torch.no_grad():
        linears[-1].weight.zero_()
        if linears[-1].bias is not None:
            linears[-1].bias.zero_()


# ----- data --------------------------------------------------------------------------------------------------


def collator_for(tokenizer: Any, data_args: DataArguments, training_args: TrainingArguments) -> Any:
    if data_args.pad_to_max_length:
        return default_data_collator
    multiple = 8 if (training_args.fp16 or training_args.bf16) else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


def _first(dataset: Any, n: int | None) -> Any:
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def prepare_data(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments, tokenizer: Any
) -> dict[str, Any]:
    """Tokenised splits: ``train``, ``quiz`` (or None), and dicts ``eval`` and ``test`` of split → dataset."""
    task = data_args.task_name
    raw = load_glue(
        task,
        dataset_name=data_args.dataset_name,
        data_dir=data_args.data_dir,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        cache_dir=model_args.cache_dir,
    )
    needs = {
        "train": training_args.do_train,
        "validation": training_args.do_eval,
        "test": training_args.do_predict,
    }
    wanted = {"train": ["train"], "validation": eval_split_names(task), "test": test_split_names(task)}
    for kind, needed in needs.items():
        if needed and not any(s in raw for s in wanted[kind]):
            flag = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}[kind]
            raise ValueError(
                f"{flag} needs a {kind} split, but the data has only {list(raw)}; give --{kind}_file or put a "
                f"{wanted[kind][0]} file in --data_dir."
            )
    max_length = data_args.max_seq_length
    if max_length > tokenizer.model_max_length:
        logger.warning("max_seq_length %d exceeds the model's %d", max_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False
    out: dict[str, Any] = {"train": None, "quiz": None, "eval": {}, "test": {}}
    if "train" in raw:
        train = _first(raw["train"], data_args.max_train_samples)
        if "idx" not in train.column_names:  # row ids name the samples in LGTM's influence log
            train = train.add_column("idx", list(range(len(train))))
        train = tokenize_glue(train, tokenizer, task, max_length, padding)
        if data_args.quiz_holdout is not None:
            train, out["quiz"] = split_quiz(train, data_args.quiz_holdout, seed=data_args.quiz_holdout_seed)
        out["train"] = train
    for split in eval_split_names(task):
        if split in raw:
            ds = _first(raw[split], data_args.max_eval_samples)
            out["eval"][split] = tokenize_glue(ds, tokenizer, task, max_length, padding)
    for split in test_split_names(task):
        if split in raw:
            ds = _first(raw[split], data_args.max_predict_samples)
            out["test"][split] = tokenize_glue(ds, tokenizer, task, max_length, padding)
    return out


def _content_hash(dataset: Any) -> str:
    digest = hashlib.sha256()
    for column in ("input_ids", "label"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()[:16]


# ----- the teacher ---------------------------------------------------------------------------------------------


def evaluate_model(
    model: nn.Module, eval_sets: dict[str, Any], task: str, training_args: TrainingArguments, collator: Any
) -> dict[str, float]:
    """``eval_*`` metrics of ``model`` on every validation set (mnli mismatched: suffix ``_mm``)."""
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="teacher_eval_") as scratch:  # evaluation writes nothing there
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=training_args.per_device_eval_batch_size,
            use_cpu=training_args.use_cpu,
            bf16=training_args.bf16,
            fp16=training_args.fp16,
            report_to="none",
            disable_tqdm=training_args.disable_tqdm,
        )
        for split, dataset in eval_sets.items():
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=collator,
                compute_metrics=glue_compute_metrics(metric_task(task, split)),
            )
            metrics.update(_suffixed(trainer.evaluate(dataset), split))
    return metrics


def _suffixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{k}_mm" if split.endswith("mismatched") else k: v for k, v in metrics.items()}


def finetune_teacher(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    collator: Any,
) -> tuple[str, dict[str, Any]]:
    """Fine-tune the teacher once and cache it; later runs with the same settings reuse it.

    Returns (folder of the fine-tuned teacher, cache record with its settings, metrics and time).
    """
    folder = Path(model_args.teacher_output_dir or os.path.join(training_args.output_dir, "teacher"))
    if data["train"] is None:
        raise ValueError("--teacher_finetune_epochs needs training data to fine-tune the teacher on.")
    settings = {
        "base": model_args.teacher_model_name_or_path,
        "task": data_args.task_name,
        "epochs": model_args.teacher_finetune_epochs,
        "learning_rate": model_args.teacher_finetune_learning_rate,
        "seed": model_args.teacher_finetune_seed,
        "batch_size": training_args.per_device_train_batch_size,
        "weight_decay": training_args.weight_decay,
        "warmup_steps": training_args.warmup_steps,
        "max_seq_length": data_args.max_seq_length,
        "train_sampling_strategy": training_args.train_sampling_strategy,
        "train_rows": len(data["train"]),
        "train_hash": _content_hash(data["train"]),
        "eval_rows": {split: len(ds) for split, ds in data["eval"].items()},
    }
    record_path = folder / TEACHER_CACHE_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            logger.info("Reusing the teacher fine-tuned earlier in %s", folder)
            print(f"Reusing the fine-tuned teacher in {folder}", flush=True)
            record["cached"] = True
            return str(folder), record
        changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
        logger.warning(
            "The teacher in %s was fine-tuned with other settings (%s): fine-tuning again", folder, changed
        )

    print(
        f"Fine-tuning the teacher {model_args.teacher_model_name_or_path} for "
        f"{model_args.teacher_finetune_epochs:g} epochs on {len(data['train'])} rows → {folder}",
        flush=True,
    )
    set_seed(model_args.teacher_finetune_seed)
    teacher = load_classifier(
        model_args.teacher_model_name_or_path, data_args.task_name, model_args, role="teacher"
    )
    args = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=model_args.teacher_finetune_epochs,
        learning_rate=model_args.teacher_finetune_learning_rate,
        seed=model_args.teacher_finetune_seed,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        weight_decay=training_args.weight_decay,
        warmup_steps=training_args.warmup_steps,
        train_sampling_strategy=training_args.train_sampling_strategy,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        fp16=training_args.fp16,
        dataloader_num_workers=training_args.dataloader_num_workers,
        disable_tqdm=training_args.disable_tqdm,
        logging_strategy="epoch",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=teacher,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=collator,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(folder))
    metrics = evaluate_model(teacher, data["eval"], data_args.task_name, training_args, collator)
    record = {"settings": settings, "eval": metrics, "train_seconds": round(seconds, 1), "cached": False}
    # Written last: a crash mid-fine-tuning leaves no record, so the next run fine-tunes again.
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return str(folder), record


def prepare_teacher(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    collator: Any,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """The teacher model (None when there is none) and what to report about it."""
    if model_args.teacher_model_name_or_path is None:
        return None, {}
    task = data_args.task_name
    info: dict[str, Any] = {"source": model_args.teacher_model_name_or_path}
    if model_args.teacher_finetune_epochs > 0:
        path, record = finetune_teacher(model_args, data_args, training_args, data, tokenizer, collator)
        info.update(path=path, finetune_seconds=record["train_seconds"], cached=record["cached"])
        teacher = load_classifier(path, task, model_args, role="teacher")
        info["eval"] = record["eval"]
    else:
        path = model_args.teacher_model_name_or_path
        config = AutoConfig.from_pretrained(
            path, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
        if not _has_classifier(config):
            if model_args.method == "finetune":  # the checkpoint only names the student's initialisation
                return None, {}
            message = (
                f"The teacher {path} has no classification head (architectures={config.architectures}): it is "
                "not fine-tuned on the task. Add --teacher_finetune_epochs N to fine-tune it first."
            )
            if model_args.method not in LEARNING_TEACHER:
                raise ValueError(message)
            logger.warning("%s It learns during %s, starting from a new head.", message, model_args.method)
        info["path"] = path
        teacher = load_classifier(path, task, model_args, role="teacher")
        info["eval"] = (
            evaluate_model(teacher, data["eval"], task, training_args, collator) if data["eval"] else {}
        )
    info["layers"] = getattr(teacher.config, "num_hidden_layers", None)
    info["params"] = teacher.num_parameters()
    return teacher, info


# ----- outputs -------------------------------------------------------------------------------------------------


def write_influence_figures(log_path: Path, seed: int) -> list[str]:
    """The influence figures of an LGTM run (needs matplotlib; skipped with a warning without it)."""
    try:
        from hf_distill.plotting import (
            MEAN_TREND_PNG,
            TRAJECTORIES_PNG,
            load_influence_log,
            plot_mean_trend,
            plot_sample_trajectories,
            random_sample_ids,
        )

        records = load_influence_log(log_path)
        samples = random_sample_ids(records, 3, seed).tolist()
        return [
            plot_sample_trajectories(records, samples, log_path.parent / TRAJECTORIES_PNG),
            plot_mean_trend(records, log_path.parent / MEAN_TREND_PNG, seed=seed),
        ]
    except ImportError as err:
        logger.warning("No influence figures (%s); pip install matplotlib", err)
    except (OSError, ValueError) as err:
        logger.warning("No influence figures: %s", err)
    return []


def _metric_columns(task: str) -> list[str]:
    if task == "mnli":
        return ["eval_accuracy", "eval_accuracy_mm"]
    return {
        "cola": ["eval_matthews_correlation"],
        "stsb": ["eval_pearson", "eval_spearmanr"],
        "mrpc": ["eval_accuracy", "eval_f1"],
        "qqp": ["eval_accuracy", "eval_f1"],
    }.get(task, ["eval_accuracy"])


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


def print_summary(task: str, method: str, rows: list[dict[str, Any]]) -> None:
    columns = _metric_columns(task)
    header = f"{'model':<30}{'layers':>7}{'params':>9}" + "".join(f"{c[5:]:>12}" for c in columns)
    header += f"{'train s':>9}"
    print(f"\nSummary: {method} on {task} (validation)")
    print(header)
    print("-" * len(header))
    for row in rows:
        metrics = row.get("metrics") or {}
        cells = "".join(f"{metrics[c]:>12.4f}" if c in metrics else f"{'—':>12}" for c in columns)
        seconds = row.get("seconds")
        shown = f"{seconds:>9.0f}" if seconds is not None else f"{'—':>9}"
        params = _millions(row["params"]) if row.get("params") else "—"
        layers = row.get("layers") if row.get("layers") is not None else "—"
        print(f"{row['name']:<30}{layers!s:>7}{params:>9}{cells}{shown}")


# ----- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script; returns what it wrote: ``eval``, ``teacher_eval``, ``quiz``, ``train`` metrics, paths."""
    model_args, data_args, training_args = parse_args(argv)
    method, task = model_args.method, data_args.task_name
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    trainer_class, _ = trainer_classes(method)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    student_source = model_args.model_name_or_path or model_args.teacher_model_name_or_path

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or student_source,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
    )
    data = prepare_data(data_args, model_args, training_args, tokenizer)
    collator = collator_for(tokenizer, data_args, training_args)
    if data["quiz"] is not None:
        print(f"Held out {len(data['quiz'])} quiz rows; training on {len(data['train'])} rows.", flush=True)

    teacher, teacher_info = prepare_teacher(model_args, data_args, training_args, data, tokenizer, collator)
    results: dict[str, Any] = {"output_dir": str(output_dir), "teacher_eval": teacher_info.get("eval", {})}
    if teacher is not None and teacher_info.get("eval"):
        (output_dir / "teacher_eval_results.json").write_text(
            json.dumps(teacher_info["eval"], indent=2) + "\n"
        )

    set_seed(training_args.seed)
    student = load_classifier(student_source, task, model_args, model_args.student_num_layers)
    if model_args.init_classifier_to_zero:
        zero_classifier(student)
        if teacher is not None and method in LEARNING_TEACHER:
            zero_classifier(teacher)
        elif teacher is not None:
            logger.warning(
                "--init_classifier_to_zero: the frozen %s teacher keeps its head (it does not learn).", method
            )

    eval_sets = data["eval"]
    first_eval = next(iter(eval_sets), None)
    callbacks = [InfluenceLoggerCallback()] if method == "lgtm" else []
    kwargs: dict[str, Any] = dict(
        model=student,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=eval_sets.get(first_eval),
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=glue_compute_metrics(metric_task(task, first_eval or "validation")),
        callbacks=callbacks,
    )
    if method != "finetune":
        kwargs["teacher_model"] = teacher
    if method in QUIZ_METHODS and data["quiz"] is not None:
        kwargs["quiz_dataset"] = data["quiz"]
    trainer = trainer_class(**kwargs)

    train_seconds = None
    if training_args.do_train:
        print(f"Training the student with {method} on {len(trainer.train_dataset)} rows", flush=True)
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        train_seconds = train_result.metrics.get("train_runtime")
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
        card = {"tasks": "text-classification", "dataset": f"GLUE {task.upper()}", "dataset_args": task}
        if data_args.data_dir or data_args.train_file:
            card["dataset"] += " (local files)"
        else:  # the Hub's GLUE lives at nyu-mll/glue ("glue" redirects there)
            card["dataset_tags"] = (
                "nyu-mll/glue" if data_args.dataset_name == "glue" else data_args.dataset_name
            )
        if training_args.push_to_hub:
            trainer.push_to_hub(**card)  # also leaves the pushed student in output_dir
        else:
            trainer.save_model()
            trainer.create_model_card(**card)
        if method == "lgtm":
            log_path = output_dir / "influence.jsonl"
            results["figures"] = (
                write_influence_figures(log_path, training_args.seed) if log_path.is_file() else []
            )

    if training_args.do_eval:
        metrics: dict[str, float] = {}
        for split, dataset in eval_sets.items():
            split_metrics = trainer.evaluate(eval_dataset=dataset)
            split_metrics["eval_samples"] = len(dataset)
            metrics.update(_suffixed(split_metrics, split))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
        if data["quiz"] is not None:
            quiz = trainer.evaluate(eval_dataset=data["quiz"], metric_key_prefix="quiz")
            quiz["quiz_samples"] = len(data["quiz"])
            trainer.save_metrics("quiz", quiz)
            results["quiz"] = quiz

    if training_args.do_predict:
        written = []
        for split, dataset in data["test"].items():
            output = trainer.predict(dataset.remove_columns("label"), metric_key_prefix="predict")
            path = output_dir / GLUE_SUBMISSION_FILES[metric_task(task, split)]
            if trainer.is_world_process_zero():
                write_glue_predictions(path, task, predictions_from_logits(task, output.predictions))
            written.append(str(path))
        results["predictions"] = written

    rows = []
    if teacher is not None:
        name = "teacher" + (" (fine-tuned here)" if model_args.teacher_finetune_epochs > 0 else "")
        if teacher_info.get("cached"):
            name = "teacher (fine-tuned, cached)"
        rows.append(
            {
                "name": name,
                "layers": teacher_info.get("layers"),
                "params": teacher_info.get("params"),
                "metrics": teacher_info.get("eval"),
                "seconds": teacher_info.get("finetune_seconds"),
            }
        )
    rows.append(
        {
            "name": f"student ({method})",
            "layers": getattr(trainer.model.config, "num_hidden_layers", None),
            "params": trainer.model.num_parameters(),
            "metrics": results.get("eval"),
            "seconds": train_seconds,
        }
    )
    print_summary(task, method, rows)
    print(f"Outputs in {output_dir.resolve()}")
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
