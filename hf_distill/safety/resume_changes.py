"""Resuming with changed arguments: what changes is applied or said, never silently dropped.

A checkpoint's optimizer and schedule carry the learning rate and weight decay they were written with, so
`Trainer` resumes with those even when the arguments now say otherwise (the usual move after a loss
spike is to lower the learning rate and resume). The trainers record their arguments in each checkpoint
(``distillation_args.json``, secrets redacted); at resume, a changed learning rate or weight decay is
applied to the restored optimizer and schedule (for the student and for a learning teacher), and every
other changed argument is named in a warning, since temperature, alpha or the influence settings change
what the resumed steps optimise.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ARGUMENTS_FILE = "distillation_args.json"
# Applied to the restored optimizers (student, teacher) rather than only warned about.
APPLIED = ("learning_rate", "weight_decay", "teacher_learning_rate", "teacher_weight_decay")
# Where the run writes or how it is named: expected to differ between a run and its resume.
NOT_COMPARED = frozenset(
    {"output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir"}
)


def save_arguments(folder: str | os.PathLike, arguments: Mapping[str, Any]) -> None:
    """Write ``arguments`` (``args.to_dict()``, secrets already redacted) into a checkpoint folder."""
    with open(Path(folder) / ARGUMENTS_FILE, "w", encoding="utf-8") as handle:
        json.dump(dict(arguments), handle, indent=1, sort_keys=True, default=str)


def read_saved_arguments(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The arguments a checkpoint was written with, or None for a checkpoint without them."""
    path = Path(folder) / ARGUMENTS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def changed_arguments(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, now)}`` for every argument whose value differs (paths and run names excepted)."""
    changes = {}
    for name in sorted(set(saved) | set(current)):
        if name in NOT_COMPARED:
            continue
        before, now = _comparable(saved.get(name)), _comparable(current.get(name))
        if before != now:
            changes[name] = (before, now)
    return changes


def warn_changed_arguments(folder: str | os.PathLike, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """One warning naming every changed argument that is not applied to the optimizers."""
    other = {name: values for name, values in changes.items() if name not in APPLIED}
    if other:
        listing = "; ".join(f"{name}: {before!r} -> {now!r}" for name, (before, now) in other.items())
        logger.warning(
            "Resuming from %s with arguments that differ from the ones it was written with: %s. The resumed "
            "steps use the new values.",
            folder,
            listing,
        )


def apply_new_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    learning_rate: tuple[float, float],
    weight_decay: tuple[float, float],
    decay_parameters: Iterable[torch.nn.Parameter],
    role: str = "student",
) -> list[str]:
    """Give a restored optimizer and schedule the new peak learning rate and weight decay; returns what changed.

    The schedule keeps its position: every learning rate it holds (the groups' current and initial ones,
    its base rates) is scaled by ``new / saved``, so a linear decay continues from the same step towards
    zero from the new peak. The new weight decay goes to the groups of ``decay_parameters`` (biases and norms
    keep none).
    """
    applied = []
    (lr_before, lr_now), (wd_before, wd_now) = learning_rate, weight_decay
    if not math.isclose(lr_before, lr_now, rel_tol=1e-12, abs_tol=0.0):
        if lr_before <= 0:
            raise ValueError(
                f"The checkpoint's {role} learning rate is {lr_before}, so its schedule cannot be rescaled to "
                f"{lr_now}; resume with the same learning rate, or start a new run."
            )
        factor = lr_now / lr_before
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        applied.append(f"{role} learning rate {lr_before:g} -> {lr_now:g}")
    if not math.isclose(wd_before, wd_now, rel_tol=1e-12, abs_tol=0.0):
        decay_parameters = list(decay_parameters)
        if hasattr(optimizer, "float32_weights"):  # fp32 master weights: the groups hold the float32 copies
            decay_parameters += optimizer.float32_weights(decay_parameters)
        decaying = {id(p) for p in decay_parameters}
        groups = [g for g in optimizer.param_groups if any(id(p) in decaying for p in g["params"])]
        if not groups:  # flattened or partitioned parameters (DeepSpeed, FSDP1): the groups cannot be told
            raise ValueError(
                f"Resuming with a new {role} weight decay ({wd_before:g} -> {wd_now:g}) cannot be applied to this "
                "optimizer's restored groups; resume with the checkpoint's value, or start a new run."
            )
        for group in groups:
            group["weight_decay"] = wd_now
        applied.append(f"{role} weight decay {wd_before:g} -> {wd_now:g}")
    return applied


def resume_with_changed_arguments(
    folder: str | os.PathLike,
    current: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    decay_parameters: Iterable[torch.nn.Parameter],
    role: str = "student",
) -> list[str]:
    """After ``optimizer`` and ``scheduler`` were restored from ``folder``: apply the ``role``'s changed
    learning rate and weight decay (the teacher's are ``teacher_learning_rate``/``teacher_weight_decay``),
    and, for the student, name every other changed argument. Returns what was applied."""
    saved = read_saved_arguments(folder)
    if saved is None:  # a checkpoint written before arguments were recorded
        return []
    prefix = "" if role == "student" else f"{role}_"
    if role == "student":
        warn_changed_arguments(folder, changed_arguments(saved, current))
    lr, wd = f"{prefix}learning_rate", f"{prefix}weight_decay"
    if lr not in saved or wd not in saved:
        return []
    applied = apply_new_hyperparameters(
        optimizer,
        getattr(scheduler, "scheduler", scheduler),  # accelerate's wrapper holds the schedule
        (float(saved[lr]), float(current[lr])),
        (float(saved[wd]), float(current[wd])),
        decay_parameters,
        role,
    )
    if applied:
        logger.warning(
            "Resuming from %s: %s, applied to the restored optimizer and schedule (which keep their position).",
            folder,
            "; ".join(applied),
        )
    return applied
