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

The script is three files, kept side by side: this one (data, training, outputs), ``run_glue_args.py`` (the
command line) and ``run_glue_models.py`` (loading the models; fine-tuning and caching the teacher).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import transformers
from run_glue_args import (
    LEARNING_TEACHER,
    DataArguments,
    ModelArguments,
    parse_args,
    trainer_classes,
    usage_errors,
)
from run_glue_models import (
    checked_metrics,
    load_classifier,
    prepare_teacher,
    suffixed,
    zero_classifier,
)
from torch import nn
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_distill import InfluenceLoggerCallback, glue_compute_metrics, split_quiz
from hf_distill.data.transfer import masked_transfer_set
from hf_distill.glue.data import (
    GLUE_SUBMISSION_FILES,
    eval_split_names,
    load_glue,
    metric_task,
    predictions_from_logits,
    test_split_names,
    tokenize_glue,
    write_glue_predictions,
)
from hf_distill.glue.metrics import majority_class_metrics

logger = logging.getLogger("run_glue_lgtm")

QUIZ_METHODS = frozenset({"meta", "lgtm"})


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
        metrics.update(suffixed({f"eval_{k}": v for k, v in baseline.items()}, split))
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
        metrics.update(suffixed(split_metrics, split))
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
