"""A top-k teacher cache in `DistillationTrainer`: what is refused when the trainer is built, and the sparse
distillation term (https://hf-distill.readthedocs.io/distillation/, "A top-k teacher cache").

The cache (`cache_teacher_logits` with ``top_k``) holds, per position, the teacher's K most likely tokens,
their log-probabilities and the tail's; a batch carrying it reaches `DistillationTrainer.distillation_term`
as a `TopKTeacherTargets`, and the student learns by `sparse_forward_kl` with ``args.topk_tail``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data.batch import (
    TEACHER_LOGITS,
    TEACHER_TOPK_COLUMNS,
    TEACHER_TOPK_IDS,
    TopKTeacherTargets,
    dataset_columns,
)
from ..data.teacher_logits import tokenizer_vocab_hash, topk_cache_metadata
from ..distributed import unwrap_model
from ..losses.sparse import aligned_topk, sparse_forward_kl

__all__ = ["TEACHER_TOPK_COLUMNS", "TopKTeacherTargets", "check_topk_training", "topk_distillation_term"]


def check_topk_training(trainer: Any, dataset: Any) -> None:
    """Refuse, when the trainer is built, what a top-k cache in ``dataset`` cannot train: another loss than
    forward KL, representation terms, an ensemble, a teacher that learns, chunked losses, the tail bucket at
    τ ≠ 1, a student tokenizer other than the cache's, a student vocabulary without the cached ids."""
    if TEACHER_TOPK_IDS not in dataset_columns(dataset):
        return
    args = trainer.args
    refusals = {
        f"the sparse loss is forward KL, and distill_loss={args.distill_loss!r}; set distill_loss='kl'": (
            args.distill_loss != "kl"
        ),
        "representation terms read the teacher's hidden states, which the cache does not hold; set "
        "hidden_distill_weight, attention_distill_weight and crd_weight to 0": args.uses_representations,
        f"it holds one teacher, and {len(trainer.teacher_models)} are given; pass the teacher it was made "
        "with": len(trainer.teacher_models) != 1,
        "the teacher learns, so its cached outputs would be stale after the first step; use "
        "DistillationTrainer with a frozen teacher": any(
            p.requires_grad for t in trainer.teacher_models for p in t.parameters()
        ),
        "loss_chunk_size runs the teacher on hidden states; set loss_chunk_size=None (the sparse loss reads "
        "K of the student's V logits)": getattr(args, "loss_chunk_size", None) is not None,
        f"it also has a full '{TEACHER_LOGITS}' column; keep one of the two caches": TEACHER_LOGITS
        in dataset_columns(dataset),
        f"topk_tail='bucket' needs temperature=1.0 (got {args.temperature}): the cache holds the tail's mass "
        "at temperature 1 only; use topk_tail='renormalize' or temperature=1.0": (
            args.topk_tail == "bucket" and args.temperature != 1.0
        ),
    }
    for reason, refused in refusals.items():
        if refused:
            raise ValueError(f"The training data is a top-k teacher cache, but {reason}.")
    _check_cache_matches_student(topk_cache_metadata(dataset), trainer.model, trainer.processing_class)


def _check_cache_matches_student(metadata: dict[str, Any] | None, model: Any, tokenizer: Any) -> None:
    if metadata is None:
        warnings.warn(
            "The training data has top-k teacher columns but no record of the teacher and tokenizer that made "
            "them (cache_teacher_logits writes it into dataset.info.description), so the student's tokenizer "
            "cannot be checked against the cache's.",
            stacklevel=3,
        )
        return
    recorded = metadata.get("tokenizer_vocab_sha256")
    if (
        recorded
        and isinstance(tokenizer, PreTrainedTokenizerBase)
        and tokenizer_vocab_hash(tokenizer) != recorded
    ):
        raise ValueError(
            f"The top-k cache was made with the tokenizer {metadata.get('tokenizer')!r}, whose vocabulary differs "
            f"from the student's tokenizer ({tokenizer.name_or_path!r}): the cached token ids would name other "
            "tokens. Distil a student that shares the teacher's tokenizer, or rebuild the cache."
        )
    vocab_size = getattr(getattr(unwrap_model(model), "config", None), "vocab_size", None)
    largest = metadata.get("max_token_id")
    if vocab_size is not None and largest is not None and largest >= vocab_size:
        raise ValueError(
            f"The top-k cache holds token id {largest}, beyond the student's vocabulary of {vocab_size}; the "
            f"student must cover the teacher's vocabulary ({metadata.get('vocab_size')})."
        )


def topk_distillation_term(
    trainer: Any,
    student_logits: torch.Tensor,
    targets: TopKTeacherTargets,
    student_inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`DistillationTrainer.distillation_term` for a top-k cache: the sparse forward KL of the positions
    that count, normalised as the dense term is. Returns the loss and its per-position mean for the logs."""
    args = trainer.args
    s_flat, ids, logprobs, tail = aligned_topk(
        student_logits,
        targets.ids,
        targets.logprobs,
        targets.tail_logprob,
        student_inputs.get("labels"),
        student_inputs.get("attention_mask"),
        trainer._shift_labels,
        cached_columns_only=args.topk_tail == "renormalize" and student_logits.dim() == 3,
    )
    settings = (args.topk_tail, args.temperature, args.scale_by_temperature_squared)
    if student_logits.dim() == 2:
        loss = sparse_forward_kl(s_flat, ids, logprobs, tail, *settings, reduction="mean")
        return loss, loss.detach()
    if s_flat.shape[0] == 0:  # every label masked: nothing to distil, keep the graph connected
        zero = student_logits.sum() * 0.0
        return zero, zero.detach()
    summed = sparse_forward_kl(s_flat, ids, logprobs, tail, *settings, reduction="sum")
    mean_for_log = summed.detach() / s_flat.shape[0]
    if num_items_in_batch is None:
        return summed / s_flat.shape[0], mean_for_log
    loss = summed / num_items_in_batch
    if args.average_tokens_across_devices and args.world_size > 1:
        loss = loss * trainer.accelerator.num_processes  # num_items is global; DDP averages the gradients
    return loss, mean_for_log
