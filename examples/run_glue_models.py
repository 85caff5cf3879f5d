"""The models of examples/run_glue_lgtm.py: loading a classifier for the task, and the teacher, fine-tuned
once on the task and cached (``--teacher_finetune_epochs``), or given fine-tuned, with its scores."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from run_glue_args import LEARNING_TEACHER, DataArguments, ModelArguments
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

from hf_distill import glue_compute_metrics, student_from_teacher
from hf_distill.glue.data import glue_label_names, glue_num_labels, metric_task
from hf_distill.publishing.model_sources import describe_teacher
from hf_distill.safety.collapse import warn_if_collapsed

logger = logging.getLogger("run_glue_lgtm")


TEACHER_CACHE_FILE = "hf_distill_teacher.json"


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
    model = AutoModelForSequenceClassification.from_pretrained(path, **overrides, **hub)
    return model if num_layers is None else student_from_teacher(model, num_layers)


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


def _content_hash(dataset: Any) -> str:
    digest = hashlib.sha256()
    for column in ("input_ids", "label"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()[:16]


# ----- the teacher ---------------------------------------------------------------------------------------------


def checked_metrics(task_split: str, what: str) -> Callable[[Any], dict[str, float]]:
    """``glue_compute_metrics`` plus a warning when ``what`` predicted one class on every row (for
    `transformers.Trainer`; hf_distill's trainers warn by themselves)."""
    compute = glue_compute_metrics(task_split)

    def compute_and_check(prediction: Any) -> dict[str, float]:
        warn_if_collapsed(prediction.predictions, prediction.label_ids, what)
        return compute(prediction)

    return compute_and_check


def evaluate_model(
    model: nn.Module, eval_sets: dict[str, Any], task: str, training_args: TrainingArguments, collator: Any
) -> dict[str, float]:
    """``eval_*`` metrics of the teacher ``model`` on every validation set (mnli mismatched: suffix ``_mm``)."""
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
            dataloader_pin_memory=training_args.dataloader_pin_memory,
        )
        for split, dataset in eval_sets.items():
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=collator,
                compute_metrics=checked_metrics(metric_task(task, split), f"The teacher ({split})"),
            )
            metrics.update(suffixed(trainer.evaluate(dataset), split))
    return metrics


def suffixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{k}_mm" if split.endswith("mismatched") else k: v for k, v in metrics.items()}


def default_teacher_cache_dir() -> Path:
    """``$HF_HOME/hf_distill/teachers``, with ``HF_HOME`` as huggingface_hub resolves it (by default
    ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``)."""
    return Path(hf_constants.HF_HOME) / "hf_distill" / "teachers"


def checkpoint_fingerprint(name_or_path: str, revision: str) -> Any:
    """What identifies a starting checkpoint: a local folder's weight and config files (name, size,
    modification time), or a Hub id at its revision."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"{name_or_path}@{revision}"
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"}
    )
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def teacher_settings(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, train: Any
) -> dict[str, Any]:
    """Everything the fine-tuned teacher depends on: its starting checkpoint, the task, the tokenised
    training rows and the fine-tuning settings. Equal settings, same teacher."""
    base = model_args.teacher_model_name_or_path
    return {
        "base": base,
        "base_fingerprint": checkpoint_fingerprint(base, model_args.model_revision),
        "task": data_args.task_name,
        "epochs": model_args.teacher_finetune_epochs,
        "learning_rate": model_args.teacher_finetune_learning_rate,
        "seed": model_args.teacher_finetune_seed,
        "batch_size": training_args.per_device_train_batch_size,
        "weight_decay": training_args.weight_decay,
        "warmup_steps": training_args.warmup_steps,
        "max_seq_length": data_args.max_seq_length,
        "train_sampling_strategy": training_args.train_sampling_strategy,
        "train_rows": len(train),
        "train_hash": _content_hash(train),
    }


def teacher_folder(model_args: ModelArguments, settings: dict[str, Any]) -> Path:
    """``--teacher_output_dir``, or the cache's folder for these settings: ``<task>-<teacher>-<hash>``."""
    if model_args.teacher_output_dir:
        return Path(model_args.teacher_output_dir)
    cache = (
        Path(model_args.teacher_cache_dir) if model_args.teacher_cache_dir else default_teacher_cache_dir()
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = describe_teacher(settings["base"]).id.replace("/", "--")
    return cache / f"{settings['task']}-{name}-{key}"


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
    if data["train"] is None:
        raise ValueError("--teacher_finetune_epochs needs training data to fine-tune the teacher on.")
    settings = teacher_settings(model_args, data_args, training_args, data["train"])
    folder = teacher_folder(model_args, settings)
    eval_rows = {split: len(ds) for split, ds in data["eval"].items()}
    record_path = folder / TEACHER_CACHE_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            print(f"Teacher cache: reusing the teacher fine-tuned earlier, in {folder}", flush=True)
            if record.get("eval_rows") != eval_rows:  # other validation rows: score it again, cheaply
                teacher = load_classifier(str(folder), data_args.task_name, model_args, role="teacher")
                record["eval"] = evaluate_model(
                    teacher, data["eval"], data_args.task_name, training_args, collator
                )
                record["eval_rows"] = eval_rows
                record_path.write_text(json.dumps(record, indent=2) + "\n")
            record["cached"] = True
            return str(folder), record
        changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
        logger.warning(
            "The teacher in %s was fine-tuned with other settings (%s): fine-tuning again", folder, changed
        )

    print(
        f"Fine-tuning the teacher {model_args.teacher_model_name_or_path} for "
        f"{model_args.teacher_finetune_epochs:g} epochs on {len(data['train'])} rows. Teacher cache: {folder} "
        "(later runs with the same teacher, task, data and settings reuse it)",
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
        dataloader_pin_memory=training_args.dataloader_pin_memory,
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
    record = {
        "settings": settings,
        "eval": metrics,
        "eval_rows": eval_rows,
        "train_seconds": round(seconds, 1),
        "cached": False,
    }
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
