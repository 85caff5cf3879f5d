"""OnlineDistillTrainer killed with SIGKILL after a checkpoint, then resumed: same result as an uninterrupted run.

A worker process (tests/resume_worker.py) trains with a checkpoint every `SAVE_STEPS` steps and hangs once
``checkpoint-SAVE_STEPS`` holds the teacher; the test SIGKILLs it there, so nothing after the checkpoint
(no clean shutdown, no later save) can help the resume. Another process resumes from that checkpoint to
the same `MAX_STEPS`. Dropout is 0 and everything runs on one CPU thread, so the runs are deterministic.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import assert_state_close, finish_worker, start_worker

from hf_distill.safety.checksums import CheckpointIntegrityError

pytestmark = pytest.mark.slow  # separate processes, killed mid-run: minutes, not seconds

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "resume_worker.py"
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run and the killed run side by side, then the resume of the killed one."""
    from resume_worker import MAX_STEPS, SAVE_STEPS

    root = tmp_path_factory.mktemp("online_resume")
    started: list[tuple[subprocess.Popen, object]] = []
    try:
        started.append(start_worker(WORKER, root / "full", root / "full.pt", log=root / "full.log"))
        marker = root / "checkpoint_saved"
        started.append(
            start_worker(
                WORKER,
                root / "killed",
                root / "killed.pt",
                "--hang-after-save",
                str(SAVE_STEPS),
                "--marker",
                str(marker),
                log=root / "killed.log",
            )
        )
        (full_proc, full_log), (killed_proc, killed_log) = started
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():
            if killed_proc.poll() is not None:
                pytest.fail(
                    f"the run to kill exited ({killed_proc.returncode}) before checkpoint-{SAVE_STEPS}:\n"
                    f"{(root / 'killed.log').read_text()[-8000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint-{SAVE_STEPS} marker after {RUN_TIMEOUT_S} s")
            time.sleep(0.1)
        os.kill(killed_proc.pid, signal.SIGKILL)
        killed_proc.wait(timeout=30)
        killed_log.close()
        assert killed_proc.returncode == -signal.SIGKILL
        assert not (root / "killed.pt").exists()
        checkpoint = root / "killed" / f"checkpoint-{SAVE_STEPS}"
        assert marker.read_text() == str(checkpoint)
        assert not (root / "killed" / f"checkpoint-{2 * SAVE_STEPS}").exists()
        # A copy taken before the resume writes more checkpoints into the same output_dir.
        pristine = root / "pristine" / checkpoint.name
        shutil.copytree(checkpoint, pristine)

        started.append(
            start_worker(
                WORKER,
                root / "killed",
                root / "resumed.pt",
                "--resume-from",
                str(checkpoint),
                log=root / "resumed.log",
            )
        )
        resume_proc, resume_log = started[-1]
        finish_worker(full_proc, full_log, root / "full.log", "the uninterrupted run")
        finish_worker(resume_proc, resume_log, root / "resumed.log", "the resumed run")
    finally:  # never leave a worker behind, whatever failed
        for proc, stream in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stream.close()
    return {
        "checkpoint": pristine,
        "full": torch.load(root / "full.pt", weights_only=True),
        "resumed": torch.load(root / "resumed.pt", weights_only=True),
        "full_checkpoint": root / "full" / f"checkpoint-{SAVE_STEPS}",
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
    }


def test_resumed_run_matches_the_uninterrupted_run(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert full["global_step"] == resumed["global_step"] == runs["max_steps"]
    assert_state_close(resumed["teacher"], full["teacher"], 1e-6, "teacher after resume")
    assert_state_close(resumed["student"], full["student"], 1e-6, "student after resume")
    assert resumed["teacher_scheduler"]["last_epoch"] == full["teacher_scheduler"]["last_epoch"]
    # The teacher trained after the checkpoint (so the comparison above covers the resumed steps).
    saved = load_file(str(runs["checkpoint"] / "teacher" / "trainable.safetensors"))
    moved = max((full["teacher"][n] - v).abs().max().item() for n, v in saved.items())
    assert moved > 1e-3, "the teacher did not change after the checkpoint"


def test_killed_runs_checkpoint_matches_the_uninterrupted_runs(runs):
    teacher_dir = runs["checkpoint"] / "teacher"
    assert sorted(p.name for p in teacher_dir.iterdir()) == [
        "manifest.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainable.safetensors",
    ]
    killed = load_file(str(teacher_dir / "trainable.safetensors"))
    full = load_file(str(runs["full_checkpoint"] / "teacher" / "trainable.safetensors"))
    assert_state_close(killed, full, 0.0, "checkpoint teacher of the killed run")


def test_resume_starts_from_the_checkpoint_teacher(runs):
    start = runs["resumed"]["start"]
    assert start["global_step"] == runs["save_steps"]
    teacher_dir = runs["checkpoint"] / "teacher"
    saved = load_file(str(teacher_dir / "trainable.safetensors"))
    assert saved, "the checkpoint holds no teacher weights"
    assert_state_close(
        {n: start["teacher"][n] for n in saved}, saved, 0.0, "teacher at the start of the resume"
    )
    # Its optimizer (Adam moments) and schedule resume too, not only its weights.
    optimizer = torch.load(teacher_dir / "optimizer.pt", weights_only=True)
    assert optimizer["state"], "the checkpoint's teacher optimizer has no state"
    assert optimizer["state"].keys() == start["teacher_optimizer"]["state"].keys()
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(start["teacher_optimizer"]["state"][index][key], value), (index, key)
    scheduler = torch.load(teacher_dir / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == runs["save_steps"]
    assert start["teacher_scheduler"]["last_epoch"] == scheduler["last_epoch"]
    assert start["teacher_scheduler"]["_last_lr"] == scheduler["_last_lr"]
    # And the student is the checkpoint's too (Trainer's part of the resume).
    full_start_student = load_file(str(runs["checkpoint"] / "model.safetensors"))
    assert_state_close(
        {n: start["student"][n] for n in full_start_student},
        full_start_student,
        0.0,
        "student at the start of the resume",
    )


def test_resume_without_the_teacher_folder_raises(runs, tmp_path):
    from resume_worker import build_trainer

    broken = tmp_path / "out" / runs["checkpoint"].name
    shutil.copytree(runs["checkpoint"], broken)
    shutil.rmtree(broken / "teacher")
    trainer = build_trainer(tmp_path / "out")
    # The checkpoint's manifest lists the teacher's files: their absence is named before anything is read.
    with pytest.raises(
        CheckpointIntegrityError, match=re.escape(str(broken / "teacher")) + r"/\S+ is missing"
    ):
        trainer.train(resume_from_checkpoint=str(broken))
    # resume_from_checkpoint=True finds the same checkpoint in output_dir and fails the same way.
    with pytest.raises(CheckpointIntegrityError, match=re.escape(str(broken / "teacher"))):
        trainer.train(resume_from_checkpoint=True)
