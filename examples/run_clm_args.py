"""The command line of examples/run_clm_distill.py: its argument dataclasses, the per-method ``--help`` and
usage errors (``--config`` files and the help layout are shared with the GLUE example's run_glue_args.py)."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from run_glue_args import HelpFormatter, _config_to_argv, grouped_help, method_and_config, own_options
from run_glue_args import cli_error as glue_cli_error
from run_glue_args import usage_errors as glue_usage_errors
from transformers import HfArgumentParser, TrainingArguments

from hf_distill import DistillationTrainingArguments
from hf_distill.distributed import no_pin_memory_without_accelerator

DESCRIPTION = (
    "Distil a causal language model: the student alone, KD from a live teacher, or KD from a top-k cache."
)
PROG = "run_clm_distill.py"
USAGE = f"{PROG} --method METHOD --output_dir DIR [options]"
METHODS = ("sft", "kd", "kd_topk")
METHOD_SUMMARIES = {
    "sft": "the student alone on the text (transformers.Trainer); no teacher",
    "kd": "token-level distillation from the live, frozen teacher (DistillationTrainer)",
    "kd_topk": "distillation from a cache of the teacher's top-k log-probabilities (DistillationTrainer)",
}
COMMON_TRAINING_OPTIONS = (
    "output_dir",
    "do_train",
    "do_eval",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "warmup_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "seed",
    "logging_steps",
    "save_strategy",
    "report_to",
    "use_cpu",
    "bf16",
    "push_to_hub",
    "hub_model_id",
)
# Defaults of the training options for this corpus and these small models (the command line overrides them).
TRAINING_DEFAULTS = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 1.0,
    "warmup_steps": 0.05,
    "logging_steps": 0.05,
    "save_strategy": "no",
    "report_to": "none",
}
DISTILLATION_DEFAULTS = {"alpha": 0.5, "temperature": 1.0}
ARCHITECTURES = ("llama", "qwen2")


def default_glue_dir() -> str:
    """Where the GLUE files are: ``$HF_DISTILL_SHARED/data/glue``, else ``data/glue`` in the folder beside
    the repository."""
    shared = os.environ.get("HF_DISTILL_SHARED", Path(__file__).resolve().parents[2] / "shared")
    return str(Path(shared) / "data" / "glue")


@dataclass
class ModelArguments:
    """The method, the tokenizer, the teacher and the student."""

    method: str = field(metadata={"help": f"Training method: {', '.join(METHODS)}.", "choices": METHODS})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained causal LM teacher (its tokenizer is used). Default: a teacher trained by the "
            "script on the training text, once (cached, see --teacher_cache_dir)."
        },
    )
    architecture: str = field(
        default="llama",
        metadata={"help": "Architecture of the models built from a config.", "choices": ARCHITECTURES},
    )
    teacher_num_layers: int = field(default=4, metadata={"help": "Layers of the teacher the script trains."})
    teacher_hidden_size: int = field(
        default=256, metadata={"help": "Width of the teacher the script trains."}
    )
    teacher_train_epochs: float = field(
        default=1.0, metadata={"help": "Epochs of the teacher's training on the training text."}
    )
    teacher_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the teacher."})
    teacher_seed: int = field(
        default=42, metadata={"help": "Seed of the teacher's training (apart from --seed: seeds share it)."}
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of trained teachers and tokenizers, one folder per data and settings (default: "
            "$HF_HOME/hf_distill/teachers)."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start the student from this causal LM instead of a new one."}
    )
    student_num_layers: int = field(default=2, metadata={"help": "Layers of a new student."})
    student_hidden_size: int = field(default=128, metadata={"help": "Width of a new student."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer to use. Default: the teacher's when given, else a byte-level BPE trained on the "
            "training text (cached with the teacher)."
        },
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the trained tokenizer."})
    top_k: int = field(default=64, metadata={"help": "kd_topk: the teacher's K most likely tokens cached."})
    topk_cache: str | None = field(
        default=None,
        metadata={
            "help": "kd_topk: a cache built by hf-distill-cache-logits (or cache_teacher_logits) to train from. "
            "Default: built by the script over the training rows, once, and kept beside the teacher."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and data."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown --method {self.method!r}; choose one of {', '.join(METHODS)}.")
        for name in (
            "teacher_num_layers",
            "teacher_hidden_size",
            "student_num_layers",
            "student_hidden_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.teacher_train_epochs <= 0:
            raise ValueError(f"--teacher_train_epochs must be > 0, got {self.teacher_train_epochs}.")
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}.")
        if self.topk_cache is not None and self.method != "kd_topk":
            raise ValueError(f"--topk_cache is read by --method kd_topk only (got {self.method}).")


@dataclass
class DataArguments:
    """The text: the GLUE sentences by default, or your files (a text column or chat messages)."""

    glue_dir: str = field(
        default_factory=default_glue_dir,
        metadata={
            "help": "Folder of the GLUE files (cola, mrpc, stsb with train/validation .jsonl): the default corpus "
            "is their sentences, validation files held out (default: $HF_DISTILL_SHARED/data/glue)."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training text instead of GLUE (.jsonl, .json, .csv, .parquet, .txt)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation text for the perplexity."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset instead of files (splits train and validation)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of plain text rows."})
    messages_column: str = field(
        default="messages",
        metadata={
            "help": "Column of chat rows (lists of {role, content}), rendered with the tokenizer's chat template; "
            "only the assistant's tokens are trained on and scored, as TRL's SFT does."
        },
    )
    max_seq_length: int = field(default=64, metadata={"help": "Longer rows are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation rows."})

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(
                f"--max_seq_length must be >= 2 (a token and its next), got {self.max_seq_length}."
            )
        if self.dataset_name and self.train_file:
            raise ValueError("Give --dataset_name or --train_file, not both.")


# ----- the command line ------------------------------------------------------------------------------------


# The GLUE example's, with this script's usage line.
cli_error = functools.partial(glue_cli_error, usage=USAGE)
usage_errors = functools.partial(glue_usage_errors, usage=USAGE)


def args_class_of(method: str) -> type[TrainingArguments]:
    if method not in METHODS:
        raise ValueError(f"Unknown --method {method!r}; choose one of {', '.join(METHODS)}.")
    return TrainingArguments if method == "sft" else DistillationTrainingArguments


def overview() -> str:
    lines = [f"usage: {USAGE}", "", DESCRIPTION, "", "methods (--method):"]
    lines += [f"  {name:<8} {summary}" for name, summary in METHOD_SUMMARIES.items()]
    lines += [
        "",
        "A method's options:  python examples/run_clm_distill.py --method kd --help",
        "Every option:        python examples/run_clm_distill.py --method kd --help_all",
        "Documentation:       docs/examples.md",
    ]
    return "\n".join(lines) + "\n"


def method_help(method: str, parser: HfArgumentParser, args_class: type[TrainingArguments]) -> str:
    """``--method X --help``: the data, model and X's own options, and the common training ones."""
    groups = [
        ("the text", {f.name for f in dataclasses.fields(DataArguments)}),
        (
            "the tokenizer, the teacher and the student",
            {f.name for f in dataclasses.fields(ModelArguments)} - {"method"},
        ),
        (f"{args_class.__name__}: the {method} method's own options", own_options(args_class)),
        ("common training options (transformers.TrainingArguments)", set(COMMON_TRAINING_OPTIONS)),
    ]
    description = f"--method {method}: {METHOD_SUMMARIES[method]}."
    return grouped_help(parser, PROG, USAGE.replace("METHOD", method), description, groups)


def build_parser(args_class: type[TrainingArguments]) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, args_class), prog=PROG, usage=USAGE, formatter_class=HelpFormatter
    )
    parser.set_defaults(**TRAINING_DEFAULTS)
    if args_class is not TrainingArguments:
        parser.set_defaults(**DISTILLATION_DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (and ``--config``) into the three argument dataclasses of ``--method``."""
    known, rest, config, method = method_and_config(argv, METHODS, overview, USAGE)
    with usage_errors(ValueError):
        args_class = args_class_of(method)
    parser = build_parser(args_class)
    if known.help or known.help_all:
        print(parser.format_help() if known.help_all else method_help(method, parser, args_class), end="")
        raise SystemExit(0)
    with usage_errors(ValueError):
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(
            args=_config_to_argv(config) + rest + ["--method", method]
        )
        if method == "kd_topk" and training_args.distill_loss != "kl":
            raise ValueError(
                f"--method kd_topk trains on the teacher's top-k log-probabilities, which only the kl objective "
                f"reads; got --distill_loss {training_args.distill_loss}. Use --method kd for it."
            )
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    no_pin_memory_without_accelerator(training_args)
    return model_args, data_args, training_args
