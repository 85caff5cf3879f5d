"""OnlineDistillTrainer under DDP on CPU: 2 gloo processes must train what one process trains on their combined batch.

The teacher is not wrapped in DDP; its gradients are averaged by `average_gradients_across_processes`. The
ranks see different rows, so without that averaging their teachers drift apart; with it, both ranks hold the
teacher (and student) of a single-process run with twice the per-device batch.
LGTMTrainer (faithful and pre_update) is checked the same way: its quiz gradient and lookahead gradient
are averaged across ranks too. So are LGTMTrainer and MetaDistillTrainer with gradient accumulation: 2 ranks
× 2 micro-batches of 4 rows must train what one process trains on batches of 16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testing_utils import launch_ranks, load_result, max_difference

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "ddp_worker.py"


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(
        not _gloo_available(), reason="torch.distributed with the gloo backend is not available"
    ),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Both variants on 2 ranks (one launch), and the single-process reference, in this process."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("online_ddp")
    launch_ranks(WORKER, 2, str(outdir), "--variants", "sync", "nosync")
    results = {
        f"{variant}{rank}": load_result(outdir / f"{variant}_rank{rank}.pt")
        for variant in ("sync", "nosync")
        for rank in (0, 1)
    }
    single_dir = outdir / "single"
    single_dir.mkdir()
    results["single"] = load_result(
        ddp_worker.train_once(single_dir, "single", per_device_batch=ddp_worker.GLOBAL_BATCH)
    )
    return results


def test_two_ranks_really_ran_distributed(runs):
    from ddp_worker import STEPS

    for key in ("sync0", "sync1", "nosync0", "nosync1"):
        assert runs[key]["world_size"] == 2, key
        assert runs[key]["global_step"] == STEPS, key
        assert runs[key]["teacher_steps"] == STEPS, key  # one teacher step (and sync) per optimisation step
    assert runs["single"]["world_size"] == 1
    assert runs["single"]["teacher_steps"] == STEPS


def test_ranks_hold_identical_teacher_and_student(runs):
    for role in ("teacher", "student"):
        diff, name = max_difference(runs["sync0"][role], runs["sync1"][role])
        assert diff <= 1e-7, f"{role} differs between ranks at {name} by {diff}"


def test_ddp_matches_single_process_on_the_combined_batch(runs):
    for role in ("teacher", "student"):
        # Same start: the reference builds the same models.
        diff, name = max_difference(runs["sync0"][f"{role}_init"], runs["single"][f"{role}_init"])
        assert diff == 0.0, f"{role} starts differently at {name}"
        diff, name = max_difference(runs["sync0"][role], runs["single"][role])
        assert diff <= 1e-5, f"DDP {role} differs from the single-process run at {name} by {diff}"


def test_teacher_and_student_were_trained(runs):
    # Otherwise the comparisons above would hold trivially. Adam moves every weight by about the learning
    # rate (5e-3) per step, far beyond the 1e-5 tolerance.
    for run in ("sync0", "single"):
        for role in ("teacher", "student"):
            diff, _ = max_difference(runs[run][role], runs[run][f"{role}_init"])
            assert diff > 1e-3, f"{run}: the {role} did not change"


def test_without_teacher_gradient_averaging_the_ranks_drift_apart(runs):
    """The comparison has teeth: the ranks' teachers differ once their gradients are not averaged."""
    teacher_diff, name = max_difference(runs["nosync0"]["teacher"], runs["nosync1"]["teacher"])
    assert teacher_diff > 1e-4, f"the ranks' teachers agree (max difference {teacher_diff} at {name})"
    for rank in (0, 1):
        diff, _ = max_difference(runs[f"nosync{rank}"]["teacher"], runs["single"]["teacher"])
        assert diff > 1e-4, f"rank {rank}'s unsynchronised teacher matches the single-process one"
    # The student stays in sync through DDP's own gradient averaging.
    student_diff, name = max_difference(runs["nosync0"]["student"], runs["nosync1"]["student"])
    assert student_diff <= 1e-7, f"the student differs between ranks at {name} by {student_diff}"


@pytest.fixture(scope="module")
def lgtm_runs(tmp_path_factory) -> dict[str, dict]:
    """LGTMTrainer, faithful and pre_update, on 2 ranks (one launch) and in one process on the combined batch."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("lgtm_ddp")
    launch_ranks(WORKER, 2, str(outdir), "--variants", "lgtm", "lgtm_pre")
    results = {}
    for variant in ("lgtm", "lgtm_pre"):
        for rank in (0, 1):
            results[f"{variant}{rank}"] = load_result(outdir / f"{variant}_rank{rank}.pt")
        single_dir = outdir / f"single_{variant}"
        single_dir.mkdir()
        results[f"{variant}_single"] = load_result(
            ddp_worker.train_once(single_dir, "single", ddp_worker.GLOBAL_BATCH, method=variant)
        )
    return results


@pytest.mark.parametrize("variant", ["lgtm", "lgtm_pre"])
def test_lgtm_under_ddp_matches_single_process_on_the_combined_batch(lgtm_runs, variant):
    """The quiz gradient v (all-reduced), the lookahead gradient (all-reduced, or DDP's own in pre_update)
    and the teacher's gradient are those of one process on both ranks' rows."""
    from ddp_worker import STEPS

    assert lgtm_runs[f"{variant}0"]["world_size"] == 2 and lgtm_runs[f"{variant}0"]["global_step"] == STEPS
    for role in ("teacher", "student"):
        diff, name = max_difference(lgtm_runs[f"{variant}0"][role], lgtm_runs[f"{variant}1"][role])
        assert diff <= 1e-7, f"{variant}: the {role} differs between ranks at {name} by {diff}"
        diff, name = max_difference(lgtm_runs[f"{variant}0"][role], lgtm_runs[f"{variant}_single"][role])
        assert diff <= 1e-5, f"{variant}: DDP {role} differs from the single-process run at {name} by {diff}"
        moved, _ = max_difference(
            lgtm_runs[f"{variant}_single"][role], lgtm_runs[f"{variant}_single"][f"{role}_init"]
        )
        assert moved > 1e-3, f"{variant}: the {role} did not change"


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory) -> dict[str, dict]:
    """LGTM and meta with 2 micro-batches of 4 rows on each of 2 ranks, and in one process with batches of 16."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("accumulation_ddp")
    launch_ranks(WORKER, 2, str(outdir), "--variants", "lgtm_ga", "meta_ga")
    results = {}
    for variant in ("lgtm_ga", "meta_ga"):
        for rank in (0, 1):
            results[f"{variant}{rank}"] = load_result(outdir / f"{variant}_rank{rank}.pt")
        single_dir = outdir / f"single_{variant}"
        single_dir.mkdir()
        combined = ddp_worker.GLOBAL_BATCH * ddp_worker.ACCUMULATION
        method = variant.removesuffix("_ga")
        results[f"{variant}_single"] = load_result(
            ddp_worker.train_once(single_dir, "single", combined, method=method)
        )
    return results


@pytest.mark.parametrize("variant", ["lgtm_ga", "meta_ga"])
def test_accumulation_under_ddp_matches_single_process_on_the_combined_batch(accumulation_runs, variant):
    """Each rank's two micro-batches and the other rank's are one step of the single process's 16 rows."""
    from ddp_worker import STEPS

    runs = accumulation_runs
    assert runs[f"{variant}0"]["world_size"] == 2 and runs[f"{variant}0"]["global_step"] == STEPS
    assert runs[f"{variant}0"]["teacher_steps"] == STEPS  # one teacher step per optimisation step
    for role in ("teacher", "student"):
        diff, name = max_difference(runs[f"{variant}0"][role], runs[f"{variant}1"][role])
        assert diff <= 1e-7, f"{variant}: the {role} differs between ranks at {name} by {diff}"
        diff, name = max_difference(runs[f"{variant}0"][role], runs[f"{variant}_single"][role])
        assert diff <= 1e-5, f"{variant}: DDP {role} differs from the single-process run at {name} by {diff}"
        moved, _ = max_difference(runs[f"{variant}_single"][role], runs[f"{variant}_single"][f"{role}_init"])
        assert moved > 1e-3, f"{variant}: the {role} did not change"
