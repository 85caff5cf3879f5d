"""What LGTM records of each step: the per-sample influence record that callbacks read
(``trainer.latest_influence``), its summary in the training logs, and the callbacks bound to it.

`InfluenceRecordsMixin` goes before the trainer in `LGTMTrainer`'s bases; it reads the trainer's ``state``,
``args``, ``callback_handler`` and ``_record``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..callbacks import InfluenceLoggerCallback
from ..data.batch import DistillationBatch
from ..publishing.training_logs import summarize_influence


class InfluenceRecordsMixin:
    """The influence record of LGTM's steps and the logs and callbacks that report it."""

    #: The influence record of the last optimisation step (see `influence_record`); None before the first.
    latest_influence: dict[str, Any] | None = None

    def bind_callbacks(self) -> None:
        """Give this trainer to the `InfluenceLoggerCallback` s in ``callbacks=[...]`` that were built without
        ``trainer=``. Called at the end of ``__init__``; a callback added later with `add_callback` takes
        ``trainer=`` instead. A callback built with ``trainer=`` is left as it is."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, InfluenceLoggerCallback) and callback.trainer is None:
                callback.bind_trainer(self)

    def _store_influence(
        self,
        record: dict[str, Any] | None,
        soft_labels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Keep a step's influence record as ``latest_influence`` (the one place it is set), its teacher
        column from ``soft_labels``, the logits the student's real step learns from, once they are known."""
        if record is not None and soft_labels is not None:
            known = record["teacher_gold_prob"]
            new = gold_label_probability(soft_labels, labels)
            record = {**record, "teacher_gold_prob": new if known is None else torch.cat([known, new])}
        self.latest_influence = record

    def _record_sample_weights(self, sample_weights: torch.Tensor) -> None:
        self._record("sample_weight_max", sample_weights.max())
        self._record("sample_weight_frac_zero", (sample_weights == 0).float().mean())

    def _log_influence(self, weights: torch.Tensor, quiz_loss: torch.Tensor, scale: float | None) -> None:
        w = weights.detach().float()
        self._record("influence_mean", w.mean())
        self._record("influence_std", w.std() if w.numel() > 1 else torch.zeros(()))
        self._record("influence_min", w.min())
        self._record("influence_max", w.max())
        self._record("influence_frac_negative", (w < 0).float().mean())
        self._record("quiz_loss", quiz_loss)
        if scale is not None:  # the sample_weights form has no λ
            self._record("influence_scale", torch.tensor(float(scale)))

    def influence_record(
        self, weights: torch.Tensor, batch: DistillationBatch, student_logits: torch.Tensor
    ) -> dict[str, Any]:
        """The influence record of this step, as ``latest_influence`` holds it: ``step``, the batch's row ids
        (``idx``), the per-sample ``influence`` and each row's gold-label probability under the student's
        logits; ``teacher_gold_prob`` is None until the soft labels of the student's real step are known."""
        return {
            "step": self.state.global_step,
            "idx": batch.row_ids,
            "influence": weights.detach().float(),
            "student_gold_prob": gold_label_probability(student_logits, batch.labels),
            "teacher_gold_prob": None,
        }

    def _is_logging_step(self) -> bool:
        """Whether the step in progress ends with a training log: Trainer's own test (on
        ``state.logging_steps``, which a fractional ``logging_steps`` rounds up), one step ahead."""
        every = self.state.logging_steps
        return (
            bool(every)
            and self.args.logging_strategy == "steps"
            and (self.state.global_step + 1) % every == 0
        )

    def _card_influence_summary(self) -> dict[str, Any] | None:
        return summarize_influence(self.state.log_history)


def rows_without_teacher_prob(record: dict[str, Any]) -> bool:
    """Whether some rows of an influence record still lack their teacher's gold-label probability."""
    known = record["teacher_gold_prob"]
    return known is None or known.shape[0] < record["influence"].shape[0]


def gold_label_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's probability of its gold label (NaN for a row labelled -100, which has none)."""
    labelled = labels.ne(-100)
    probs = logits.detach().float().softmax(-1).gather(1, labels.clamp_min(0).view(-1, 1)).squeeze(1)
    return probs.masked_fill(~labelled, float("nan"))
