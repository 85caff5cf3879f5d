"""Callbacks that record what a learning teacher does, for trainers that expose per-sample influence.

`InfluenceLoggerCallback` writes the per-sample distillation-influence weights of `LGTMTrainer`
(https://hf-distill.readthedocs.io/algorithms/, "LGTM") to a JSON-lines file, and optionally a TensorBoard histogram per step.
`hf_distill.plotting` turns that file into figures. See https://hf-distill.readthedocs.io/callbacks/.

The trainer side of the contract (all this module relies on):

- ``trainer.latest_influence`` is set after every optimisation step's teacher update to
  ``{"step": int, "idx": LongTensor[B] | None, "influence": FloatTensor[B],
  "teacher_gold_prob": FloatTensor[B], "student_gold_prob": FloatTensor[B]}``;
- the callback is built with ``trainer=trainer``, or, given in ``callbacks=[...]`` without one, the trainer
  binds itself through ``callback.bind_trainer(trainer)`` at the end of its ``__init__``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

TENSORBOARD_TAG = "influence/weights"
DEFAULT_FILE_NAME = "influence.jsonl"


def _floats(values: Any, size: int, name: str) -> list[float | None]:
    """A length-`size` list of plain floats (None for missing or non-finite values), at float32 precision.

    Values are rounded to the shortest decimal that reads back as the same float32: the weights are
    computed in float32 anyway, and it keeps the file about half the size of float64 reprs. Non-finite
    values become JSON ``null`` so that the file stays strict JSON (``NaN`` is not JSON).
    """
    if values is None:
        return [None] * size
    array = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    if array.shape[0] != size:
        raise ValueError(
            f"trainer.latest_influence[{name!r}] has {array.shape[0]} values but the batch has {size} "
            "influence weights; the trainer must give one value per training sample."
        )
    # str(np.float32) is numpy's shortest round-trip representation for float32.
    return [float(str(v)) if math.isfinite(v) else None for v in array]


def _record_step(line: str) -> int | None:
    """The ``step`` of one JSONL line, or None when the line is not a complete record (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class InfluenceLoggerCallback(TrainerCallback):
    """Append each step's per-sample influence weights to a JSON-lines file (and TensorBoard).

    Args:
        output_file: where to write; default ``<args.output_dir>/influence.jsonl``.
        sample_ids: dataset row ids to record (the trainer's ``idx``); None records every sample.
            Recording a few hundred chosen samples keeps the file small on long runs.
        every_n_steps: record the steps whose (0-based) ``step`` is a multiple of this; the first step is
            always recorded.
        max_file_bytes: stop writing once the file would grow past this many bytes (one warning is
            logged; training goes on). None removes the bound.
        tensorboard_histograms: when ``"tensorboard"`` is in ``args.report_to``, also write a histogram of
            each recorded step's weights (the whole batch, not only ``sample_ids``) under
            ``influence/weights``.
        tensorboard_log_dir: where the histograms go; default the trainer's TensorBoard run directory, so
            they sit beside its scalars.
        trainer: the trainer whose ``latest_influence`` is read after every step, as TRL's callbacks take
            it: ``trainer.add_callback(InfluenceLoggerCallback(trainer=trainer))``. Left out, an
            `LGTMTrainer` given the callback in ``callbacks=[...]`` binds itself to it when it is built.

    Only the world process zero writes.
    """

    def __init__(
        self,
        output_file: str | os.PathLike[str] | None = None,
        sample_ids: Iterable[int] | None = None,
        every_n_steps: int = 1,
        max_file_bytes: int | None = 64 * 2**20,
        tensorboard_histograms: bool = True,
        tensorboard_log_dir: str | os.PathLike[str] | None = None,
        *,
        trainer: Any = None,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_file_bytes is not None and int(max_file_bytes) <= 0:
            raise ValueError(f"max_file_bytes must be positive (or None for no bound), got {max_file_bytes}")
        self.output_file = os.fspath(output_file) if output_file is not None else None
        self.sample_ids = None if sample_ids is None else frozenset(int(i) for i in sample_ids)
        self.every_n_steps = int(every_n_steps)
        self.max_file_bytes = None if max_file_bytes is None else int(max_file_bytes)
        self.tensorboard_histograms = tensorboard_histograms
        self.tensorboard_log_dir = os.fspath(tensorboard_log_dir) if tensorboard_log_dir is not None else None

        self._trainer_ref: Callable[[], Any] | None = None
        self._path: str | None = None
        self._file: Any = None
        self._size = 0
        self._full = False  # the size bound was reached: write nothing more this run
        self._disabled = False  # an I/O error: write nothing more this run
        self._last_seen_step: int | None = None
        self._warned: set[str] = set()
        self._summary_writer_cls: Any = None
        self._tb_writer: Any = None
        if trainer is not None:
            self.bind_trainer(trainer)

    # ----- wiring -------------------------------------------------------------------------------------------

    def bind_trainer(self, trainer: Any) -> None:
        """Remember the trainer whose ``latest_influence`` is read after every step (what ``trainer=`` does;
        `LGTMTrainer.bind_callbacks` calls it for a callback given without one)."""
        # A weak reference: the trainer holds this callback, so a strong one would make a reference cycle
        # that keeps both models alive until the cyclic garbage collector happens to run.
        try:
            self._trainer_ref = weakref.ref(trainer)
        except TypeError:  # objects without __weakref__ (e.g. SimpleNamespace)
            self._trainer_ref = lambda: trainer

    @property
    def trainer(self) -> Any:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def resolve_output_file(self, args: TrainingArguments) -> str:
        if self.output_file is not None:
            return self.output_file
        return os.path.join(args.output_dir, DEFAULT_FILE_NAME)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ----- events -------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Each train() call is a run of its own: a previous run's bound or error does not carry over.
        self._close()
        self._full = False
        self._disabled = False
        self._last_seen_step = None
        self._warned.clear()
        if not state.is_world_process_zero:
            return
        if self._wants_histograms(args):
            # Fail before any compute is spent rather than at the first step (transformers' own
            # TensorBoardCallback needs the same package).
            self._summary_writer_cls = _import_summary_writer()
        self._path = self.resolve_output_file(args)
        try:
            self._drop_records_from(self._path, state.global_step)
        except OSError as error:
            self._disabled = True
            logger.warning(
                "InfluenceLoggerCallback: could not prepare %s (%s); influence logging is off for this run, "
                "training continues.",
                self._path,
                error,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        trainer = self.trainer
        latest = getattr(trainer, "latest_influence", None) if trainer is not None else None
        if latest is None:
            if trainer is None:
                self._warn_once(
                    "unbound",
                    "InfluenceLoggerCallback is not bound to a trainer, so it records nothing: build it with "
                    "InfluenceLoggerCallback(trainer=trainer), or pass it to an LGTMTrainer through callbacks=[...].",
                )
            elif not hasattr(trainer, "latest_influence"):
                self._warn_once(
                    "no-influence",
                    f"InfluenceLoggerCallback: {type(trainer).__name__} exposes no latest_influence (only "
                    "LGTMTrainer computes per-sample influence weights); nothing is recorded.",
                )
            return
        step = int(latest["step"])
        # A trainer that skipped its teacher update leaves the previous step's weights in place; they were
        # already handled, so do not record them twice.
        if self._last_seen_step is not None and step <= self._last_seen_step:
            return
        self._last_seen_step = step
        if step % self.every_n_steps != 0:
            return

        influence = torch.as_tensor(latest["influence"]).detach().float().reshape(-1)
        if self._wants_histograms(args):
            self._write_histogram(args, influence, step)
        if self._full or self._disabled:
            return
        lines = self._lines(latest, influence, step)
        if lines:
            self._append("".join(lines), args)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close()

    # ----- JSONL --------------------------------------------------------------------------------------------

    def _lines(self, latest: dict[str, Any], influence: torch.Tensor, step: int) -> list[str]:
        size = influence.numel()
        raw_idx = latest.get("idx")
        if raw_idx is None:
            if self.sample_ids is not None:
                self._warn_once(
                    "no-idx",
                    "InfluenceLoggerCallback: the training batches carry no row ids (latest_influence['idx'] is "
                    "None), so sample_ids cannot select samples and nothing is recorded; add an integer 'idx' "
                    "column to the training dataset.",
                )
                return []
            ids: list[int | None] = [None] * size
        else:
            ids = [int(i) for i in torch.as_tensor(raw_idx).detach().cpu().reshape(-1).tolist()]
            if len(ids) != size:
                raise ValueError(
                    f"trainer.latest_influence['idx'] has {len(ids)} row ids but the batch has {size} "
                    "influence weights."
                )
        keep = [j for j, i in enumerate(ids) if self.sample_ids is None or i in self.sample_ids]
        if not keep:
            return []
        weights = _floats(influence, size, "influence")
        teacher = _floats(latest.get("teacher_gold_prob"), size, "teacher_gold_prob")
        student = _floats(latest.get("student_gold_prob"), size, "student_gold_prob")
        return [
            json.dumps(
                {
                    "step": step,
                    "idx": ids[j],
                    "influence": weights[j],
                    "teacher_gold_prob": teacher[j],
                    "student_gold_prob": student[j],
                },
                separators=(",", ":"),
            )
            + "\n"
            for j in keep
        ]

    def _append(self, text: str, args: TrainingArguments) -> None:
        data = text.encode("utf-8")
        try:
            if self._file is None:
                self._open(args)
            if self.max_file_bytes is not None and self._size + len(data) > self.max_file_bytes:
                # Whole steps only: a step is written completely or not at all, so the file never ends
                # with a partial step that a reader would mistake for a small batch.
                self._full = True
                logger.warning(
                    "InfluenceLoggerCallback: %s reached its size bound of %d bytes (max_file_bytes); no "
                    "further influence records are written in this run, training continues. Raise "
                    "max_file_bytes (None removes the bound), record fewer samples with sample_ids, or record "
                    "less often with every_n_steps.",
                    self._path,
                    self.max_file_bytes,
                )
                self._close_file()
                return
            self._file.write(data)
            # One flush per step: a crash loses at most the step being written. (No fsync: that would cost
            # a disk round trip per step, and the records only need to survive the process, not the OS.)
            self._file.flush()
            self._size += len(data)
        except OSError as error:
            # Diagnostics must never stop a long training run (a full disk, a vanished mount...).
            self._disabled = True
            logger.warning(
                "InfluenceLoggerCallback: could not write %s (%s); influence logging is off for the rest of "
                "this run, training continues.",
                self._path,
                error,
            )
            self._close_file()

    def _open(self, args: TrainingArguments) -> None:
        if self._path is None:  # on_train_begin was not called (a callback driven by hand)
            self._path = self.resolve_output_file(args)
        folder = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(folder, exist_ok=True)
        # Append: on a resumed run on_train_begin has already removed the steps that are redone.
        # Kept open across steps (closed at train end) rather than reopened per step.
        self._file = open(self._path, "ab")
        self._size = self._file.tell()

    def _drop_records_from(self, path: str, first_step: int) -> None:
        """Remove records with ``step >= first_step`` (and any partial line) so a resumed run has no duplicates.

        A run resumed from checkpoint-N redoes steps N, N+1, ... that the interrupted run may already have
        recorded. A fresh run (first_step 0) therefore starts an empty file. Rewritten once, through a
        temporary file and a rename, so an interruption here never leaves a half-written log.
        """
        if not os.path.exists(path):
            return
        if first_step <= 0:
            if os.path.getsize(path) > 0:
                logger.info("InfluenceLoggerCallback: a new run starts at step 0; emptying %s", path)
            open(path, "wb").close()
            return
        kept: list[bytes] = []
        dropped = 0
        with open(path, "rb") as source:
            for line in source:
                step = _record_step(line.decode("utf-8", errors="replace"))
                if step is not None and step < first_step and line.endswith(b"\n"):
                    kept.append(line)
                else:
                    dropped += 1
        if dropped == 0:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as target:
            target.writelines(kept)
        os.replace(tmp, path)
        logger.info(
            "InfluenceLoggerCallback: resuming at step %d; removed %d records of steps >= %d from %s",
            first_step,
            dropped,
            first_step,
            path,
        )

    # ----- TensorBoard --------------------------------------------------------------------------------------

    def _wants_histograms(self, args: TrainingArguments) -> bool:
        report_to = args.report_to
        if isinstance(report_to, str):
            report_to = [report_to]
        return self.tensorboard_histograms and "tensorboard" in (report_to or [])

    def _tensorboard_dir(self, args: TrainingArguments) -> str:
        if self.tensorboard_log_dir is not None:
            return self.tensorboard_log_dir
        # Beside the trainer's own scalars: TensorBoard merges the event files of one directory into one run.
        trainer = self.trainer
        handler = getattr(trainer, "callback_handler", None)
        for callback in getattr(handler, "callbacks", []):
            log_dir = getattr(callback, "logging_dir", None)
            if type(callback).__name__ == "TensorBoardCallback" and log_dir:
                return log_dir
        # transformers < 5 had args.logging_dir; 5.x reads TENSORBOARD_LOGGING_DIR.
        log_dir = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
        if log_dir:
            return os.path.expanduser(log_dir)
        return os.path.join(args.output_dir, "runs", "influence")

    def _write_histogram(self, args: TrainingArguments, influence: torch.Tensor, step: int) -> None:
        finite = influence[torch.isfinite(influence)].cpu()
        if finite.numel() == 0:
            return
        try:
            if self._tb_writer is None:
                if self._summary_writer_cls is None:
                    self._summary_writer_cls = _import_summary_writer()
                self._tb_writer = self._summary_writer_cls(log_dir=self._tensorboard_dir(args))
            self._tb_writer.add_histogram(
                TENSORBOARD_TAG, finite.numpy().astype(np.float32), global_step=step
            )
            self._tb_writer.flush()
        except OSError as error:
            self.tensorboard_histograms = False
            self._close_writer()
            logger.warning(
                "InfluenceLoggerCallback: could not write the TensorBoard histogram (%s); histograms are off.",
                error,
            )

    # ----- closing ------------------------------------------------------------------------------------------

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _close_writer(self) -> None:
        if self._tb_writer is not None:
            try:
                self._tb_writer.close()
            except OSError:
                pass
            self._tb_writer = None

    def _close(self) -> None:
        self._close_file()
        self._close_writer()


def _import_summary_writer() -> Any:
    """torch's SummaryWriter (or tensorboardX's, as transformers falls back to), imported only when used."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "InfluenceLoggerCallback writes TensorBoard histograms because 'tensorboard' is in "
                "args.report_to, and that needs TensorBoard: pip install tensorboard "
                "(or pip install 'hf-distill[tensorboard]'), or pass tensorboard_histograms=False."
            ) from None
    return SummaryWriter
