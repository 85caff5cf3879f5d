"""An OnlineDistillTrainer run for tests/test_online_sigkill_resume.py, in its own process.

``python tests/resume_worker.py OUTPUT_DIR RESULT.pt`` trains the configuration of `build_trainer` to
`MAX_STEPS`, saving a checkpoint every `SAVE_STEPS` steps, and writes the final teacher and student to
RESULT.pt. With ``--hang-after-save K --marker FILE`` it instead stops dead once ``checkpoint-K`` holds the
teacher: it writes FILE and sleeps until the test kills it. With ``--die-at POINT --die-step K`` the process
exits at once (``os._exit``: no clean-up, as a kill) at POINT of the save of ``checkpoint-K`` (`DIE_POINTS`).
``--resume-from CKPT`` (or ``true``: the newest complete one) resumes from a checkpoint and also records what
the trainer holds when training begins (after the checkpoint was loaded).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from testing_utils import keyword_dataset, tiny_classifier, tiny_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_distill import OnlineDistillTrainer, OnlineDistillTrainingArguments  # noqa: E402
from hf_distill.teacher.checkpoint import TEACHER_CHECKPOINT_DIR, TEACHER_WEIGHTS_NAME  # noqa: E402

ROWS = 40  # 5 steps of 8 rows per epoch: a resume from step 3 skips batches and crosses an epoch boundary
BATCH = 8
MAX_STEPS = 8
SAVE_STEPS = 3


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def build_trainer(output_dir: Path, callbacks: list | None = None) -> OnlineDistillTrainer:
    """The one configuration every run of the test uses (random data order, warmup, linear decay)."""
    args = OnlineDistillTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        max_steps=MAX_STEPS,
        learning_rate=5e-3,
        warmup_steps=2,
        teacher_learning_rate=5e-3,
        teacher_warmup_ratio=0.25,
        teacher_alpha=0.5,
        alpha=0.5,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return OnlineDistillTrainer(
        model=tiny_classifier(layers=1, seed=2),
        teacher_model=tiny_classifier(layers=2, seed=1),
        args=args,
        train_dataset=keyword_dataset(ROWS),
        processing_class=tiny_tokenizer(Path(output_dir) / "tokenizer"),
        callbacks=callbacks,
    )


class HangAfterCheckpoint(TrainerCallback):
    """Once checkpoint-<step> holds the teacher, announce it through ``marker`` and hang (to be SIGKILLed)."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (
            state.global_step == self.step
            and (checkpoint / TEACHER_CHECKPOINT_DIR / TEACHER_WEIGHTS_NAME).is_file()
        ):
            staging = self.marker.with_suffix(".tmp")
            staging.write_text(str(checkpoint))
            os.replace(staging, self.marker)
            while True:
                time.sleep(60)


def _dies_before(owner, name: str, step: int, trainer_ref: list) -> None:
    """Make ``owner.name`` exit the process when called during the save of ``checkpoint-<step>``."""
    original = getattr(owner, name)

    def dying(*args, **kwargs):
        if trainer_ref and trainer_ref[0].state.global_step == step:
            os._exit(17)
        return original(*args, **kwargs)

    setattr(owner, name, dying)


# Points of a save, in the order the trainers write a checkpoint: the teacher's state, the student's
# weights, its optimizer and schedule, Trainer's state, and last the manifest that marks it complete.
DIE_POINTS = (
    "before_teacher",
    "before_student_weights",
    "before_optimizer",
    "before_trainer_state",
    "before_manifest",
)


def install_death(point: str, step: int, trainer_ref: list) -> None:
    import transformers

    import hf_distill.trainers.checkpointing as checkpointing
    import hf_distill.trainers.learning_teacher_trainer as learning_teacher_trainer

    owner, name = {
        "before_teacher": (learning_teacher_trainer, "save_teacher_state"),
        "before_student_weights": (OnlineDistillTrainer, "save_model"),
        "before_optimizer": (transformers.Trainer, "_save_optimizer_and_scheduler"),
        "before_trainer_state": (transformers.TrainerState, "save_to_json"),
        "before_manifest": (checkpointing, "write_checkpoint_manifest"),
    }[point]
    _dies_before(owner, name, step, trainer_ref)


class RecordStart(TrainerCallback):
    """What the trainer holds when training begins: after the checkpoint's teacher, optimizers and scheduler
    were loaded, before the first step."""

    def __init__(self) -> None:
        self.trainer: OnlineDistillTrainer | None = None
        self.record: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.record = {
            "teacher": _snapshot(trainer.teacher_model),
            "student": _snapshot(trainer.model),
            "teacher_optimizer": copy.deepcopy(trainer.teacher_optimizer.state_dict()),
            "teacher_scheduler": copy.deepcopy(trainer.teacher_lr_scheduler.state_dict()),
            "global_step": state.global_step,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--hang-after-save", type=int, default=None)
    parser.add_argument("--marker", type=Path, default=None)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--die-at", choices=DIE_POINTS, default=None)
    parser.add_argument("--die-step", type=int, default=None)
    cli = parser.parse_args()
    trainer_ref: list = []
    if cli.die_at is not None:
        install_death(cli.die_at, cli.die_step, trainer_ref)
    torch.set_num_threads(1)
    callbacks, start = [], RecordStart()
    if cli.hang_after_save is not None:
        callbacks.append(HangAfterCheckpoint(cli.hang_after_save, cli.marker))
    callbacks.append(start)
    trainer = build_trainer(cli.output_dir, callbacks)
    trainer_ref.append(trainer)
    start.trainer = trainer
    trainer.train(resume_from_checkpoint=True if cli.resume_from == "true" else cli.resume_from)
    torch.save(
        {
            "teacher": _snapshot(trainer.teacher_model),
            "student": _snapshot(trainer.model),
            "start": start.record,
            "global_step": trainer.state.global_step,
            "teacher_scheduler": trainer.teacher_lr_scheduler.state_dict(),
        },
        cli.result,
    )


if __name__ == "__main__":
    main()
