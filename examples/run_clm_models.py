"""The models of examples/run_clm_distill.py: the tokenizer (trained on the text when none is given), causal
LMs built from a config, the teacher trained once and cached, the top-k teacher cache, and perplexity."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from run_clm_args import DataArguments, ModelArguments
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_distill import cache_teacher_logits

TEACHER_RECORD = "hf_distill_clm_teacher.json"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$HF_HOME/hf_distill/teachers``, as the GLUE example caches its teachers."""
    return Path(hf_constants.HF_HOME) / "hf_distill" / "teachers"


# ----- tokenizer -------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (no pretrained tokenizer is needed offline); it adds
    ``<s>`` before and ``</s>`` after each text."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[(t, core.token_to_id(t)) for t in ("<s>", "</s>")],
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def load_tokenizer(model_args: ModelArguments, texts: list[str], cache: Path) -> tuple[Any, str]:
    """(tokenizer, its name): ``--tokenizer_name``, the given teacher's, or one trained on ``texts`` and
    cached by the text's hash and the vocabulary size."""
    name = model_args.tokenizer_name or model_args.teacher_model_name_or_path
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    else:
        folder = cache / f"clm-tokenizer-bpe{model_args.tokenizer_vocab_size}-{_hash(texts)}"
        if not (folder / "tokenizer.json").is_file():
            train_tokenizer(texts, model_args.tokenizer_vocab_size).save_pretrained(folder)
        tokenizer, name = AutoTokenizer.from_pretrained(folder), str(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, name


# ----- models ------------------------------------------------------------------------------------------------


def new_causal_lm(
    architecture: str, tokenizer: Any, num_layers: int, hidden_size: int, max_length: int
) -> nn.Module:
    """A causal LM of ``architecture`` at this size, with heads of 32 dimensions and tied embeddings."""
    heads = max(1, hidden_size // 32)
    config = CONFIGS[architecture](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(max_length, 128),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def perplexity(model: nn.Module, dataset: Any, collator: Callable, batch_size: int) -> dict[str, float]:
    """Token-level perplexity: exp of the summed next-token loss over every scored token (labels ≠ −100)
    divided by their count, so long and short rows weigh by their tokens."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).select_columns(columns)
            batch = {k: v.to(device) for k, v in collator(list(rows)).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum"
            )
            total += losses.item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return {"perplexity": math.exp(total / count), "loss": total / count, "tokens": count}


# ----- the teacher -----------------------------------------------------------------------------------------


def teacher_settings(
    model_args: ModelArguments, data_args: DataArguments, args: Any, name: str, train: Any
) -> dict:
    return {
        "architecture": model_args.architecture,
        "layers": model_args.teacher_num_layers,
        "hidden_size": model_args.teacher_hidden_size,
        "epochs": model_args.teacher_train_epochs,
        "learning_rate": model_args.teacher_learning_rate,
        "seed": model_args.teacher_seed,
        "batch_size": args.per_device_train_batch_size,
        "warmup_steps": args.warmup_steps,
        "max_seq_length": data_args.max_seq_length,
        "tokenizer": name,
        "train_rows": len(train),
        "train_hash": _hash([train["input_ids"], train["labels"]]),
    }


def train_teacher(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    tokenizer_name: str,
    collator: Callable,
) -> tuple[str, dict[str, Any]]:
    """Train the teacher once on the training rows and cache it (with the tokenizer); later runs with the
    same data and settings reuse it. Returns (its folder, its record: settings, perplexity, time)."""
    settings = teacher_settings(model_args, data_args, training_args, tokenizer_name, data["train"])
    cache = Path(model_args.teacher_cache_dir) if model_args.teacher_cache_dir else default_cache_dir()
    folder = cache / (
        f"clm-{model_args.architecture}-{model_args.teacher_num_layers}x{model_args.teacher_hidden_size}-"
        f"{_hash(settings)}"
    )
    record_path = folder / TEACHER_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        print(f"Teacher cache: reusing the teacher trained earlier, in {folder}", flush=True)
        return str(folder), {**record, "cached": True}
    print(f"Training the teacher ({settings['layers']} layers x {settings['hidden_size']}) on "
          f"{len(data['train'])} rows; cached in {folder}", flush=True)  # fmt: skip
    set_seed(model_args.teacher_seed)
    teacher = new_causal_lm(
        model_args.architecture,
        tokenizer,
        model_args.teacher_num_layers,
        model_args.teacher_hidden_size,
        data_args.max_seq_length,
    )
    args = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=model_args.teacher_train_epochs,
        learning_rate=model_args.teacher_learning_rate,
        seed=model_args.teacher_seed,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        warmup_steps=training_args.warmup_steps,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
        disable_tqdm=training_args.disable_tqdm,
        logging_steps=0.1,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(model=teacher, args=args, train_dataset=data["train"], data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(str(folder))
    record = {
        "settings": settings,
        "eval": perplexity(teacher, data["eval"], collator, training_args.per_device_eval_batch_size)
        if data["eval"] is not None
        else {},
        "train_seconds": round(seconds, 1),
        "params": teacher.num_parameters(),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")  # last: a crash leaves no record
    return str(folder), {**record, "cached": False}


def prepare_teacher(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    data: dict[str, Any],
    tokenizer: Any,
    tokenizer_name: str,
    collator: Callable,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """The teacher (None for sft) and what to report about it: path, perplexity, parameters."""
    if model_args.method == "sft":
        return None, {}
    if model_args.teacher_model_name_or_path is not None:
        path, info = model_args.teacher_model_name_or_path, {}
    else:
        if data["train"] is None:
            raise ValueError("Training the default teacher needs training rows; give --do_train.")
        path, info = train_teacher(
            model_args, data_args, training_args, data, tokenizer, tokenizer_name, collator
        )
    teacher = AutoModelForCausalLM.from_pretrained(path, cache_dir=model_args.cache_dir)
    if teacher.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(f"The teacher {path} has fewer output tokens than the tokenizer's {len(tokenizer)}.")
    info["path"] = path
    info["params"] = teacher.num_parameters()
    info["layers"] = teacher.config.num_hidden_layers
    if not info.get("eval") and data["eval"] is not None:
        info["eval"] = perplexity(teacher, data["eval"], collator, training_args.per_device_eval_batch_size)
    return teacher, info


def topk_train_set(
    model_args: ModelArguments,
    teacher: nn.Module,
    teacher_path: str,
    train: Any,
    tokenizer: Any,
    collator: Callable,
    batch_size: int,
) -> Any:
    """kd_topk's training rows: ``--topk_cache``, or the teacher's top k over ``train`` cached once in the
    teacher's folder (or beside a given teacher's name in the teacher cache)."""
    import datasets

    if model_args.topk_cache is not None:
        cached = datasets.load_from_disk(model_args.topk_cache)
        missing = {"input_ids", "teacher_topk_ids"} - set(cached.column_names)
        if missing:
            raise ValueError(f"--topk_cache {model_args.topk_cache} lacks the columns {sorted(missing)}.")
        return cached
    base = Path(teacher_path) if Path(teacher_path).is_dir() else default_cache_dir()
    folder = base / f"topk{model_args.top_k}-{_hash([train['input_ids'], train['labels']])}"
    if (folder / "dataset_info.json").is_file():
        print(f"Top-k cache: reusing {folder}", flush=True)
        return datasets.load_from_disk(str(folder))
    print(f"Caching the teacher's top {model_args.top_k} over {len(train)} rows in {folder}", flush=True)
    cached = cache_teacher_logits(
        train,
        teacher,
        tokenizer=tokenizer,
        data_collator=collator,  # pads the labels with -100 too
        top_k=model_args.top_k,
        batch_size=batch_size,
        teacher_name=teacher_path,
    )
    cached.save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))
