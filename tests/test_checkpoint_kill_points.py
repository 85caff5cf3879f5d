"""A run killed at each point of a checkpoint's save resumes (``resume_from_checkpoint=True``) from the
previous complete checkpoint, never from the partial one, and ends where an uninterrupted run ends.

Each run is a separate process (tests/resume_worker.py, the configuration of the SIGKILL test) that exits
with ``os._exit`` — no clean-up, as a kill — at one point of the save of its second checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testing_utils import assert_state_close, finish_worker, start_worker

from hf_distill.safety.checkpoints import CHECKPOINT_MANIFEST

pytestmark = pytest.mark.slow  # two processes per kill point

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "resume_worker.py"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc, stream = start_worker(WORKER, root / "run", root / "full.pt", log=root / "full.log")
    finish_worker(proc, stream, root / "full.log", "the uninterrupted run")
    return torch.load(root / "full.pt", weights_only=True)


def _die_at(point: str, root: Path, step: int) -> None:
    proc, stream = start_worker(
        WORKER,
        root / "run",
        root / "never.pt",
        "--die-at",
        point,
        "--die-step",
        str(step),
        log=root / "killed.log",
    )
    proc.wait(timeout=180)
    stream.close()
    assert proc.returncode == 17, (
        f"the run did not die at {point}:\n{(root / 'killed.log').read_text()[-4000:]}"
    )


@pytest.mark.parametrize(
    "point",
    [
        "before_teacher",
        "before_student_weights",
        "before_optimizer",
        "before_trainer_state",
        "before_manifest",
    ],
)
def test_a_save_killed_at_any_point_resumes_from_the_previous_complete_checkpoint(
    tmp_path, uninterrupted, point
):
    from resume_worker import SAVE_STEPS

    partial_step = 2 * SAVE_STEPS
    _die_at(point, tmp_path, partial_step)
    partial = tmp_path / "run" / f"checkpoint-{partial_step}"
    complete = tmp_path / "run" / f"checkpoint-{SAVE_STEPS}"
    assert partial.is_dir() and not (partial / CHECKPOINT_MANIFEST).exists()
    assert (complete / CHECKPOINT_MANIFEST).is_file()

    proc, stream = start_worker(
        WORKER,
        tmp_path / "run",
        tmp_path / "resumed.pt",
        "--resume-from",
        "true",
        log=tmp_path / "resumed.log",
    )
    finish_worker(proc, stream, tmp_path / "resumed.log", f"the resume after dying {point}")
    log = (tmp_path / "resumed.log").read_text()
    assert f"Skipping checkpoint-{partial_step}: its save did not finish" in log
    assert f"Resuming from checkpoint-{SAVE_STEPS}, the newest complete checkpoint" in log
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["start"]["global_step"] == SAVE_STEPS
    assert_state_close(resumed["student"], uninterrupted["student"], 1e-6, f"student after dying {point}")
    assert_state_close(resumed["teacher"], uninterrupted["teacher"], 1e-6, f"teacher after dying {point}")
