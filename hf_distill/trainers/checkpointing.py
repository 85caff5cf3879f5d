"""Checkpoints that are complete or ignored, verified before a resume, and resumed as the arguments say.

`VerifiedCheckpointsMixin` goes before `transformers.Trainer` in a trainer's bases. It writes each
checkpoint's manifest after every other file (and lets `Trainer` rotate old checkpoints only then),
verifies a checkpoint before `Trainer.train` reads it, applies a changed learning rate or weight decay to
the restored optimizer, holds the output folder's run lock, and gives subclasses three hooks for their own
state: `gather_checkpoint_state` (every process, for state that is sharded across them),
`save_checkpoint_state` and `restore_checkpoint_state`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..safety.checkpoints import (
    remove_checkpoint_manifest,
    resolve_last_checkpoint,
    verify_checkpoint,
    write_checkpoint_manifest,
)
from ..safety.resume_changes import resume_with_changed_arguments, save_arguments
from ..safety.run_lock import output_dir_lock


class VerifiedCheckpointsMixin:
    """Whole-checkpoint manifests, verified resumes, changed hyperparameters applied, one run per folder."""

    def gather_checkpoint_state(self) -> dict[str, Any]:
        """What `save_checkpoint_state` writes that must first be collected on every process (state sharded
        across them); called on every process before each checkpoint. None here; subclasses extend it."""
        return {}

    def save_checkpoint_state(self, folder: str, gathered: dict[str, Any]) -> None:
        """Write what the trainer adds to a checkpoint beside `Trainer`'s files (main process only): its
        arguments; subclasses add their own state (calling this first), ``gathered`` being what
        `gather_checkpoint_state` returned."""
        save_arguments(folder, self.args.to_dict())

    def restore_checkpoint_state(self, folder: str) -> None:
        """Read back what `save_checkpoint_state` wrote, before `Trainer.train` resumes from ``folder``."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Trainer restores the optimizer and schedule with the values they were saved with: a changed learning
        # rate or weight decay is applied to them here, and every other changed argument is named.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.optimizer is not None:
            resume_with_changed_arguments(
                checkpoint,
                self.args.to_dict(),
                self.optimizer,
                self.lr_scheduler,
                self.decay_parameters(self.model),
            )

    def decay_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of ``model`` that weight decay applies to (Trainer's rule: not biases or norms)."""
        names = set(self.get_decay_parameter_names(model))
        return [p for n, p in model.named_parameters() if n in names]

    def optional_checkpoint_files(self) -> tuple[str, ...]:
        """Optimizer or schedule files a resume may lack without ``allow_partial_checkpoint``."""
        return ()

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The manifest, written after every other file, marks the folder complete; Trainer's rotation of old
        # checkpoints waits for it, so a crash at any point of a save leaves the previous complete checkpoint.
        folder = self._checkpoint_folder(trial)
        gathered = self.gather_checkpoint_state()
        if self.args.should_save:
            remove_checkpoint_manifest(folder)
            os.makedirs(folder, exist_ok=True)
            self.save_checkpoint_state(folder, gathered)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's rng_state file is on disk
        if self.args.should_save:
            write_checkpoint_manifest(folder)
            rotate_checkpoints(
                self._get_output_dir(trial=trial), limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _checkpoint_folder(self, trial: Any) -> str:
        """The folder `Trainer._save_checkpoint` is about to write."""
        return os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )

    def resume_checkpoint_folder(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint ``train(resume_from_checkpoint=...)`` resumes from (``True``: the last one in
        ``output_dir``), or ``None`` for a fresh run."""
        if resume_from_checkpoint is True:  # the newest complete one: a save that did not finish is skipped
            return os.fspath(resolve_last_checkpoint(self.args.output_dir))
        if resume_from_checkpoint in (None, False, ""):
            return None
        return os.fspath(resume_from_checkpoint)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, holding ``output_dir``'s run lock (a second live run there is refused). On resume,
        every file of the checkpoint is verified against its manifest first, then this trainer's own state
        (`restore_checkpoint_state`) is read back."""
        with output_dir_lock(self.args.output_dir, enabled=self.is_world_process_zero()):
            folder = self.resume_checkpoint_folder(resume_from_checkpoint)
            if folder is not None:
                verify_checkpoint(
                    folder, self.args.allow_partial_checkpoint, self.optional_checkpoint_files()
                )
                self.restore_checkpoint_state(folder)
            return super().train(folder, *args, **kwargs)
