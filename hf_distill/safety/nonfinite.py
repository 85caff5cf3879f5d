"""Non-finite values (NaN, ±inf): found during the step, acted on once per optimisation step.

`NonFiniteMonitor.watch` adds one reduction per watched quantity (a float32 sum, which is NaN when any
element is NaN and ±inf when any is infinite) to a running total that stays on the device: no host
synchronisation per micro-batch. The decision (`NonFiniteMonitor.should_skip`) reads every total in one
transfer, at most twice per optimisation step (before the teacher's optimizer step and before the student's),
where `Trainer` synchronises anyway to log the loss and the gradient norm.

Policy ``"error"`` stops with an error that names the step, the quantity and the first non-finite weight of
the model that produced it; ``"skip"`` skips both models' updates for that step and counts it, and stops
after ``max_consecutive_skips`` skipped steps in a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or infinite value reached a loss, logits, a gradient or model weights."""


def describe_value(total: float) -> str:
    """``"NaN"`` or ``"infinite"`` for the sum of a tensor that is not finite."""
    return "NaN" if math.isnan(total) else "infinite"


def first_nonfinite_parameter(model: nn.Module) -> tuple[str, str] | None:
    """(name, ``"NaN"``/``"infinite"``) of the first parameter holding a non-finite value, or None."""
    return first_nonfinite_tensor(model.named_parameters())


def first_nonfinite_tensor(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """(name, ``"NaN"``/``"infinite"``) of the first tensor holding a non-finite value, or None.

    One reduction per tensor, stacked, and a single transfer when every value is finite. A tensor FSDP2
    shards is reduced over all its shards (a collective: every rank calls this).
    """
    named = [(n, t) for n, t in named if t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([_whole(torch.isfinite(t.detach()).all()) for _, t in named]).cpu()
    if bool(finite.all()):
        return None
    name, tensor = named[int((~finite).nonzero()[0])]
    return name, "NaN" if bool(_whole(torch.isnan(tensor.detach()).any())) else "infinite"


def _whole(flag: torch.Tensor) -> torch.Tensor:
    """A reduction over a sharded (FSDP2) weight as a plain tensor, over all its shards (a collective)."""
    from torch.distributed.tensor import DTensor

    return flag.full_tensor() if isinstance(flag, DTensor) else flag


def check_finite_weights(model: nn.Module, role: str, action: str) -> None:
    """Raise `NonFiniteError` if ``model`` holds a non-finite weight; ``action`` says what is refused."""
    check_finite_tensors(model.named_parameters(), role, action)


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], role: str, action: str) -> None:
    """Raise `NonFiniteError` if a weight of ``named`` (e.g. a gathered state dict's items) is non-finite."""
    found = first_nonfinite_tensor(named)
    if found is not None:
        name, kind = found
        raise NonFiniteError(
            f"Refusing to {action}: the {role}'s weights hold {kind} values (first in {name}). A model with "
            "non-finite weights predicts nothing; load a healthy checkpoint, and if it came from training, "
            "lower the learning rate or use nonfinite='skip'."
        )


class NonFiniteMonitor:
    """Running non-finite checks of one optimisation step, and the policy applied to them.

    ``models`` maps each owner role (``"student"``, ``"teacher"``) to the models whose weights an error names.
    """

    def __init__(self, policy: str = "error", max_consecutive_skips: int = 5) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={policy!r} is unknown; choose one of {NONFINITE_POLICIES}.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.models: dict[str, Sequence[nn.Module]] = {}
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._totals: dict[str, torch.Tensor] = {}
        self._owners: dict[str, str] = {}
        self._step_skipped = False
        self._updated: list[str] = []  # models already updated in this step (a learning teacher steps first)
        self._undo: list[Callable[[], None]] = []  # how to take those updates back if the step is skipped

    def watch(self, quantity: str, value: torch.Tensor, owner: str) -> None:
        """Add ``value``'s finiteness to this step's record of ``quantity`` (no host synchronisation)."""
        total = value.detach().sum(dtype=torch.float32)
        previous = self._totals.get(quantity)
        self._totals[quantity] = total if previous is None else previous + total
        self._owners[quantity] = owner

    def watch_all(self, quantity: str, values: Iterable[torch.Tensor], owner: str) -> None:
        """`watch` for a list of tensors (a gradient), as one quantity."""
        sums = [v.detach().sum(dtype=torch.float32) for v in values]
        if sums:
            self.watch(quantity, torch.stack(sums), owner)

    def bad_quantities(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[tuple[str, str, str]]:
        """(quantity, ``"NaN"``/``"infinite"``, owner) of every quantity not finite so far in this step, in
        the order they were first watched. One transfer to the host; ``reduce`` combines the totals across
        processes first (any process's NaN makes the total NaN), so every process takes the same decision."""
        if not self._totals:
            return []
        totals = torch.stack([t.to(next(iter(self._totals.values())).device) for t in self._totals.values()])
        if reduce is not None:
            totals = reduce(totals)
        values = totals.tolist()
        return [
            (name, describe_value(v), self._owners[name])
            for name, v in zip(self._totals, values, strict=True)
            if not math.isfinite(v)
        ]

    def should_skip(self, step: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Whether the updates of optimisation step ``step`` must be skipped; raises `NonFiniteError` under the
        ``"error"`` policy, or after ``max_consecutive_skips`` skipped steps in a row."""
        bad = self.bad_quantities(reduce)
        if not bad:
            return self._step_skipped
        if self.policy == "error":
            raise NonFiniteError(self._message(bad, step) + self._fix())
        if not self._step_skipped:
            self._step_skipped = True
            self.skipped_steps += 1
            self.consecutive_skips += 1
            for undo in reversed(self._undo):  # updates made earlier in this step
                undo()
            self._undo.clear()
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} optimisation steps in a row had non-finite values "
                f"(max_consecutive_nonfinite_skips={self.max_consecutive_skips}); the latest: "
                + self._message(bad, step)
                + " Training cannot recover by skipping: lower the learning rate, check the data, or load a "
                "healthy checkpoint."
            )
        return True

    def mark_updated(self, role: str, undo: Callable[[], None] | None = None) -> None:
        """Record that ``role``'s weights were updated in this step, so an error later in it says so; ``undo``
        takes the update back if the step is skipped (``"skip"`` leaves every model as it was)."""
        self._updated.append(role)
        if undo is not None:
            self._undo.append(undo)

    def end_step(self) -> None:
        """Forget this step's records (after the student's optimizer step)."""
        if not self._step_skipped:
            self.consecutive_skips = 0
        self._totals.clear()
        self._owners.clear()
        self._step_skipped = False
        self._updated.clear()
        self._undo.clear()

    def log_values(self) -> dict[str, int]:
        """What the training logs get: the number of skipped steps so far, under the ``"skip"`` policy."""
        return {"nonfinite_skipped_steps": self.skipped_steps} if self.policy == "skip" else {}

    def _message(self, bad: list[tuple[str, str, str]], step: int) -> str:
        quantity, kind, owner = bad[0]
        text = f"The {quantity} {'are' if quantity.endswith(('logits', 'weights')) else 'is'} {kind} at optimisation step {step}"
        if len(bad) > 1:
            text += f" (also not finite: {', '.join(q for q, _, _ in bad[1:])})"
        weights = None
        for model in self.models.get(owner, ()):
            weights = first_nonfinite_parameter(model)
            if weights is not None:
                break
        if weights is not None:
            text += f"; the {owner}'s weights hold {weights[1]} values, first in {weights[0]}."
        else:
            text += (
                f"; the {owner}'s weights are all finite, so this step overflowed (a learning rate or loss too "
                "large for the precision, or extreme inputs)."
            )
        return text

    def _fix(self) -> str:
        if self._updated:
            done = " and ".join(dict.fromkeys(self._updated))
            updated = f" The {done} was updated earlier in this step (before the value went non-finite); nothing else was."
        else:
            updated = " Nothing was updated at this step."
        return updated + (
            " Lower the learning rate (or the teacher's), check the data, or set nonfinite='skip' to skip such "
            "steps (at most max_consecutive_nonfinite_skips in a row)."
        )


class NonFiniteCallback(TrainerCallback):
    """Applies the monitor's decision before the student's optimizer step: under ``"skip"`` it clears every
    gradient the optimizer would use, so the step changes nothing (AdamW skips parameters without one)."""

    def __init__(
        self, monitor: NonFiniteMonitor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ):
        self.monitor = monitor
        self.reduce = reduce

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ):
        try:
            if self.monitor.should_skip(state.global_step + 1, self.reduce) and optimizer is not None:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
        finally:
            self.monitor.end_step()
        return control
