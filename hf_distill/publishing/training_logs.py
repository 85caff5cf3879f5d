"""What a model card reads from `Trainer.state.log_history`: the final evaluation metrics (the teacher's
apart), a classifier that collapsed to one class, and the summary of LGTM's influence logs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Evaluation entries that describe the run, not the model.
_RUN_STATS = {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch", "step"}
# The evaluation entry (``eval_collapsed_to_class``, ``eval_teacher_collapsed_to_class``) that names the one
# class a classifier predicted on every row; the card turns it into a warning, not a metric.
COLLAPSED_METRIC = "collapsed_to_class"


def final_eval_metrics(
    log_history: Iterable[Mapping[str, Any]], prefix: str = "eval", up_to_step: int | None = None
) -> tuple[dict[str, float], dict[str, float], int | None]:
    """(student metrics, teacher metrics, step) of the latest evaluation in ``log_history``.

    Student metrics are the ``<prefix>_*`` entries, teacher metrics the ``<prefix>_teacher_*`` ones (the
    online trainers log them right after the student's); both lose their prefix. Run statistics
    (runtime, samples per second, epoch) are left out; a metric missing from the latest evaluation keeps
    its latest value. ``up_to_step`` ignores entries logged after that step (the best checkpoint's step,
    when the best model was loaded at the end of training).
    """
    student: dict[str, float] = {}
    teacher: dict[str, float] = {}
    step = None
    teacher_prefix = f"{prefix}_teacher_"
    for entry in log_history:
        if up_to_step is not None and entry.get("step", 0) > up_to_step:
            continue
        for key, value in entry.items():
            if not key.startswith(f"{prefix}_") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            if key.startswith(teacher_prefix):
                name, target = key[len(teacher_prefix) :], teacher
            else:
                name, target = key[len(prefix) + 1 :], student
                step = entry.get("step", step)
            if name not in _RUN_STATS and name != COLLAPSED_METRIC:
                target[name] = float(value)
    return student, teacher, step


def final_collapsed_classes(
    log_history: Iterable[Mapping[str, Any]], prefix: str = "eval", up_to_step: int | None = None
) -> tuple[int | None, int | None]:
    """(student, teacher): the class each predicted on every row of its latest evaluation, or None.

    Read from the ``<prefix>_collapsed_to_class`` and ``<prefix>_teacher_collapsed_to_class`` entries the
    trainers log with an evaluation whose predictions all fell in one class; an evaluation without that
    entry (the model predicted several classes) clears an earlier one. ``up_to_step`` as in
    `final_eval_metrics`.
    """
    classes: dict[str, int | None] = {"student": None, "teacher": None}
    teacher_prefix = f"{prefix}_teacher_"
    for entry in log_history:
        if up_to_step is not None and entry.get("step", 0) > up_to_step:
            continue
        keys = [k for k in entry if k.startswith(f"{prefix}_")]
        for model, own_prefix, own in (
            ("teacher", teacher_prefix, [k for k in keys if k.startswith(teacher_prefix)]),
            ("student", f"{prefix}_", [k for k in keys if not k.startswith(teacher_prefix)]),
        ):
            if own:  # this entry is an evaluation of that model: its latest
                value = entry.get(f"{own_prefix}{COLLAPSED_METRIC}")
                classes[model] = int(value) if isinstance(value, (int, float)) else None
    return classes["student"], classes["teacher"]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.fmean(values) if values else None


def summarize_influence(log_history: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Summary of LGTM's influence metrics over training, from the logged ``influence_*`` values.

    Returns None when nothing was logged. Otherwise: the number of training logs that carry them and the
    optimisation steps those logs cover, the mean fraction of negative weights and the mean weight over
    all of them, over the first third and over the last third of them, and (when logged) the median ratio
    of the influence part of the teacher's gradient norm to the auxiliary part.

    Steps are numbered as `InfluenceLoggerCallback`'s file numbers them: from 0, each step by
    ``trainer.state.global_step`` before it. A training log's ``step`` is ``global_step`` after the steps
    it averages, so the log at step 8 with ``logging_steps=1`` covers step 7, and ``first_step`` is the
    step after the training log before the first one (0 in a fresh run).
    """
    history = list(log_history)
    positions = [n for n, e in enumerate(history) if "influence_frac_negative" in e]
    if not positions:
        return None
    rows = [history[n] for n in positions]
    third = max(1, len(rows) // 3)
    early, late = rows[:third], rows[-third:]
    summary: dict[str, Any] = {
        "logged_steps": len(rows),
        "first_step": _steps_before(history[: positions[0]]),
        "last_step": rows[-1]["step"] - 1 if isinstance(rows[-1].get("step"), int) else None,
        "frac_negative": _mean(rows, "influence_frac_negative"),
        "frac_negative_early": _mean(early, "influence_frac_negative"),
        "frac_negative_late": _mean(late, "influence_frac_negative"),
        "influence_mean": _mean(rows, "influence_mean"),
        "influence_mean_early": _mean(early, "influence_mean"),
        "influence_mean_late": _mean(late, "influence_mean"),
    }
    ratios = [
        r["teacher_grad_norm_influence"] / r["teacher_grad_norm_aux"]
        for r in rows
        if r.get("teacher_grad_norm_aux") and "teacher_grad_norm_influence" in r
    ]
    summary["grad_norm_ratio"] = statistics.median(ratios) if ratios else None
    return summary


def _steps_before(history: Sequence[Mapping[str, Any]]) -> int:
    """The number of optimisation steps done before the training logs that follow ``history``."""
    steps = [e["step"] for e in history if "loss" in e and isinstance(e.get("step"), int)]
    return steps[-1] if steps else 0
