"""Whole checkpoints, verified: a manifest of every file, written last, marks a checkpoint complete.

`Trainer` writes a checkpoint file by file into ``checkpoint-N`` and checks none of them when it resumes:
a run killed while saving leaves a folder that ``resume_from_checkpoint=True`` would pick, and a damaged
weights, optimizer or state file resumes silently or fails with an error that names no file. The trainers
write ``checkpoint_manifest.json`` (each file's size and SHA-256, the teacher's folder included) after
every other file of the checkpoint, so a folder without it is incomplete; a resume verifies every file
against it first.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .checksums import CheckpointIntegrityError, check_recorded_file, file_sha256
from .resume_changes import ARGUMENTS_FILE

logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
# Optimizer and schedule state: a checkpoint written with them that lost them would restart AdamW's
# moments or the learning-rate schedule silently (Trainer's own behaviour when they are missing).
OPTIMIZER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "teacher/optimizer.pt", "teacher/scheduler.pt")
TRAINER_STATE = "trainer_state.json"  # the last file Trainer writes into a checkpoint
_STEP = re.compile(r"^checkpoint-(\d+)$")


def write_checkpoint_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file under ``folder`` (recursively), atomically, as the last
    file of the checkpoint."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == CHECKPOINT_MANIFEST or name.endswith(".tmp"):
            continue
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    staging = folder / f"{CHECKPOINT_MANIFEST}.tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump({"format": 1, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    target = folder / CHECKPOINT_MANIFEST
    os.replace(staging, target)  # the checkpoint is complete from this rename on
    return target


def remove_checkpoint_manifest(folder: str | os.PathLike) -> None:
    """Mark a folder incomplete before it is written again (a save into an existing checkpoint folder)."""
    for name in (CHECKPOINT_MANIFEST, f"{CHECKPOINT_MANIFEST}.tmp"):
        try:
            (Path(folder) / name).unlink()
        except FileNotFoundError:
            pass


def predates_manifests(folder: str | os.PathLike) -> bool:
    """A checkpoint `Trainer` finished (its last file, ``trainer_state.json``, is there) that was written before
    manifests: without the arguments file that every save writes first, so not a save that stopped short of
    its manifest."""
    folder = Path(folder)
    return (folder / TRAINER_STATE).is_file() and not (folder / ARGUMENTS_FILE).is_file()


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CHECKPOINT_MANIFEST).is_file()


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := _STEP.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def newest_complete_checkpoint(
    output_dir: str | os.PathLike, before: str | os.PathLike | None = None
) -> Path | None:
    """The newest checkpoint of ``output_dir`` whose manifest was written (older than ``before``, if given)."""
    folders = checkpoint_folders(output_dir)
    if before is not None:
        resolved = [p.resolve() for p in folders]
        if Path(before).resolve() in resolved:
            folders = folders[: resolved.index(Path(before).resolve())]
    complete = [p for p in folders if is_complete(p)]
    return complete[-1] if complete else None


def resolve_last_checkpoint(output_dir: str | os.PathLike) -> Path:
    """``resume_from_checkpoint=True``: the newest complete checkpoint, skipping (with a warning) newer
    folders whose save did not finish. A run whose checkpoints all predate manifests resumes from the newest
    one, as `Trainer` would."""
    folders = checkpoint_folders(output_dir)
    if not folders:
        raise ValueError(f"No checkpoint found in output_dir {output_dir} to resume from.")
    complete = [p for p in folders if is_complete(p)]
    if not complete:  # written before manifests: the newest that Trainer finished, verified as such later
        finished = [p for p in folders if predates_manifests(p)]
        return (finished or folders)[-1]
    skipped = [
        p.name for p in folders if p not in complete and folders.index(p) > folders.index(complete[-1])
    ]
    if skipped:
        logger.warning(
            "Skipping %s: its save did not finish (no %s). Resuming from %s, the newest complete checkpoint.",
            ", ".join(skipped),
            CHECKPOINT_MANIFEST,
            complete[-1].name,
        )
    return complete[-1]


def _fix(folder: Path) -> str:
    earlier = newest_complete_checkpoint(folder.parent, before=folder)
    if earlier is not None:
        return f"Resume from {earlier} (the newest complete checkpoint before it)"
    return "Start a new run (no earlier complete checkpoint is in the folder)"


def verify_checkpoint(
    folder: str | os.PathLike, allow_partial: bool = False, optional: tuple[str, ...] = ()
) -> None:
    """Check every file of a checkpoint against its manifest before a resume reads any of them.

    A folder without a manifest did not finish saving (or predates manifests); a file of another size or
    SHA-256 was damaged since; a missing file was lost. Each is refused with the file, what was expected,
    what was found and the checkpoint to resume from instead. ``allow_partial`` resumes anyway from a folder
    without a manifest, or without its optimizer or schedule state (with a warning): on purpose, a fresh
    optimizer or schedule. ``optional`` names optimizer or schedule files that may be missing regardless
    (a narrower opt-out, such as ``allow_partial_teacher_checkpoint``; whoever reads them warns).
    """
    folder = Path(folder)
    manifest_path = folder / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        if predates_manifests(folder):
            logger.warning(
                "%s has no %s (written before checkpoints were verified): its files cannot be verified and are "
                "resumed as they are.",
                folder,
                CHECKPOINT_MANIFEST,
            )
            return
        message = f"{folder} has no {CHECKPOINT_MANIFEST}: its save did not finish (the run stopped while writing it)."
        if not allow_partial:
            raise CheckpointIntegrityError(
                f"{message} {_fix(folder)}, or set allow_partial_checkpoint=True to resume from it unverified."
            )
        logger.warning("%s allow_partial_checkpoint=True: resuming from it unverified.", message)
        return
    try:
        files = dict(json.loads(manifest_path.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointIntegrityError(
            f"{manifest_path} is not a valid checkpoint manifest ({err}): the checkpoint was damaged after it was "
            f"written. {_fix(folder)}."
        ) from err
    missing_state = []
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            if name in optional:
                continue
            if name in OPTIMIZER_STATE_FILES:
                missing_state.append(name)
                continue
            raise CheckpointIntegrityError(
                f"{path} is missing ({recorded['bytes']} bytes when the checkpoint was written). {_fix(folder)}."
            )
        check_recorded_file(path, recorded, f"{_fix(folder)}.")
    if missing_state and not allow_partial:
        raise CheckpointIntegrityError(
            f"{folder} lost {', '.join(missing_state)}: resuming would restart the optimizer (AdamW moments) and/or "
            f"the learning-rate schedule from the start. {_fix(folder)}, or set allow_partial_checkpoint=True to "
            "resume with a fresh optimizer or schedule on purpose"
            + (
                " (allow_partial_teacher_checkpoint=True for the teacher's alone)."
                if any(name.startswith("teacher/") for name in missing_state)
                else "."
            )
        )
    if missing_state:
        logger.warning(
            "allow_partial_checkpoint=True: resuming from %s without %s; the optimizer and/or schedule start afresh.",
            folder,
            ", ".join(missing_state),
        )
