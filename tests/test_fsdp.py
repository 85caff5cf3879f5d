"""The frozen teacher under FSDP2: sharded across the ranks by the student's policy, never trained, and a run
that equals a single-process one.

The 2-process run uses gloo on the CPU. accelerate drops an FSDP plugin on the CPU (it runs FSDP only on
accelerator devices), so the worker puts the plugin back into accelerate's state right after Trainer creates
its accelerator; from there on the run takes the same path as on GPUs (see tests/fsdp_worker.py).

``HF_DISTILL_TEST_DEVICE=cuda`` runs the same checks with one rank per GPU over NCCL and adds DeepSpeed ZeRO-3
(where DeepSpeed is installed); the GPU check script of the benchmarks runs them that way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from testing_utils import launch_ranks, load_result, max_difference, tiny_classifier

from hf_distill.teacher.loading import prepare_frozen_teacher, teacher_layer_classes
from hf_distill.teacher.optimizer import check_learning_teacher_supported

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "fsdp_worker.py"


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


DEVICE = os.environ.get("HF_DISTILL_TEST_DEVICE", "cpu")
RANKS = 2 if DEVICE == "cpu" else torch.cuda.device_count()
# A GPU's float32 kernels differ from the CPU reference of the teacher's logits by more than rounding.
LOGITS_ATOL = 1e-6 if DEVICE == "cpu" else 1e-5

if DEVICE == "cpu":
    can_launch = pytest.mark.skipif(
        not _gloo_available(), reason="torch.distributed with the gloo backend is not available"
    )
else:
    can_launch = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="HF_DISTILL_TEST_DEVICE=cuda needs a GPU"
    )


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# ----- the teacher's wrap policy and FSDP1 (one process) ---------------------------------------------------


def test_teacher_wraps_the_student_layer_classes_it_has():
    teacher = tiny_classifier(layers=1)
    assert teacher_layer_classes(teacher, ["BertLayer", "LlamaDecoderLayer"]) == ["BertLayer"]


def test_teacher_of_another_architecture_falls_back_to_its_own_layers():
    # None makes accelerate read the teacher's own `_no_split_modules` instead of failing on a class it lacks.
    assert teacher_layer_classes(tiny_classifier(layers=1), ["LlamaDecoderLayer"]) is None
    assert teacher_layer_classes(tiny_classifier(layers=1), None) is None


def test_fsdp1_places_a_frozen_full_replica_and_says_how_to_shard(caplog):
    placed = []

    def prepare_model(model, evaluation_mode=False):
        placed.append(evaluation_mode)
        return model

    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)),
        device=torch.device("cpu"),
        prepare_model=prepare_model,
    )
    with caplog.at_level(logging.WARNING, logger="hf_distill.teacher.loading"):
        teacher = prepare_frozen_teacher(tiny_classifier(layers=1).train(), accelerator)
    assert placed == [True]  # no DDP or FSDP wrapper
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "fsdp_version: 2" in caplog.text


def _state(fsdp_version: int | None = None, zero_stage: int | None = None) -> SimpleNamespace:
    if fsdp_version is not None:
        return SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
    return SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage}})
    )


def test_fsdp2_refuses_a_teacher_update_it_cannot_run_sharded():
    # A LearningTeacherTrainer subclass that does not declare teacher_shards_under_fsdp2.
    with pytest.raises(
        NotImplementedError, match="MyTeacherTrainer cannot train its teacher under FSDP2"
    ) as refusal:
        check_learning_teacher_supported(SimpleNamespace(state=_state(2)), "MyTeacherTrainer")
    # The measured obstacle (tests/test_fsdp_learning.py measures it) and the ways forward.
    assert "returns no gradient" in str(refusal.value)
    assert "(OnlineDistillTrainer, MetaDistillTrainer, LGTMTrainer)" in str(refusal.value)


@pytest.mark.parametrize("trainer_class", ["OnlineDistillTrainer", "MetaDistillTrainer", "LGTMTrainer"])
def test_fsdp2_accepts_the_shipped_learning_teachers(trainer_class):
    import hf_distill

    trainer = getattr(hf_distill, trainer_class)
    assert trainer.teacher_shards_under_fsdp2  # each is tested sharded in tests/test_fsdp_learning.py
    check_learning_teacher_supported(
        SimpleNamespace(state=_state(2)), trainer_class, trainer.teacher_shards_under_fsdp2
    )


@pytest.mark.parametrize("shards_under_fsdp2", [True, False])
def test_fsdp1_is_refused_with_the_setting_that_shards(shards_under_fsdp2):
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        check_learning_teacher_supported(
            SimpleNamespace(state=_state(1)), shards_under_fsdp2=shards_under_fsdp2
        )


@pytest.mark.parametrize("shards_under_fsdp2", [True, False])
def test_zero3_is_refused_naming_what_it_would_need(shards_under_fsdp2):
    with pytest.raises(NotImplementedError, match="its own DeepSpeed training engine") as refusal:
        check_learning_teacher_supported(
            SimpleNamespace(state=_state(zero_stage=3)), shards_under_fsdp2=shards_under_fsdp2
        )
    assert "DistillationTrainer with a frozen teacher" in str(refusal.value)


def test_learning_teachers_pass_under_zero2():
    check_learning_teacher_supported(SimpleNamespace(state=_state(zero_stage=2)))


# ----- two ranks with gloo ---------------------------------------------------------------------------------


def _launch_and_reference(outdir: Path, mode: str) -> dict[str, dict]:
    """``mode`` on every rank, and the unsharded single-process run on the combined batch, in this process."""
    import fsdp_worker

    launch_ranks(WORKER, RANKS, str(outdir), "--mode", mode, "--device", DEVICE)
    results = {rank: load_result(outdir / f"{mode}_rank{rank}.pt") for rank in range(RANKS)}
    single_dir = outdir / "single"
    single_dir.mkdir()
    results["single"] = load_result(
        fsdp_worker.train_once(single_dir, "single", fsdp_worker.GLOBAL_BATCH, "single", DEVICE)
    )
    return results


def _check_teacher_sharded_and_frozen(runs: dict) -> None:
    for rank in range(RANKS):
        held = runs[rank]["teacher_held"]
        assert held["sharded_fraction"] == 1.0, f"rank {rank}: some teacher weights are not sharded"
        # Each rank holds its share of the teacher, not a full replica.
        assert held["local_numel"] <= 1.1 * held["full_numel"] / RANKS, held
        assert held["device"].startswith(DEVICE), f"rank {rank}: the teacher is on {held['device']}"
        assert not held["any_requires_grad"] and not held["training_mode"]


def _check_teacher_unchanged_with_unsharded_logits(runs: dict) -> None:
    for rank in range(RANKS):
        run = runs[rank]
        diff, name = max_difference(run["teacher"], run["teacher_init"])
        assert diff == 0.0, f"rank {rank}: the teacher changed at {name} by {diff}"
        torch.testing.assert_close(
            run["teacher_logits"], run["reference_teacher_logits"], rtol=1e-5, atol=LOGITS_ATOL
        )


def _check_matches_single_process(runs: dict, weight_tolerance: float) -> None:
    single = runs["single"]
    assert single["teacher_held"]["sharded_fraction"] == 0.0  # the reference really is unsharded
    diff, name = max_difference(runs[0]["student_init"], single["student_init"])
    assert diff == 0.0, f"the student starts differently at {name}"
    for rank in range(RANKS):
        run = runs[rank]
        torch.testing.assert_close(
            torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=10 * weight_tolerance, atol=1e-6
        )
        diff, name = max_difference(run["student"], single["student"])
        assert diff <= weight_tolerance, (
            f"rank {rank}: the sharded run's student differs from the single-process one at {name} by {diff}"
        )
    # Otherwise the comparison would hold trivially: Adam moves weights by about the learning rate (5e-3).
    moved, _ = max_difference(single["student"], single["student_init"])
    assert moved > 1e-3, "the student did not change"


@pytest.mark.slow
@pytest.mark.distributed
@can_launch
class TestFrozenTeacherUnderFSDP2:
    """One launch (the `fsdp2_runs` fixture) checked from several sides."""

    @pytest.fixture(scope="class")
    def fsdp2_runs(self, tmp_path_factory) -> dict:
        return _launch_and_reference(tmp_path_factory.mktemp("fsdp2"), "fsdp2")

    def test_the_run_really_used_fsdp2(self, fsdp2_runs):
        from fsdp_worker import STEPS

        for rank in range(RANKS):
            run = fsdp2_runs[rank]
            assert run["world_size"] == RANKS and run["global_step"] == STEPS
            assert run["student_wrapper"].startswith("FSDP"), run["student_wrapper"]

    def test_teacher_is_sharded_like_the_student_and_frozen(self, fsdp2_runs):
        _check_teacher_sharded_and_frozen(fsdp2_runs)
        # The student's policy: one unit per transformer layer (2), the input embedding, and the root
        # (fully_shard renames each class FSDP<name>).
        assert fsdp2_runs[0]["teacher_held"]["fsdp_units"] == [
            "FSDPBertForSequenceClassification",
            "FSDPBertLayer",
            "FSDPBertLayer",
            "FSDPEmbedding",
        ]

    def test_sharded_teacher_is_never_trained_and_gives_the_unsharded_logits(self, fsdp2_runs):
        _check_teacher_unchanged_with_unsharded_logits(fsdp2_runs)

    def test_fsdp2_matches_single_process_on_the_combined_batch(self, fsdp2_runs):
        _check_matches_single_process(fsdp2_runs, weight_tolerance=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
@can_launch
class TestFrozenTeacherUnderDDP:
    """DDP: the student replicated and averaged, the teacher a plain frozen module on every rank."""

    @pytest.fixture(scope="class")
    def ddp_runs(self, tmp_path_factory) -> dict:
        return _launch_and_reference(tmp_path_factory.mktemp("ddp"), "ddp")

    def test_teacher_is_a_frozen_unwrapped_module(self, ddp_runs):
        for rank in range(RANKS):
            run = ddp_runs[rank]
            assert run["student_wrapper"] == "DistributedDataParallel" or RANKS == 1
            assert run["teacher_wrapper"] == "BertForSequenceClassification"
            held = run["teacher_held"]
            assert held["device"].startswith(DEVICE) and not held["any_requires_grad"]
        _check_teacher_unchanged_with_unsharded_logits(ddp_runs)

    def test_ddp_matches_single_process_on_the_combined_batch(self, ddp_runs):
        _check_matches_single_process(ddp_runs, weight_tolerance=1e-5)


def _deepspeed_class(stage: int):
    """The checks of a DeepSpeed stage: the teacher an inference engine (partitioned under ZeRO-3), frozen,
    with the unsharded teacher's logits, and a run that matches one process."""

    @pytest.mark.slow
    @pytest.mark.distributed
    @pytest.mark.skipif(DEVICE != "cuda", reason="DeepSpeed runs on GPUs (HF_DISTILL_TEST_DEVICE=cuda)")
    @pytest.mark.skipif(not _deepspeed_available(), reason="DeepSpeed is not installed")
    @can_launch
    class TestFrozenTeacherUnderDeepSpeed:
        @pytest.fixture(scope="class")
        def runs(self, tmp_path_factory) -> dict:
            return _launch_and_reference(tmp_path_factory.mktemp(f"zero{stage}"), f"zero{stage}")

        def test_teacher_is_a_frozen_inference_engine(self, runs):
            assert runs[0]["teacher_wrapper"] == "DeepSpeedEngine"
            if stage == 3:
                _check_teacher_sharded_and_frozen(runs)
            else:  # stage 0: whole on every rank
                assert runs[0]["teacher_held"]["sharded_fraction"] == 0.0
                assert not runs[0]["teacher_held"]["any_requires_grad"]

        def test_teacher_is_never_trained_and_gives_the_unsharded_logits(self, runs):
            _check_teacher_unchanged_with_unsharded_logits(runs)

        def test_matches_single_process_on_the_combined_batch(self, runs):
            # DeepSpeed reduces and steps in its own order: agreement to 1e-4, not rounding.
            _check_matches_single_process(runs, weight_tolerance=1e-4)

    TestFrozenTeacherUnderDeepSpeed.__name__ = TestFrozenTeacherUnderDeepSpeed.__qualname__ = (
        f"TestFrozenTeacherUnderZeRO{stage}"
    )
    return TestFrozenTeacherUnderDeepSpeed


TestFrozenTeacherUnderZeRO2 = _deepspeed_class(2)
TestFrozenTeacherUnderZeRO3 = _deepspeed_class(3)
