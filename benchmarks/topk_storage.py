"""Bytes per token on disk of a top-k teacher cache against the full-vocabulary cache.

    python benchmarks/topk_storage.py [--top_k 64] [--vocab_size 151936]

A teacher of the given vocabulary at a tiny width (hidden 16, one layer, random weights: the storage does
not depend on them) caches random token rows both ways; each folder written by ``save_to_disk`` is measured
(its .arrow files) and divided by the tokens it holds. The full cache is measured on fewer tokens (its
bytes per token do not depend on the count, and it is ~600 kB per token at this vocabulary).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_distill import cache_teacher_logits


def bytes_per_token(dataset: datasets.Dataset, folder: Path) -> float:
    dataset.save_to_disk(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.arrow"))
    return size / sum(len(ids) for ids in dataset["input_ids"])


def rows(count: int, length: int, vocab_size: int) -> datasets.Dataset:
    ids = torch.randint(0, vocab_size, (count, length), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=151_936)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=128)
    teacher = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        topk = cache_teacher_logits(rows(4, 64, args.vocab_size), teacher, top_k=args.top_k, batch_size=4)
        sparse = bytes_per_token(topk, Path(tmp) / "topk")
        full = cache_teacher_logits(rows(2, 8, args.vocab_size), teacher, batch_size=2)
        dense64 = bytes_per_token(
            full, Path(tmp) / "full"
        )  # cache_teacher_logits stores python floats: float64
        as_float32 = datasets.List(datasets.List(datasets.Value("float32")))
        dense32 = bytes_per_token(full.cast_column("teacher_logits", as_float32), Path(tmp) / "full32")
    print(f"vocabulary {args.vocab_size}, K = {args.top_k}; every figure includes the int32 input_ids")
    print(f"top-k cache (int32 ids, float16 log-probs, float32 tail): {sparse:,.0f} bytes/token")
    print(
        f"full-vocabulary cache as written (float64 logits): {dense64:,.0f} bytes/token ({dense64 / sparse:,.0f}x)"
    )
    print(f"full-vocabulary cache cast to float32: {dense32:,.0f} bytes/token ({dense32 / sparse:,.0f}x)")


if __name__ == "__main__":
    main()
