"""Forward KL against a sparse teacher: its K most likely tokens at each position (a top-k cache) and the
log of the probability mass outside them (the tail).

Two ways to handle the tail (https://hf-distill.readthedocs.io/algorithms/, "Sparse teacher targets"):

- ``"renormalize"``: both distributions restricted to the teacher's K tokens and renormalised over them;
  ``τ² · KL(q̃_t ‖ p̃_s)``. Exact at any temperature (tempering commutes with the restriction).
- ``"bucket"``: the K tokens plus one bucket for everything else, for both models (the student's tail
  from its full softmax); ``KL`` over those K + 1 outcomes. It needs τ = 1: the cache holds the tail's
  mass only, which does not determine the tempered tail.

``bucket = Q · renormalize + KL_bin(Q ‖ P)`` at τ = 1, with ``Q`` and ``P`` the mass teacher and student
put on the K tokens: the bucket loss is never below ``Q ×`` the renormalised one, and never above the
dense KL. It can be below the renormalised loss itself (when ``P = Q``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .objectives import _reduce, _upcast, token_mask

TOPK_TAILS = ("renormalize", "bucket")


def _kl_terms(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``q · (log q − log p)`` elementwise, 0 where ``q = 0`` (an empty tail: no NaN, no NaN gradient)."""
    present = log_q > float("-inf")
    safe_log_q = torch.where(present, log_q, torch.zeros_like(log_q))
    return torch.where(present, safe_log_q.exp() * (safe_log_q - log_p), torch.zeros_like(log_p))


def _check_sparse_inputs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor | None,
    tail: str,
    temperature: float,
) -> None:
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail={tail!r} is unknown; choose one of {TOPK_TAILS}.")
    if student_logits.dim() != 2 or topk_ids.dim() != 2:
        raise ValueError(
            f"sparse_forward_kl takes (N, V) student logits and (N, K) ids; got {tuple(student_logits.shape)} "
            f"and {tuple(topk_ids.shape)}. Flatten token positions first."
        )
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"Top-k ids {tuple(topk_ids.shape)} and log-probabilities {tuple(topk_logprobs.shape)} must both be "
            f"(N, K) with N = {student_logits.shape[0]}, the student's positions."
        )
    if topk_ids.shape[1] > student_logits.shape[1]:
        raise ValueError(
            f"K = {topk_ids.shape[1]} teacher tokens per position exceed the student's vocabulary "
            f"({student_logits.shape[1]}): the cache and the student do not share a vocabulary."
        )
    if tail == "bucket":
        if tail_logprob is None or tail_logprob.shape != topk_ids.shape[:1]:
            raise ValueError("tail='bucket' needs tail_logprob, one value per position (N,).")
        if temperature != 1.0:
            raise ValueError(
                f"tail='bucket' needs temperature=1.0 (got {temperature}): the cache holds the teacher's "
                "log-probabilities at temperature 1 and only the total mass of its tail, which does not "
                "determine the tempered tail. Use tail='renormalize' for another temperature."
            )


def sparse_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor | None = None,
    tail: str = "renormalize",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL of the student from a teacher known by its top K tokens per position.

    Args:
        student_logits: ``(N, V)`` logits of the student (any float dtype; computed in at least float32).
        topk_ids: ``(N, K)`` the teacher's K most likely token ids (distinct within a row).
        topk_logprobs: ``(N, K)`` the teacher's log-probabilities of those tokens, at temperature 1.
        tail_logprob: ``(N,)`` log of the teacher's mass outside the K tokens (``-inf`` when K = V); needed
            by ``tail="bucket"``.
        tail: ``"renormalize"`` (restrict both distributions to the K tokens) or ``"bucket"`` (K tokens
            plus one bucket for the rest, τ = 1 only).
        temperature: τ; the renormalised variant re-tempers the K log-probabilities (exact).
        scale_by_temperature_squared: Multiply by τ² as `kl_divergence` does.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the N positions.

    With K = V both variants equal ``kl_divergence`` (float noise aside).
    """
    _check_sparse_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, temperature)
    ids = topk_ids.long()
    # Only K columns of the student are read for the renormalised variant: its gradient is sparse over V.
    student_top = _upcast(student_logits.gather(-1, ids))
    teacher_top = _upcast(topk_logprobs)
    if tail == "renormalize":
        log_q = F.log_softmax(teacher_top / temperature, dim=-1)
        log_p = F.log_softmax(student_top / temperature, dim=-1)
        per_position = _kl_terms(log_q, log_p).sum(-1)
        if scale_by_temperature_squared:
            per_position = per_position * temperature**2
        return _reduce(per_position, reduction)
    full = _upcast(student_logits)
    normaliser = torch.logsumexp(full, dim=-1, keepdim=True)
    if ids.shape[1] < full.shape[1]:
        # logsumexp over the complement, not log1p(-Σ p): exact when the top K hold nearly all the mass.
        outside = full.scatter(-1, ids, float("-inf"))
        student_tail = torch.logsumexp(outside, dim=-1, keepdim=True) - normaliser
    else:  # K = V: no tail (kept out of the graph: the logsumexp of nothing has a NaN gradient)
        student_tail = full.new_full((full.shape[0], 1), float("-inf"))
    log_p = torch.cat([student_top - normaliser, student_tail], dim=-1)
    teacher = torch.cat([teacher_top, _upcast(tail_logprob).unsqueeze(-1).to(teacher_top)], dim=-1)
    # Renormalised over the K + 1 buckets: absorbs the rounding of half-precision stored log-probabilities.
    log_q = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    per_position = _kl_terms(log_q, log_p).sum(-1)
    return _reduce(per_position, reduction)


def aligned_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shift: bool,
    cached_columns_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions that count, as `aligned_logits` picks them: ``(N, V)`` student logits, ``(N, K)`` ids
    and log-probabilities and ``(N,)`` tail log-probabilities.

    Token-level targets ``(B, T', K)`` cached for another padding are cut or zero-padded to the student's
    length ``T``; sequence-level ``(B, V)`` logits pass through with ``(B, K)`` targets. With
    ``cached_columns_only`` (enough for ``tail="renormalize"``) the student's logits are gathered at the
    cached ids before the positions are picked, so no copy of the ``(N, V)`` logits is made: it returns
    ``(N, K)`` logits and ids ``0..K-1`` that index them.
    """
    device = student_logits.device
    topk_ids, topk_logprobs, tail_logprob = (t.to(device) for t in (topk_ids, topk_logprobs, tail_logprob))
    if student_logits.dim() == 2:
        return student_logits, topk_ids, topk_logprobs, tail_logprob
    length, current = student_logits.shape[1], topk_ids.shape[1]
    if current > length:
        topk_ids, topk_logprobs, tail_logprob = (
            topk_ids[:, :length],
            topk_logprobs[:, :length],
            tail_logprob[:, :length],
        )
    elif current < length:
        topk_ids = F.pad(topk_ids, [0, 0, 0, length - current])
        topk_logprobs = F.pad(topk_logprobs, [0, 0, 0, length - current])
        tail_logprob = F.pad(tail_logprob, [0, length - current])
    if shift:
        student_logits = student_logits[:, :-1]
        topk_ids, topk_logprobs, tail_logprob = topk_ids[:, :-1], topk_logprobs[:, :-1], tail_logprob[:, :-1]
    if cached_columns_only:
        student_logits = student_logits.gather(-1, topk_ids.long())
        topk_ids = torch.arange(topk_ids.shape[-1], device=device).expand_as(topk_ids)
    mask = token_mask(labels, attention_mask, shift)
    if mask is None:
        return (
            student_logits.flatten(0, 1),
            topk_ids.flatten(0, 1),
            topk_logprobs.flatten(0, 1),
            tail_logprob.flatten(0, 1),
        )
    return student_logits[mask], topk_ids[mask], topk_logprobs[mask], tail_logprob[mask]
