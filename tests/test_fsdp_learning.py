"""Teachers that learn, sharded by FSDP2: OnlineDistillTrainer, MetaDistillTrainer and LGTMTrainer on 2 CPU
processes (gloo) against one process, their sharded checkpoints resumed, and the measured reason a plain pass
over a sharded student cannot serve meta's pilot or LGTM's lookahead (they run on gathered whole weights).

The 2-process runs put back the FSDP2 plugin that accelerate drops on the CPU (tests/fsdp_worker.py);
tests/fsdp_learning_worker.py runs them. ``HF_DISTILL_TEST_DEVICE=cuda`` runs the same checks with one rank per
GPU over NCCL (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import launch_ranks, load_result, max_difference, tiny_classifier

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "fsdp_learning_worker.py"
DEVICE = os.environ.get("HF_DISTILL_TEST_DEVICE", "cpu")
RANKS = 2 if DEVICE == "cpu" else torch.cuda.device_count()
# Float32 rounding of a reduce-scatter against one process's sums, accumulated over 4 Adam steps (a GPU's
# kernels differ from each other by more than rounding).
WEIGHT_TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-4

if DEVICE == "cpu":
    can_launch = pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    )
else:
    can_launch = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="HF_DISTILL_TEST_DEVICE=cuda needs a GPU"
    )


@pytest.mark.slow
@pytest.mark.distributed
@can_launch
class TestLearningTeacherUnderFSDP2:
    """Per method, one uninterrupted 2-rank run, one resumed from its first checkpoint, and the single-process
    reference."""

    @pytest.fixture(scope="class", params=["online", "meta", "lgtm"])
    def runs(self, request, tmp_path_factory) -> dict:
        import fsdp_learning_worker

        method = request.param
        outdir = tmp_path_factory.mktemp(f"fsdp2_{method}")
        for phase in ("full", "resume", "accumulate"):
            launch_ranks(WORKER, RANKS, str(outdir), "--phase", phase, "--method", method, "--device", DEVICE)
        found = {
            phase: [load_result(outdir / f"{phase}_rank{rank}.pt") for rank in range(RANKS)]
            for phase in ("full", "resume", "accumulate")
        }
        (outdir / "single").mkdir()
        found["single"] = load_result(
            fsdp_learning_worker.train_learning(outdir / "single", "single", "single", method, device=DEVICE)
        )
        found["outdir"] = outdir
        return found

    def test_teacher_is_sharded_and_trainable(self, runs):
        for held in [run["teacher_held"] for run in runs["full"]]:
            assert held["sharded_fraction"] == 1.0
            assert held["local_numel"] <= 1.1 * held["full_numel"] / RANKS, held
            assert held["any_requires_grad"]
        assert runs["single"]["teacher_held"]["sharded_fraction"] == 0.0  # the reference is unsharded

    def test_teacher_and_student_equal_the_single_process_run(self, runs):
        single = runs["single"]
        initial_teacher = tiny_classifier(layers=2, seed=1).state_dict()
        moved, _ = max_difference(single["teacher"], initial_teacher)
        assert moved > 1e-3, "the teacher did not learn, so the comparison would hold trivially"
        for rank, run in enumerate(runs["full"]):
            assert run["global_step"] == single["global_step"]
            torch.testing.assert_close(
                torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6
            )
            # The teacher's gradient norm, all-reduced from the shards, is the one process's.
            torch.testing.assert_close(
                torch.tensor(run["teacher_grad_norms"]),
                torch.tensor(single["teacher_grad_norms"]),
                rtol=1e-4,
                atol=1e-7,
            )
            for role in ("teacher", "student"):
                diff, name = max_difference(run[role], single[role])
                assert diff <= WEIGHT_TOLERANCE, f"rank {rank}: the {role} differs at {name} by {diff}"
            # The evaluations (student and teacher, sharded, each rank half the rows) between the steps.
            assert (
                len(run["eval_losses"]) == len(single["eval_losses"]) == 4
            )  # 2 evaluations × student, teacher
            torch.testing.assert_close(
                torch.tensor(run["eval_losses"]), torch.tensor(single["eval_losses"]), rtol=1e-5, atol=1e-6
            )

    def test_two_micro_batches_per_rank_equal_the_single_process_step(self, runs):
        single = runs["single"]
        for rank, run in enumerate(runs["accumulate"]):
            torch.testing.assert_close(
                torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6
            )
            for role in ("teacher", "student"):
                diff, name = max_difference(run[role], single[role])
                assert diff <= WEIGHT_TOLERANCE, (
                    f"rank {rank}: the accumulated {role} differs at {name} by {diff}"
                )

    def test_resume_from_the_sharded_checkpoint_equals_the_uninterrupted_run(self, runs):
        for full, resumed in zip(runs["full"], runs["resume"], strict=True):
            assert resumed["global_step"] == full["global_step"]
            for role in ("teacher", "student"):
                diff, name = max_difference(resumed[role], full[role])
                assert diff <= WEIGHT_TOLERANCE, f"the resumed {role} differs at {name} by {diff}"

    def test_checkpoint_and_saved_teacher_are_gathered_whole(self, runs):
        outdir, single = runs["outdir"], runs["single"]
        folder = outdir / "full_trainer" / "checkpoint-2" / "teacher"
        in_checkpoint = load_file(str(folder / "trainable.safetensors"))
        assert set(in_checkpoint) == set(dict(tiny_classifier(layers=2, seed=1).named_parameters()))
        for name, tensor in in_checkpoint.items():  # whole tensors, not one rank's shard
            assert tensor.shape == single["teacher"][name].shape, name
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        assert set(optimizer["state"]) == set(in_checkpoint)  # keyed by name, every trainable weight
        for written in ("full_saved_teacher", "full_pushed_teacher"):  # save_teacher, push_teacher_to_hub
            saved = load_file(str(outdir / written / "model.safetensors"))
            assert set(saved) == set(single["teacher"]), written
            diff, name = max_difference(saved, {k: single["teacher"][k] for k in saved})
            assert diff <= WEIGHT_TOLERANCE, f"{written}: {name} off by {diff}"
        assert (outdir / "full_pushed_teacher" / "README.md").is_file()


@pytest.mark.slow
@pytest.mark.distributed
@can_launch
def test_fsdp2_hides_the_student_weights_meta_and_lgtm_differentiate(tmp_path):
    """Why meta's pilot and LGTM's lookahead run on gathered whole weights under FSDP2: if torch changes this,
    this test fails and that detour should be revisited."""
    launch_ranks(WORKER, RANKS, str(tmp_path), "--phase", "obstacle", "--device", DEVICE)
    for rank in range(RANKS):
        found = load_result(tmp_path / f"obstacle_rank{rank}.pt")
        # torch.autograd.grad of the loss reaches none of the sharded parameters.
        assert found["no_gradient"] == found["parameters"] > 0
        # functional_call's values are replaced by FSDP2's inside each fully_shard'ed layer ...
        assert found["layer_values_ignored"] == found["layer_parameters"] > 0
        # ... though it uses them at the root, so a sharded pilot pass would be silently half right.
        assert found["other_values_used"] > 0
