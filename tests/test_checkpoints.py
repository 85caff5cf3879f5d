"""hf_distill.safety.checkpoints: whole-checkpoint manifests, which checkpoint a resume picks, and what
verification refuses — on folders written here, without trainers."""

from __future__ import annotations

import json
import logging

import pytest

from hf_distill.safety.checkpoints import (
    CHECKPOINT_MANIFEST,
    checkpoint_folders,
    is_complete,
    remove_checkpoint_manifest,
    resolve_last_checkpoint,
    verify_checkpoint,
    write_checkpoint_manifest,
)
from hf_distill.safety.checksums import CheckpointIntegrityError, file_sha256


def _checkpoint(root, step, complete=True, trainer_state=True, legacy=False):
    """A checkpoint folder as the trainers write it (``legacy``: as written before manifests, without the
    arguments file every save now writes first)."""
    folder = root / f"checkpoint-{step}"
    (folder / "teacher").mkdir(parents=True)
    if not legacy:
        (folder / "distillation_args.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * step)
    (folder / "optimizer.pt").write_bytes(b"adam" * step)
    (folder / "teacher" / "optimizer.pt").write_bytes(b"teacher-adam")
    if trainer_state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_checkpoint_manifest(folder)
    return folder


def test_the_manifest_covers_every_file_recursively_with_size_and_digest(tmp_path):
    folder = _checkpoint(tmp_path, 2)
    files = json.loads((folder / CHECKPOINT_MANIFEST).read_text())["files"]
    assert set(files) == {
        "distillation_args.json",
        "model.safetensors",
        "optimizer.pt",
        "teacher/optimizer.pt",
        "trainer_state.json",
    }
    assert files["model.safetensors"] == {
        "bytes": 512,
        "sha256": file_sha256(folder / "model.safetensors"),
    }
    assert not (folder / f"{CHECKPOINT_MANIFEST}.tmp").exists()
    verify_checkpoint(folder)
    remove_checkpoint_manifest(folder)
    assert not is_complete(folder)


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (10, 2, 9):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]


def test_resume_true_takes_the_newest_complete_checkpoint_and_names_what_it_skips(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False, trainer_state=False)
    _checkpoint(tmp_path, 8, complete=False)  # killed just before its manifest
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.checkpoints"):
        assert resolve_last_checkpoint(tmp_path).name == "checkpoint-4"
    assert "Skipping checkpoint-6, checkpoint-8: its save did not finish" in caplog.text


def test_a_run_from_before_manifests_resumes_from_its_newest_finished_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2, complete=False, legacy=True)
    _checkpoint(tmp_path, 4, complete=False, trainer_state=False, legacy=True)  # unfinished
    assert resolve_last_checkpoint(tmp_path).name == "checkpoint-2"
    with pytest.raises(ValueError, match="No checkpoint found"):
        resolve_last_checkpoint(tmp_path / "empty")


def test_verification_names_the_file_the_sizes_and_the_earlier_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    folder = _checkpoint(tmp_path, 4)
    (folder / "optimizer.pt").write_bytes(b"adam")
    with pytest.raises(
        CheckpointIntegrityError, match=r"optimizer\.pt has 4 bytes but was written with 16.*checkpoint-2"
    ):
        verify_checkpoint(folder)
    (folder / "optimizer.pt").write_bytes(b"ADAM" * 4)  # same size, other content
    with pytest.raises(
        CheckpointIntegrityError,
        match=r"optimizer\.pt does not match the SHA-256 recorded when the checkpoint was written: [0-9a-f]{16}… instead of",
    ):
        verify_checkpoint(folder)


def test_lost_optimizer_state_is_refused_unless_allowed_or_optional(tmp_path, caplog):
    folder = _checkpoint(tmp_path, 2)
    (folder / "teacher" / "optimizer.pt").unlink()
    with pytest.raises(
        CheckpointIntegrityError, match=r"lost teacher/optimizer\.pt.*allow_partial_teacher_checkpoint"
    ):
        verify_checkpoint(folder)
    verify_checkpoint(folder, optional=("teacher/optimizer.pt",))  # the narrower opt-out: no error
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.checkpoints"):
        verify_checkpoint(folder, allow_partial=True)
    assert "without teacher/optimizer.pt" in caplog.text
    (folder / "model.safetensors").unlink()  # weights are never optional
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors is missing \(512 bytes"):
        verify_checkpoint(folder, allow_partial=True)


def test_an_unfinished_folder_is_refused_and_a_finished_unverified_one_warns(tmp_path, caplog):
    unfinished = _checkpoint(tmp_path, 2, complete=False, trainer_state=False)
    with pytest.raises(CheckpointIntegrityError, match="its save did not finish"):
        verify_checkpoint(unfinished)
    stopped_before_its_manifest = _checkpoint(tmp_path, 3, complete=False)  # Trainer's files all there
    with pytest.raises(CheckpointIntegrityError, match="its save did not finish"):
        verify_checkpoint(stopped_before_its_manifest)
    older = _checkpoint(tmp_path, 4, complete=False, legacy=True)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.checkpoints"):
        verify_checkpoint(older)
    assert "cannot be verified" in caplog.text
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / CHECKPOINT_MANIFEST).write_text("garbage")
    with pytest.raises(CheckpointIntegrityError, match="is not a valid checkpoint manifest"):
        verify_checkpoint(tmp_path / "checkpoint-6")
