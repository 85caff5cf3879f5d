"""Checks of the training, evaluation and quiz data against the models, made when a trainer is built.

`TrainingDataChecksMixin` goes before `transformers.Trainer` in a trainer's bases (it reads the trainer's
models, tokenizers and arguments): a teacher with another vocabulary needs its own inputs, labels of the
wrong kind or range, rows too long for a model, and a training set smaller than one dropped batch are
refused before any training work.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..data.batch import TEACHER_LOGITS, TEACHER_PREFIX, dataset_columns
from ..data.dataset_checks import check_input_lengths_for, check_labels_for, evaluation_sets
from ..data.label_checks import LABEL_COLUMNS, check_not_empty
from ..distributed import unwrap_model
from ..teacher.loading import SEQUENCE_CLASSIFICATION
from .topk_targets import TEACHER_TOPK_COLUMNS, check_topk_training


class TrainingDataChecksMixin:
    """The data checks of `DistillationTrainer` (and every trainer built on it)."""

    def _teachers_need_own_inputs(self) -> list[int]:
        """Positions of teachers whose vocabulary differs from the student's."""
        student_config = getattr(unwrap_model(self.model), "config", None)
        student_vocab = getattr(student_config, "vocab_size", None)
        differing = []
        for position, teacher in enumerate(self.teacher_models):
            teacher_vocab = getattr(getattr(unwrap_model(teacher), "config", None), "vocab_size", None)
            if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
                differing.append(position)
        if (
            not differing
            and isinstance(self.teacher_processing_class, PreTrainedTokenizerBase)
            and isinstance(self.processing_class, PreTrainedTokenizerBase)
            and self.teacher_processing_class.get_vocab() != self.processing_class.get_vocab()
        ):
            differing = list(range(len(self.teacher_models)))
        return differing

    def _check_teacher_inputs(self, dataset: Any) -> None:
        columns = dataset_columns(dataset)
        check_topk_training(self, dataset)
        if not columns or TEACHER_LOGITS in columns or TEACHER_TOPK_COLUMNS[0] in columns:
            return
        has_teacher_inputs = any(c.startswith(TEACHER_PREFIX) for c in columns)
        if has_teacher_inputs and self._token_level:
            raise ValueError(
                "teacher_ input columns (a teacher with its own tokenizer) cannot be used for token-level tasks: "
                "the two tokenisations do not align position by position. Use a teacher that shares the "
                "student's tokenizer."
            )
        differing = self._teachers_need_own_inputs()
        if differing and not has_teacher_inputs:
            raise ValueError(
                f"Teacher(s) {differing} and the student have different vocabularies, and the training data has "
                "no teacher_ input columns, so the teacher would read the student's token ids as its own. "
                "Tokenise the text for the teacher with hf_distill.add_teacher_inputs(dataset, teacher_tokenizer, "
                "text_columns) and pass teacher_processing_class=teacher_tokenizer, or cache the teacher's logits "
                "with hf_distill.cache_teacher_logits."
            )

    def _check_labels(self, dataset: Any) -> None:
        check_not_empty(dataset, "training set (train_dataset)", "Pass a dataset with rows.")
        for data, description in [(dataset, "training"), *evaluation_sets(self.eval_dataset)]:
            self.check_dataset(data, description)
        columns = dataset_columns(dataset)
        if not columns or self.args.alpha == 1.0 or self._student_task not in (SEQUENCE_CLASSIFICATION, None):
            return  # language-model labels are often made by the collator: checked per batch instead
        if not any(c in columns for c in (*LABEL_COLUMNS, *self.label_names)):
            raise ValueError(
                f"The training data has no label column (looked for {LABEL_COLUMNS}), but alpha={self.args.alpha} "
                "gives the task loss a weight of 1 - alpha. Add a 'label' column, or set alpha=1.0 to distil "
                "from the teacher alone."
            )

    def _check_a_batch_fits(self, dataset: Any) -> None:
        """With ``dataloader_drop_last``, a training set smaller than one batch gives no step at all (and
        Trainer's error about ``max_steps``): refused by what is wrong."""
        if not self.args.dataloader_drop_last or not isinstance(dataset, Sized):
            return
        processes = max(1, self.args.world_size)
        batch = self.args.per_device_train_batch_size * processes
        if len(dataset) < batch:
            raise ValueError(
                f"The training set has {len(dataset)} rows, fewer than one batch ({self.args.per_device_train_batch_size}"
                f" rows per device × {processes} process(es) = {batch}), and dataloader_drop_last=True drops an "
                "incomplete batch, so no step would run. Lower per_device_train_batch_size, or set "
                "dataloader_drop_last=False."
            )

    def check_dataset(self, dataset: Any, description: str) -> None:
        """Refuse, before training, data the models cannot read: labels of the wrong kind or out of range for
        the student's head, rows longer than a model's position limit. Every dataset the trainer reads
        (training, evaluation, quiz) goes through it."""
        check_labels_for(self.model, dataset, description, self.label_names)
        check_input_lengths_for(self.model, self.teacher_models, dataset, description)
