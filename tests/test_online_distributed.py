"""OnlineDistillTrainer under DDP on CPU: 2 gloo processes must train what one process trains on their combined batch.

The teacher is not wrapped in DDP; its gradients are averaged by `average_gradients_across_processes`. The
ranks see different rows, so without that averaging their teachers drift apart; with it, both ranks hold the
teacher (and student) of a single-process run with twice the per-device batch.
LGTMTrainer (faithful and pre_update) is checked the same way: its quiz gradient and lookahead gradient
are averaged across ranks too. So are LGTMTrainer and MetaDistillTrainer with gradient accumulation: 2 ranks
× 2 micro-batches of 4 rows must train what one process trains on batches of 16.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "ddp_worker.py"
LAUNCH_TIMEOUT_S = 240


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(
        not _gloo_available(), reason="torch.distributed with the gloo backend is not available"
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(outdir: Path, variants: list[str]) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    for attempt in range(2):  # a second try only if another process took the free port meanwhile
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            str(outdir),
            "--variants",
            *variants,
        ]
        # A session of its own, so that a timeout ends the launcher and both ranks together.
        proc = subprocess.Popen(
            command,
            env=env,
            cwd=TESTS.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"the 2-process run did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-8000:]}")
        if proc.returncode == 0:
            return
        if attempt == 0 and "address already in use" in output.lower():
            continue
        pytest.fail(f"the 2-process run failed ({proc.returncode}):\n{output[-10000:]}")


def _load(path: Path) -> dict:
    assert path.is_file(), f"the worker wrote no {path.name}"
    return torch.load(path, weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    return (a[worst].float() - b[worst].float()).abs().max().item(), worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Both variants on 2 ranks (one launch), and the single-process reference, in this process."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("online_ddp")
    _launch_two_ranks(outdir, ["sync", "nosync"])
    results = {
        f"{variant}{rank}": _load(outdir / f"{variant}_rank{rank}.pt")
        for variant in ("sync", "nosync")
        for rank in (0, 1)
    }
    single_dir = outdir / "single"
    single_dir.mkdir()
    results["single"] = _load(
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
        diff, name = _max_diff(runs["sync0"][role], runs["sync1"][role])
        assert diff <= 1e-7, f"{role} differs between ranks at {name} by {diff}"


def test_ddp_matches_single_process_on_the_combined_batch(runs):
    for role in ("teacher", "student"):
        # Same start: the reference builds the same models.
        diff, name = _max_diff(runs["sync0"][f"{role}_init"], runs["single"][f"{role}_init"])
        assert diff == 0.0, f"{role} starts differently at {name}"
        diff, name = _max_diff(runs["sync0"][role], runs["single"][role])
        assert diff <= 1e-5, f"DDP {role} differs from the single-process run at {name} by {diff}"


def test_teacher_and_student_were_trained(runs):
    # Otherwise the comparisons above would hold trivially. Adam moves every weight by about the learning
    # rate (5e-3) per step, far beyond the 1e-5 tolerance.
    for run in ("sync0", "single"):
        for role in ("teacher", "student"):
            diff, _ = _max_diff(runs[run][role], runs[run][f"{role}_init"])
            assert diff > 1e-3, f"{run}: the {role} did not change"


def test_without_teacher_gradient_averaging_the_ranks_drift_apart(runs):
    """The comparison has teeth: the ranks' teachers differ once their gradients are not averaged."""
    teacher_diff, name = _max_diff(runs["nosync0"]["teacher"], runs["nosync1"]["teacher"])
    assert teacher_diff > 1e-4, f"the ranks' teachers agree (max difference {teacher_diff} at {name})"
    for rank in (0, 1):
        diff, _ = _max_diff(runs[f"nosync{rank}"]["teacher"], runs["single"]["teacher"])
        assert diff > 1e-4, f"rank {rank}'s unsynchronised teacher matches the single-process one"
    # The student stays in sync through DDP's own gradient averaging.
    student_diff, name = _max_diff(runs["nosync0"]["student"], runs["nosync1"]["student"])
    assert student_diff <= 1e-7, f"the student differs between ranks at {name} by {student_diff}"


@pytest.fixture(scope="module")
def lgtm_runs(tmp_path_factory) -> dict[str, dict]:
    """LGTMTrainer, faithful and pre_update, on 2 ranks (one launch) and in one process on the combined batch."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("lgtm_ddp")
    _launch_two_ranks(outdir, ["lgtm", "lgtm_pre"])
    results = {}
    for variant in ("lgtm", "lgtm_pre"):
        for rank in (0, 1):
            results[f"{variant}{rank}"] = _load(outdir / f"{variant}_rank{rank}.pt")
        single_dir = outdir / f"single_{variant}"
        single_dir.mkdir()
        results[f"{variant}_single"] = _load(
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
        diff, name = _max_diff(lgtm_runs[f"{variant}0"][role], lgtm_runs[f"{variant}1"][role])
        assert diff <= 1e-7, f"{variant}: the {role} differs between ranks at {name} by {diff}"
        diff, name = _max_diff(lgtm_runs[f"{variant}0"][role], lgtm_runs[f"{variant}_single"][role])
        assert diff <= 1e-5, f"{variant}: DDP {role} differs from the single-process run at {name} by {diff}"
        moved, _ = _max_diff(
            lgtm_runs[f"{variant}_single"][role], lgtm_runs[f"{variant}_single"][f"{role}_init"]
        )
        assert moved > 1e-3, f"{variant}: the {role} did not change"


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory) -> dict[str, dict]:
    """LGTM and meta with 2 micro-batches of 4 rows on each of 2 ranks, and in one process with batches of 16."""
    import ddp_worker

    outdir = tmp_path_factory.mktemp("accumulation_ddp")
    _launch_two_ranks(outdir, ["lgtm_ga", "meta_ga"])
    results = {}
    for variant in ("lgtm_ga", "meta_ga"):
        for rank in (0, 1):
            results[f"{variant}{rank}"] = _load(outdir / f"{variant}_rank{rank}.pt")
        single_dir = outdir / f"single_{variant}"
        single_dir.mkdir()
        combined = ddp_worker.GLOBAL_BATCH * ddp_worker.ACCUMULATION
        method = variant.removesuffix("_ga")
        results[f"{variant}_single"] = _load(
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
        diff, name = _max_diff(runs[f"{variant}0"][role], runs[f"{variant}1"][role])
        assert diff <= 1e-7, f"{variant}: the {role} differs between ranks at {name} by {diff}"
        diff, name = _max_diff(runs[f"{variant}0"][role], runs[f"{variant}_single"][role])
        assert diff <= 1e-5, f"{variant}: DDP {role} differs from the single-process run at {name} by {diff}"
        moved, _ = _max_diff(runs[f"{variant}_single"][role], runs[f"{variant}_single"][f"{role}_init"])
        assert moved > 1e-3, f"{variant}: the {role} did not change"
