"""Distil a GLUE task with any hf_distill method: the student alone, KD, online, meta or LGTM.

Like transformers' ``run_glue.py``, with a teacher. For example, LGTM on MRPC with a fine-tuned teacher
and a student made of its first 3 layers::

    python examples/run_glue_lgtm.py --method lgtm --task_name mrpc \\
        --teacher_model_name_or_path path/to/finetuned-teacher --student_num_layers 3 \\
        --alpha 1.0 --temperature 1.0 --learning_rate 5e-5 --num_train_epochs 6 \\
        --output_dir out/mrpc-lgtm

Offline, on local files, fine-tuning the teacher first from a pretrained checkpoint (once: the fine-tuned
teacher is cached under $HF_HOME/hf_distill/teachers and reused by later runs with the same settings)::

    python examples/run_glue_lgtm.py --method kd --task_name mrpc --data_dir ../shared/data/glue/mrpc \\
        --teacher_model_name_or_path path/to/pretrained --teacher_finetune_epochs 3 \\
        --student_num_layers 3 --output_dir out/mrpc-kd

``--method`` picks the trainer and its arguments: ``finetune`` (`transformers.Trainer`, no teacher),
``kd`` (`DistillationTrainer`), ``online`` (`OnlineDistillTrainer`), ``meta`` (`MetaDistillTrainer`),
``lgtm`` (`LGTMTrainer`); ``--method X --help`` lists X's options, ``--help_all`` every option. ``--config run.json`` (or
.yaml) gives arguments from a file; the command line overrides it. Without any of ``--do_train``,
``--do_eval``, ``--do_predict`` the script trains and evaluates. See docs/examples.md for every option
and output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

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
from hf_distill.devices import no_pin_memory_without_accelerator
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
from hf_distill.metrics import majority_class_metrics, warn_if_collapsed
from hf_distill.model_sources import describe_teacher
from hf_distill.transfer import masked_transfer_set

logger = logging.getLogger("run_glue_lgtm")

PROG = "run_glue_lgtm.py"
USAGE = f"{PROG} --method METHOD --task_name TASK --output_dir DIR [options]"
METHODS = ("finetune", "kd", "online", "meta", "lgtm")
METHOD_SUMMARIES = {
    "finetune": "the student alone (transformers.Trainer); no teacher",
    "kd": "classic distillation from a frozen, fine-tuned teacher (DistillationTrainer)",
    "online": "the teacher learns with the student (OnlineDistillTrainer)",
    "meta": "the teacher learns from the student's quiz loss, second order (MetaDistillTrainer)",
    "lgtm": "the teacher's update is weighted by each sample's distillation influence (LGTMTrainer)",
}
# TrainingArguments worth listing in a method's --help; --help_all lists every one.
COMMON_TRAINING_OPTIONS = (
    "output_dir",
    "do_train",
    "do_eval",
    "do_predict",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "seed",
    "logging_steps",
    "eval_strategy",
    "save_strategy",
    "report_to",
    "use_cpu",
    "bf16",
    "push_to_hub",
    "hub_model_id",
    "resume_from_checkpoint",
)
# Without --logging_steps, a run logs 20 times whatever its length (a ratio, as TrainingArguments allows):
# short runs still show their losses and, for LGTM, the influence statistics its model card summarises.
DEFAULT_LOGGING_STEPS = 0.05
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
            "the training data first. It is cached (see --teacher_cache_dir) and reused by later runs with "
            "the same teacher, task, data and fine-tuning settings."
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
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of fine-tuned teachers, one folder per teacher, task, data and settings (default: "
            "$HF_HOME/hf_distill/teachers; HF_HOME defaults to $XDG_CACHE_HOME/huggingface, then "
            "~/.cache/huggingface)."
        },
    )
    teacher_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Save the fine-tuned teacher in exactly this folder instead of the cache (reused from there "
            "while the settings match)."
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

    task_name: str = field(metadata={"help": f"GLUE task: {', '.join(TRAINABLE_GLUE_TASKS)}."})
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
    transfer_copies: int = field(
        default=0,
        metadata={
            "help": "kd only: train on a transfer set the teacher labels: the training rows plus this many copies "
            "of each with --transfer_mask_probability of their word pieces masked. Pure distillation (needs "
            "--alpha 1.0): the copies have no gold label, and the original rows are distilled without theirs."
        },
    )
    transfer_mask_probability: float = field(
        default=0.15, metadata={"help": "Fraction of each copy's word pieces masked (see --transfer_copies)."}
    )
    # Set by parse_args: evaluation was switched on because no --do_* flag was given.
    eval_by_default: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.task_name = self.task_name.lower().replace("-", "")
        if self.task_name not in TRAINABLE_GLUE_TASKS:
            raise ValueError(
                f"Unknown --task_name {self.task_name!r}; choose one of {', '.join(TRAINABLE_GLUE_TASKS)}."
            )
        if self.quiz_holdout is not None and not 0.0 < self.quiz_holdout < 1.0:
            raise ValueError(f"--quiz_holdout must be in (0, 1), got {self.quiz_holdout}.")
        if self.transfer_copies < 0:
            raise ValueError(f"--transfer_copies must be >= 0, got {self.transfer_copies}.")
        if not 0.0 < self.transfer_mask_probability < 1.0:
            raise ValueError(
                f"--transfer_mask_probability must be in (0, 1), got {self.transfer_mask_probability}."
            )


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


# ----- the command line: help and errors ------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default, except for required options and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if action.option_strings else text


def cli_error(message: str) -> NoReturn:
    """End the script as argparse does for a bad command line: usage, ``error:`` and exit code 2."""
    sys.stderr.write(f"usage: {USAGE}\n{PROG}: error: {message}\n")
    raise SystemExit(2)


@contextlib.contextmanager
def usage_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Report the user's mistakes raised inside (bad values, missing files) as CLI errors, not tracebacks."""
    caught = kinds or (ValueError, OSError)
    try:
        yield
    except caught as err:
        cli_error(str(err))


def overview() -> str:
    """``--help`` without ``--method``: what the script does, the methods, where their options are."""
    lines = [f"usage: {USAGE}", "", __doc__.split("\n\n")[0], "", "methods (--method):"]
    lines += [f"  {name:<9} {summary}" for name, summary in METHOD_SUMMARIES.items()]
    lines += [
        "",
        "A method's options:     python examples/run_glue_lgtm.py --method lgtm --help",
        "Every option:           python examples/run_glue_lgtm.py --method lgtm --help_all",
        "Offline, on local data: --data_dir path/to/glue/mrpc (train/validation/test .jsonl, .tsv or .csv)",
        "A pretrained teacher:   --teacher_finetune_epochs 3 fine-tunes it first, once (it is cached)",
        "Documentation:          docs/examples.md",
    ]
    return "\n".join(lines) + "\n"


def _shown(action: argparse.Action) -> argparse.Action:
    """A copy of ``action`` for a short help: its first spelling only, ``true|false`` for switches."""
    shown = copy.copy(action)
    shown.option_strings = action.option_strings[:1]
    if action.nargs == "?" and action.const is True:
        shown.metavar = "true|false"
    return shown


def method_help(method: str, parser: HfArgumentParser, args_class: type[TrainingArguments]) -> str:
    """``--method X --help``: the task and data options, the teacher and student ones, X's own arguments
    and the common training ones."""
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = {f.name for f in dataclasses.fields(args_class)} - trainer_fields
    display = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE.replace("METHOD", method),
        description=f"--method {method}: {METHOD_SUMMARIES[method]}.",
        epilog="Every transformers.TrainingArguments option is accepted too: --help_all lists them all.",
        formatter_class=HelpFormatter,
        add_help=False,
    )
    groups = [
        ("the task and its data", {f.name for f in dataclasses.fields(DataArguments)}),
        ("the teacher and the student", {f.name for f in dataclasses.fields(ModelArguments)} - {"method"}),
        (f"{args_class.__name__}: the {method} method's own options", own),
        ("common training options (transformers.TrainingArguments)", set(COMMON_TRAINING_OPTIONS)),
    ]
    for title, names in groups:
        actions = [a for a in parser._actions if a.dest in names and a.option_strings]
        if actions:
            group = display.add_argument_group(title)
            for action in actions:
                if not action.option_strings[0].startswith("--no_"):  # `--x false` says the same
                    group._add_action(_shown(action))
    return display.format_help()


def build_parser(args_class: type[TrainingArguments]) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, args_class), prog=PROG, usage=USAGE, formatter_class=HelpFormatter
    )
    parser.set_defaults(logging_steps=DEFAULT_LOGGING_STEPS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (and ``--config``) into the three argument dataclasses of ``--method``.

    ``--help`` without ``--method`` describes the script and lists the methods; with ``--method X`` it
    lists X's options; ``--help_all`` lists every option. Bad values end the script as CLI errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--config", *argv]  # transformers' convention: the file as the first argument
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--help_all", action="store_true")
    known, rest = pre.parse_known_args(argv)
    with usage_errors():
        config = load_config(known.config) if known.config else {}
    method = known.method or config.get("method")
    if known.help and method is None:
        print(overview(), end="")
        raise SystemExit(0)
    method = method or ModelArguments.method
    with usage_errors(ValueError):
        _, args_class = trainer_classes(method)
    parser = build_parser(args_class)
    if known.help or known.help_all:
        print(parser.format_help() if known.help_all else method_help(method, parser, args_class), end="")
        raise SystemExit(0)
    # The file's arguments come first, so the command line overrides them.
    with usage_errors(ValueError):
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(
            args=_config_to_argv(config) + rest + ["--method", method]
        )
    with usage_errors(ValueError):
        check_transfer_set(model_args, data_args, training_args)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
        data_args.eval_by_default = True
    no_pin_memory_without_accelerator(training_args)
    return model_args, data_args, training_args


def check_transfer_set(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """--transfer_copies is pure distillation from a frozen teacher: refuse the settings it cannot serve."""
    if data_args.transfer_copies == 0:
        return
    if model_args.method != "kd":
        raise ValueError(
            f"--transfer_copies works with --method kd only (got {model_args.method}): the other methods' "
            "teachers or students need the gold labels the copies do not have. Drop --transfer_copies."
        )
    if training_args.alpha != 1.0:
        raise ValueError(
            f"--transfer_copies needs --alpha 1.0 (got {training_args.alpha}): the transfer rows have no gold "
            "label for the task term. Pass --alpha 1.0."
        )


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
            if kind == "validation" and data_args.eval_by_default:  # the user asked for no evaluation
                raise ValueError(
                    f"The data has no validation split (only {list(raw)}), and without --do_train, --do_eval "
                    "or --do_predict the script trains and evaluates. Give --validation_file or put a "
                    f"{wanted[kind][0]} file in --data_dir, or pass --do_train to train without evaluating."
                )
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
            metrics.update(_suffixed(trainer.evaluate(dataset), split))
    return metrics


def _suffixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{k}_mm" if split.endswith("mismatched") else k: v for k, v in metrics.items()}


def default_teacher_cache_dir() -> Path:
    """``$HF_HOME/hf_distill/teachers``; ``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``, then
    ``~/.cache/huggingface``, as in the Hugging Face libraries."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = os.environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")
    return Path(hf_home) / "hf_distill" / "teachers"


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


def majority_baseline(task: str, eval_sets: dict[str, Any]) -> dict[str, float] | None:
    """The ``eval_*`` metrics of always predicting each validation set's majority class (None for stsb)."""
    metrics: dict[str, float] = {}
    for split, dataset in eval_sets.items():
        baseline = majority_class_metrics(metric_task(task, split), dataset["label"])
        if baseline is None:
            return None
        metrics.update(_suffixed({f"eval_{k}": v for k, v in baseline.items()}, split))
    return metrics


def summary_rows(
    method: str,
    teacher_info: dict[str, Any],
    model_args: ModelArguments,
    trainer: Trainer,
    results: dict[str, Any],
    baseline: dict[str, float] | None,
) -> list[dict[str, Any]]:
    """The summary's rows: the teacher as given, the student, the teacher after a learning method, and the
    majority-class baseline that a model collapsed to one class scores at best."""
    rows = []
    if teacher_info:
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
            "seconds": (results.get("train") or {}).get("train_runtime"),
        }
    )
    taught = {
        k.replace("eval_teacher_", "eval_"): v
        for k, v in (results.get("eval") or {}).items()
        if "_teacher_" in k
    }
    if method in LEARNING_TEACHER and taught:
        rows.append(
            {
                "name": f"teacher after {method}",
                "layers": teacher_info.get("layers"),
                "params": teacher_info.get("params"),
                "metrics": taught,
            }
        )
    if baseline is not None:
        rows.append({"name": "majority class (baseline)", "metrics": baseline})
    return rows


# ----- main ----------------------------------------------------------------------------------------------------


def card_arguments(task: str, data_args: DataArguments) -> dict[str, Any]:
    card = {"tasks": "text-classification", "dataset": f"GLUE {task.upper()}", "dataset_args": task}
    if data_args.data_dir or data_args.train_file:
        card["dataset"] += " (local files)"
    else:  # the Hub's GLUE lives at nyu-mll/glue ("glue" redirects there)
        card["dataset_tags"] = "nyu-mll/glue" if data_args.dataset_name == "glue" else data_args.dataset_name
    return card


def evaluate_student(trainer: Trainer, eval_sets: dict[str, Any], quiz: Any) -> dict[str, Any]:
    """Score the student on every validation set (and the quiz rows); writes eval_results.json.

    The first validation set (mnli: matched) is scored last, so that the model card, which reads the
    latest evaluation in the trainer's log, reports it.
    """
    metrics: dict[str, float] = {}
    for split, dataset in reversed(eval_sets.items()):
        split_metrics = trainer.evaluate(eval_dataset=dataset)
        split_metrics["eval_samples"] = len(dataset)
        metrics.update(_suffixed(split_metrics, split))
    metrics = dict(sorted(metrics.items()))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    out: dict[str, Any] = {"eval": metrics}
    if quiz is not None:
        quiz_metrics = trainer.evaluate(eval_dataset=quiz, metric_key_prefix="quiz")
        quiz_metrics["quiz_samples"] = len(quiz)
        trainer.save_metrics("quiz", quiz_metrics)
        out["quiz"] = quiz_metrics
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script; returns what it wrote: ``eval``, ``teacher_eval``, ``quiz``, ``train`` metrics, paths.

    Mistakes in the command line or the files it names end it as a CLI error (``SystemExit(2)``).
    """
    model_args, data_args, training_args = parse_args(argv)
    method, task = model_args.method, data_args.task_name
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    trainer_class, _ = trainer_classes(method)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    student_source = model_args.model_name_or_path or model_args.teacher_model_name_or_path

    with usage_errors(ValueError, OSError, RuntimeError):  # RuntimeError: GLUE from the Hub while offline
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or student_source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
        if data_args.transfer_copies and tokenizer.mask_token_id is None:  # before the teacher is fine-tuned
            raise ValueError(
                f"--transfer_copies masks word pieces, but the tokenizer {type(tokenizer).__name__} has no mask "
                "token; use a tokenizer with one (BERT-style models have [MASK]) or drop --transfer_copies."
            )
        data = prepare_data(data_args, model_args, training_args, tokenizer)
    collator = collator_for(tokenizer, data_args, training_args)
    if data["quiz"] is not None:
        print(f"Held out {len(data['quiz'])} quiz rows; training on {len(data['train'])} rows.", flush=True)

    with usage_errors():
        teacher, teacher_info = prepare_teacher(
            model_args, data_args, training_args, data, tokenizer, collator
        )
    results: dict[str, Any] = {"output_dir": str(output_dir), "teacher_eval": teacher_info.get("eval", {})}
    if teacher is not None and teacher_info.get("eval"):
        (output_dir / "teacher_eval_results.json").write_text(
            json.dumps(teacher_info["eval"], indent=2) + "\n"
        )

    with usage_errors():
        trainer = build_trainer(
            trainer_class, model_args, data_args, training_args, data, tokenizer, collator, teacher
        )

    if training_args.do_train:
        print(f"Training the student with {method} on {len(trainer.train_dataset)} rows", flush=True)
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
    if training_args.do_eval:
        results.update(evaluate_student(trainer, data["eval"], data["quiz"]))
    if training_args.do_train:  # after the evaluation, so that the model card carries its results
        if method == "kd" and teacher_info.get("eval"):  # the frozen teacher's scores, for the card
            trainer.log({k.replace("eval_", "eval_teacher_", 1): v for k, v in teacher_info["eval"].items()})
        if training_args.push_to_hub:
            trainer.push_to_hub(**card_arguments(task, data_args))  # also leaves the student in output_dir
        else:
            trainer.save_model()
            trainer.create_model_card(**card_arguments(task, data_args))
        if method == "lgtm":
            log_path = output_dir / "influence.jsonl"
            results["figures"] = (
                write_influence_figures(log_path, training_args.seed) if log_path.is_file() else []
            )

    if training_args.do_predict:
        written = []
        for split, dataset in data["test"].items():
            output = trainer.predict(dataset.remove_columns("label"), metric_key_prefix="predict")
            path = output_dir / GLUE_SUBMISSION_FILES[metric_task(task, split)]
            if trainer.is_world_process_zero():
                write_glue_predictions(path, task, predictions_from_logits(task, output.predictions))
            written.append(str(path))
        results["predictions"] = written

    baseline = majority_baseline(task, data["eval"]) if data["eval"] else None
    print_summary(task, method, summary_rows(method, teacher_info, model_args, trainer, results, baseline))
    print(f"Outputs in {output_dir.resolve()}")
    return results


def build_trainer(
    trainer_class: type[Trainer],
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    collator: Any,
    teacher: nn.Module | None,
) -> Trainer:
    """The student and its trainer for ``--method``."""
    method, task = model_args.method, data_args.task_name
    set_seed(training_args.seed)
    student_source = model_args.model_name_or_path or model_args.teacher_model_name_or_path
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
    metrics_task = metric_task(task, first_eval or "validation")
    train = data["train"]
    if train is not None and data_args.transfer_copies > 0:
        train = transfer_set(train, tokenizer, data_args, training_args.seed)
    kwargs: dict[str, Any] = dict(
        model=student,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_sets.get(first_eval),
        processing_class=tokenizer,
        data_collator=collator,
        # hf_distill's trainers warn when the student predicts one class everywhere; Trainer needs help.
        compute_metrics=checked_metrics(metrics_task, "The student")
        if method == "finetune"
        else glue_compute_metrics(metrics_task),
        callbacks=[InfluenceLoggerCallback()] if method == "lgtm" else [],
    )
    if method != "finetune":
        kwargs["teacher_model"] = teacher
    if method in QUIZ_METHODS and data["quiz"] is not None:
        kwargs["quiz_dataset"] = data["quiz"]
    return trainer_class(**kwargs)


def transfer_set(train: Any, tokenizer: Any, data_args: DataArguments, seed: int) -> Any:
    """The training rows and their masked copies, unlabelled (``--transfer_copies``)."""
    return masked_transfer_set(
        train,
        tokenizer.mask_token_id,
        tokenizer.all_special_ids,
        copies=data_args.transfer_copies,
        mask_probability=data_args.transfer_mask_probability,
        seed=seed,
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
