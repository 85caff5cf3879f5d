"""Distil a causal language model: the student alone (``sft``), KD from the live teacher (``kd``), or KD from a
cache of the teacher's top-k log-probabilities (``kd_topk``).

By default, offline and on a CPU: the corpus is the sentences of the GLUE files (CoLA, MRPC and STS-B; their
validation files are held out for the perplexity), a byte-level BPE tokenizer and a 4-layer teacher are
trained on it once and cached under $HF_HOME/hf_distill/teachers, and a 2-layer student learns::

    python examples/run_clm_distill.py --method kd --output_dir out/clm-kd
    python examples/run_clm_distill.py --method kd_topk --top_k 64 --output_dir out/clm-kd-topk
    python examples/run_clm_distill.py --method sft --output_dir out/clm-sft

Your own data and teacher: ``--train_file``/``--validation_file`` (or ``--dataset_name``) with a ``text``
column, or a ``messages`` column of chat turns rendered with the tokenizer's chat template (only the
assistant's tokens are trained on, as TRL's SFT does); ``--teacher_model_name_or_path`` a trained causal LM
whose tokenizer the student shares. ``--distill_loss`` (kl, reverse_kl, jsd), ``--jsd_beta``, ``--alpha``,
``--temperature`` and ``--loss_chunk_size`` are DistillationTrainingArguments; ``--method X --help`` lists
X's options. The script is three files side by side: this one (data, training, outputs),
``run_clm_args.py`` (the command line) and ``run_clm_models.py`` (tokenizer, models, teacher, caches).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import transformers
from run_clm_args import DataArguments, ModelArguments, parse_args, usage_errors
from run_clm_models import load_tokenizer, new_causal_lm, perplexity, prepare_teacher, topk_train_set
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

from hf_distill import DistillationTrainer

logger = logging.getLogger("run_clm_distill")

# The GLUE files whose sentences make the default corpus, and their text fields.
GLUE_TEXT_FIELDS = {
    "cola": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
}


# ----- data --------------------------------------------------------------------------------------------------


def glue_sentences(glue_dir: str) -> dict[str, datasets.Dataset]:
    """The distinct sentences of the GLUE files: ``train`` from the training files, ``validation`` from the
    validation files less any sentence also in training."""
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for task, fields in GLUE_TEXT_FIELDS.items():
        for split in splits:
            path = Path(glue_dir) / task / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(
                    f"The GLUE file {path} is missing: set --glue_dir (or HF_DISTILL_SHARED) to the folder of "
                    "the GLUE files, or give your text with --train_file."
                )
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                splits[split] += [row[f].strip() for f in fields if row[f].strip()]
    train = list(dict.fromkeys(splits["train"]))
    seen = set(train)
    validation = [s for s in dict.fromkeys(splits["validation"]) if s not in seen]
    return {
        "train": datasets.Dataset.from_dict({"text": train}),
        "validation": datasets.Dataset.from_dict({"text": validation}),
    }


def load_text(data_args: DataArguments, cache_dir: str | None) -> dict[str, Any]:
    """The raw ``train`` and ``validation`` splits (either may be missing for user data)."""
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, cache_dir=cache_dir)
        return {split: raw[split] for split in ("train", "validation") if split in raw}
    if not data_args.train_file and not data_args.validation_file:
        return glue_sentences(data_args.glue_dir)
    files = {
        s: f for s, f in (("train", data_args.train_file), ("validation", data_args.validation_file)) if f
    }
    suffix = Path(next(iter(files.values()))).suffix.lstrip(".")
    builder = {"jsonl": "json", "txt": "text"}.get(suffix, suffix)
    raw = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    return dict(raw)


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered by the tokenizer's template, and the character spans of the assistant's turns
    (each turn's rendering beyond the conversation before it with the generation prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "The tokenizer's chat template renders a conversation differently from its beginning, so the "
                "assistant's turns cannot be located; use a template whose renderings extend each other."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids of a chat and labels that keep only the assistant's tokens (−100 elsewhere)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Rows with messages need a tokenizer with a chat template (tokenizer.chat_template)."
        )
    text, spans = assistant_spans(messages, tokenizer)
    encoded = tokenizer(
        text, add_special_tokens=False, truncation=True, max_length=max_length, return_offsets_mapping=True
    )
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else -100
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def tokenize_rows(dataset: Any, tokenizer: Any, data_args: DataArguments) -> Any:
    """``input_ids``, ``attention_mask`` and ``labels`` of every row (a text, or a chat with its prompt masked)."""
    columns = dataset.column_names
    if data_args.messages_column in columns:

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            return tokenize_chat(row[data_args.messages_column], tokenizer, data_args.max_seq_length)
    elif data_args.text_column in columns:

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            out = tokenizer(row[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
            return {
                "input_ids": out["input_ids"],
                "attention_mask": out["attention_mask"],
                "labels": out["input_ids"],
            }
    else:
        raise ValueError(
            f"The data has neither a {data_args.text_column!r} nor a {data_args.messages_column!r} column (it has "
            f"{columns}); name yours with --text_column or --messages_column."
        )
    tokenized = dataset.map(encode, remove_columns=columns, desc="Tokenizing")
    return tokenized.filter(lambda row: sum(label != -100 for label in row["labels"][1:]) > 0)


def _first(dataset: Any, n: int | None) -> Any:
    return dataset if n is None or dataset is None else dataset.select(range(min(n, len(dataset))))


def prepare_data(data_args: DataArguments, model_args: ModelArguments) -> tuple[dict[str, Any], Any, str]:
    """(tokenised ``train``/``eval`` splits, the tokenizer, its name)."""
    raw = load_text(data_args, model_args.cache_dir)
    train, validation = (
        _first(raw.get("train"), data_args.max_train_samples),
        _first(raw.get("validation"), data_args.max_eval_samples),
    )
    texts = (
        list(train[data_args.text_column])
        if train is not None and data_args.text_column in train.column_names
        else []
    )
    if not texts and model_args.tokenizer_name is None and model_args.teacher_model_name_or_path is None:
        raise ValueError(
            "Training a tokenizer needs training rows with a text column; give --tokenizer_name."
        )
    from run_clm_models import default_cache_dir

    cache = Path(model_args.teacher_cache_dir) if model_args.teacher_cache_dir else default_cache_dir()
    tokenizer, name = load_tokenizer(model_args, texts, cache)
    data = {
        "train": tokenize_rows(train, tokenizer, data_args) if train is not None else None,
        "eval": tokenize_rows(validation, tokenizer, data_args) if validation is not None else None,
    }
    return data, tokenizer, name


# ----- training and outputs ------------------------------------------------------------------------------------


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    collator: Any,
    teacher: Any,
    teacher_info: dict[str, Any],
) -> Trainer:
    set_seed(training_args.seed)
    if model_args.model_name_or_path:
        student = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
    else:
        student = new_causal_lm(
            model_args.architecture,
            tokenizer,
            model_args.student_num_layers,
            model_args.student_hidden_size,
            data_args.max_seq_length,
        )
    kwargs: dict[str, Any] = dict(
        model=student,
        args=training_args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=collator,
    )
    if model_args.method == "sft":
        return Trainer(**kwargs)
    if training_args.teacher_name is None:  # the card names where the teacher is
        training_args.teacher_name = teacher_info["path"]
    if model_args.method == "kd_topk" and data["train"] is not None:
        kwargs["train_dataset"] = topk_train_set(
            model_args, teacher, teacher_info["path"], data["train"], tokenizer, collator,
            training_args.per_device_eval_batch_size,
        )  # fmt: skip
    return DistillationTrainer(teacher_model=teacher, **kwargs)


def card_results(
    method: str, teacher_info: dict[str, Any], metrics: dict[str, float], data_args: DataArguments
) -> str:
    """The model card's section on this run: the method, the teacher, the perplexities."""
    data = (
        "the GLUE sentences (CoLA, MRPC, STS-B)"
        if not (data_args.train_file or data_args.dataset_name)
        else (data_args.dataset_name or data_args.train_file)
    )
    lines = ["", "## Distillation run (run_clm_distill.py)", "", f"- Method: `{method}`"]
    if teacher_info:
        lines.append(f"- Teacher: `{teacher_info['path']}` ({teacher_info.get('layers')} layers, "
                     f"{teacher_info.get('params', 0) / 1e6:.2f} M parameters)")  # fmt: skip
    lines.append(f"- Data: {data}")
    if "eval_perplexity" in metrics:
        lines.append(f"- Validation perplexity: student {metrics['eval_perplexity']:.3f}"
                     + (f", teacher {metrics['eval_teacher_perplexity']:.3f}" if "eval_teacher_perplexity" in metrics else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script; returns ``eval`` (student and teacher perplexity), ``train`` metrics and paths."""
    model_args, data_args, training_args = parse_args(argv)
    method = model_args.method
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with usage_errors(ValueError, OSError, RuntimeError):
        data, tokenizer, tokenizer_name = prepare_data(data_args, model_args)
        if training_args.do_train and data["train"] is None:
            raise ValueError(
                "--do_train needs training rows: give --train_file (or --dataset_name with a train split)."
            )
        if training_args.do_eval and data["eval"] is None:
            raise ValueError(
                "--do_eval needs validation rows: give --validation_file, or pass --do_train alone."
            )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    with usage_errors():
        teacher, teacher_info = prepare_teacher(
            model_args, data_args, training_args, data, tokenizer, tokenizer_name, collator
        )
        trainer = build_trainer(
            model_args, data_args, training_args, data, tokenizer, collator, teacher, teacher_info
        )
    results: dict[str, Any] = {"output_dir": str(output_dir), "teacher": teacher_info}
    if training_args.do_train:
        print(f"Training the student with {method} on {len(trainer.train_dataset)} rows", flush=True)
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
    metrics: dict[str, float] = {}
    if training_args.do_eval:
        scored = perplexity(trainer.model, data["eval"], collator, training_args.per_device_eval_batch_size)
        metrics = {
            "eval_perplexity": scored["perplexity"],
            "eval_loss": scored["loss"],
            "eval_tokens": scored["tokens"],
        }
        if teacher_info.get("eval"):
            metrics["eval_teacher_perplexity"] = teacher_info["eval"]["perplexity"]
        trainer.log(metrics)  # the model card reads the latest logged evaluation
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
    if training_args.do_train:
        card = {
            "tasks": "text-generation",
            "dataset": "GLUE sentences" if not data_args.train_file else data_args.train_file,
        }
        if training_args.push_to_hub:
            trainer.push_to_hub(**card)
        else:
            trainer.save_model()
            trainer.create_model_card(**card)
        readme = output_dir / "README.md"
        if trainer.is_world_process_zero() and readme.is_file():
            readme.write_text(readme.read_text() + card_results(method, teacher_info, metrics, data_args))
    print(f"\nSummary: {method} (validation perplexity)")
    if teacher_info.get("eval"):
        print(
            f"  teacher  {teacher_info['eval']['perplexity']:10.3f}  ({teacher_info['params'] / 1e6:.2f} M parameters)"
        )
    if metrics:
        print(
            f"  student  {metrics['eval_perplexity']:10.3f}  ({trainer.model.num_parameters() / 1e6:.2f} M parameters)"
        )
    print(f"Outputs in {output_dir.resolve()}")
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
