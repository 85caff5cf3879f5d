"""The command line of examples/run_glue_lgtm.py: its argument dataclasses, ``--config`` files, the
per-method ``--help`` and usage errors."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser, Trainer, TrainingArguments

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
from hf_distill.distributed import no_pin_memory_without_accelerator
from hf_distill.glue.data import TRAINABLE_GLUE_TASKS

DESCRIPTION = "Distil a GLUE task with any hf_distill method: the student alone, KD, online, meta or LGTM."

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


def trainer_classes(method: str) -> tuple[type[Trainer], type[TrainingArguments]]:
    """(trainer, arguments class) of ``method``."""
    if method == "finetune":
        return Trainer, TrainingArguments
    if method == "kd":
        return DistillationTrainer, DistillationTrainingArguments
    if method == "online":
        return OnlineDistillTrainer, OnlineDistillTrainingArguments
    if method == "lgtm":
        return LGTMTrainer, LGTMTrainingArguments
    if method == "meta":
        return MetaDistillTrainer, MetaDistillTrainingArguments
    raise ValueError(f"Unknown --method {method!r}; choose one of {', '.join(METHODS)}.")


# ----- arguments -----------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The method, the teacher and the student."""

    method: str = field(
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


# Our own --config merging rather than TRL's TrlParser: trl is a large dependency to take for a parser.
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


def cli_error(message: str, usage: str = USAGE) -> NoReturn:
    """End the script as argparse does for a bad command line: usage, ``error:`` and exit code 2 (``usage``
    starts with the script's name; the causal-LM example passes its own)."""
    sys.stderr.write(f"usage: {usage}\n{usage.split()[0]}: error: {message}\n")
    raise SystemExit(2)


@contextlib.contextmanager
def usage_errors(*kinds: type[Exception], usage: str = USAGE) -> Iterator[None]:
    """Report the user's mistakes raised inside (bad values, missing files) as CLI errors, not tracebacks."""
    caught = kinds or (ValueError, OSError)
    try:
        yield
    except caught as err:
        cli_error(str(err), usage)


def overview() -> str:
    """``--help`` without ``--method``: what the script does, the methods, where their options are."""
    lines = [f"usage: {USAGE}", "", DESCRIPTION, "", "methods (--method):"]
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


def grouped_help(
    parser: HfArgumentParser, prog: str, usage: str, description: str, groups: list[tuple[str, set[str]]]
) -> str:
    """A short help of ``parser``'s options named in ``groups`` (title, option names), in that order."""
    display = argparse.ArgumentParser(
        prog=prog,
        usage=usage,
        description=description,
        epilog="Every transformers.TrainingArguments option is accepted too: --help_all lists them all.",
        formatter_class=HelpFormatter,
        add_help=False,
    )
    for title, names in groups:
        actions = [a for a in parser._actions if a.dest in names and a.option_strings]
        if actions:
            group = display.add_argument_group(title)
            for action in actions:
                if not action.option_strings[0].startswith("--no_"):  # `--x false` says the same
                    group._add_action(_shown(action))
    return display.format_help()


def own_options(args_class: type[TrainingArguments]) -> set[str]:
    """The fields ``args_class`` adds to `TrainingArguments` (a method's own options)."""
    return {f.name for f in dataclasses.fields(args_class)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }


def method_help(method: str, parser: HfArgumentParser, args_class: type[TrainingArguments]) -> str:
    """``--method X --help``: the task and data options, the teacher and student ones, X's own arguments
    and the common training ones."""
    groups = [
        ("the task and its data", {f.name for f in dataclasses.fields(DataArguments)}),
        ("the teacher and the student", {f.name for f in dataclasses.fields(ModelArguments)} - {"method"}),
        (f"{args_class.__name__}: the {method} method's own options", own_options(args_class)),
        ("common training options (transformers.TrainingArguments)", set(COMMON_TRAINING_OPTIONS)),
    ]
    description = f"--method {method}: {METHOD_SUMMARIES[method]}."
    return grouped_help(parser, PROG, USAGE.replace("METHOD", method), description, groups)


def build_parser(args_class: type[TrainingArguments]) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, args_class), prog=PROG, usage=USAGE, formatter_class=HelpFormatter
    )
    parser.set_defaults(logging_steps=DEFAULT_LOGGING_STEPS)
    return parser


def method_and_config(
    argv: list[str] | None, methods: tuple[str, ...], overview_text: Any, usage: str = USAGE
) -> tuple[argparse.Namespace, list[str], dict[str, Any], str]:
    """Before a method's parser exists: the help flags, the rest of the command line, the ``--config`` file's
    values and the ``--method`` (required; ``--help`` without it prints ``overview_text()`` and exits)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--config", *argv]  # transformers' convention: the file as the first argument
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--help_all", action="store_true")
    known, rest = pre.parse_known_args(argv)
    with usage_errors(usage=usage):
        config = load_config(known.config) if known.config else {}
    method = known.method or config.get("method")
    if known.help and method is None:
        print(overview_text(), end="")
        raise SystemExit(0)
    if method is None:  # no default: the methods differ too much in cost and in what they need
        cli_error(f"the following arguments are required: --method (choose from {', '.join(methods)})", usage)
    return known, rest, config, method


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (and ``--config``) into the three argument dataclasses of ``--method``.

    ``--help`` without ``--method`` describes the script and lists the methods; with ``--method X`` it
    lists X's options; ``--help_all`` lists every option. Bad values end the script as CLI errors.
    """
    known, rest, config, method = method_and_config(argv, METHODS, overview)
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
        check_batch_sizes(training_args)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
        data_args.eval_by_default = True
    no_pin_memory_without_accelerator(training_args)
    return model_args, data_args, training_args


def check_batch_sizes(training_args: TrainingArguments) -> None:
    """Refuse a batch size below 1 by its flag, before the teacher is loaded or fine-tuned."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        value = getattr(training_args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a whole number of rows, 1 or more; got {value!r}.")


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
