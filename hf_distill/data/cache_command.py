"""The ``hf-distill-cache-logits`` command: a language-model teacher's top-k cache of a dataset, on disk.

    hf-distill-cache-logits --dataset DATA --teacher TEACHER --top_k 64 --output_dir OUT

``DATA`` is a folder written by ``save_to_disk``, a folder of data files (json, csv, parquet, ...) or a Hub
dataset id; rows with ``input_ids`` are cached as they are, rows with text are tokenised with the teacher's
tokenizer first. ``OUT`` is a `datasets` folder (``datasets.load_from_disk(OUT)``) to train on with
`DistillationTrainer` (https://hf-distill.readthedocs.io/distillation/, "A top-k teacher cache").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-distill-cache-logits",
        description="Cache a causal language model teacher's K most likely tokens per position (ids, "
        "log-probabilities and the tail's log-probability) for a dataset, and save it with save_to_disk.",
    )
    parser.add_argument(
        "--dataset", required=True, help="A save_to_disk folder, a folder of data files or a Hub id."
    )
    parser.add_argument("--split", default="train", help="The split to cache (default: train).")
    parser.add_argument(
        "--teacher", required=True, help="The teacher: a local folder or a Hub id (with its tokenizer)."
    )
    parser.add_argument("--top_k", type=int, default=64, help="Tokens kept per position (default: 64).")
    parser.add_argument("--output_dir", required=True, help="Where the cached dataset is saved.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per teacher forward (default: 8).")
    parser.add_argument("--max_length", type=int, default=None, help="Truncate text to this many tokens.")
    parser.add_argument("--text_column", default="text", help="The text column when rows have no input_ids.")
    parser.add_argument(
        "--logprob_dtype",
        default="float16",
        choices=("float16", "float32"),
        help="Storage of the top-k log-probabilities (default: float16).",
    )
    parser.add_argument(
        "--dtype", default=None, help="The teacher's dtype, e.g. bfloat16 (default: its own)."
    )
    parser.add_argument(
        "--device", default=None, help="e.g. cuda:0 (default: cuda when available, else cpu)."
    )
    return parser


def load_rows(dataset: str, split: str) -> Any:
    """The ``split`` of a ``save_to_disk`` folder, a folder of data files or a Hub dataset."""
    import datasets

    if os.path.isdir(dataset) and any(os.path.exists(os.path.join(dataset, f)) for f in SAVED_DATASET_FILES):
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has no split {split!r}; its splits are {list(loaded)}.")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(dataset, split=split)


def tokenised(rows: Any, tokenizer: Any, text_column: str, max_length: int | None) -> Any:
    """Rows with ``input_ids``: as they are, or their ``text_column`` tokenised by the teacher's tokenizer."""
    if "input_ids" in rows.column_names:
        return rows
    if text_column not in rows.column_names:
        raise ValueError(
            f"The dataset has neither input_ids nor a {text_column!r} column (columns: {rows.column_names}); "
            "name the text column with --text_column."
        )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[text_column], truncation=max_length is not None, max_length=max_length)

    return rows.map(tokenize, batched=True, desc="Tokenising with the teacher's tokenizer")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise SystemExit("--top_k and --batch_size must be integers >= 1.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .teacher_logits import cache_teacher_logits

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    tokenizer.padding_side = "right"  # the cached positions are each row's first tokens
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are dropped before caching
    init_kwargs = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, **init_kwargs).to(device)
    rows = tokenised(load_rows(args.dataset, args.split), tokenizer, args.text_column, args.max_length)
    cached = cache_teacher_logits(
        rows,
        teacher,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        device=device,
        top_k=args.top_k,
        logprob_dtype=args.logprob_dtype,
        teacher_name=args.teacher,
    )
    cached.save_to_disk(args.output_dir)
    print(f"Saved {len(cached)} rows with the teacher's top {args.top_k} to {args.output_dir}")


if __name__ == "__main__":
    main()
