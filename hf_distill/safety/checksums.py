"""Checksums of the files we write into checkpoints, verified before a resume trusts them.

`Trainer` verifies nothing of the student's files; the learning teacher's folder (weights, optimizer,
schedule) is ours, so each file's SHA-256 and size are recorded in ``manifest.json`` when it is written and
checked before a resume reads it: zeros written over a file, a truncated copy or a swapped file are refused
with a message that names the file, instead of resuming with a damaged teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or altered since it was written."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file in ``folder`` (not recursive) in ``folder/manifest.json``."""
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    target = folder / MANIFEST_NAME
    target.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    return target


def read_manifest(folder: str | os.PathLike) -> dict[str, dict] | None:
    """The ``files`` entry of ``folder/manifest.json``, or None when the folder has no manifest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointIntegrityError(
            f"{path} is not a valid checkpoint manifest ({err}); the checkpoint was damaged after it was written. "
            "Resume from an earlier checkpoint."
        ) from err


def check_recorded_file(path: Path, recorded: dict, fix: str) -> None:
    """Raise `CheckpointIntegrityError` when ``path`` no longer has the size or SHA-256 ``recorded`` when it
    was written; the message names the file, both values and ``fix`` (what to resume from instead)."""
    size = path.stat().st_size
    if size != recorded["bytes"]:
        raise CheckpointIntegrityError(
            f"{path} has {size} bytes but was written with {recorded['bytes']} (truncated or overwritten since the "
            f"checkpoint was saved). {fix}"
        )
    digest = file_sha256(path)
    if digest != recorded["sha256"]:
        raise CheckpointIntegrityError(
            f"{path} does not match the SHA-256 recorded when the checkpoint was written: {digest[:16]}… instead of "
            f"{recorded['sha256'][:16]}… (its content changed since). {fix}"
        )


def verify_manifest(folder: str | os.PathLike, absent_ok: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise `CheckpointIntegrityError` naming the first file of the manifest that is missing (unless listed in
    ``absent_ok``), of another size, or of another SHA-256 than when it was written."""
    folder = Path(folder)
    files = read_manifest(folder)
    for name, recorded in (files or {}).items():
        path = folder / name
        if not path.is_file():
            if name in absent_ok:
                continue
            raise CheckpointIntegrityError(
                f"{path} is missing, but the checkpoint was written with it. Resume from an earlier checkpoint."
            )
        check_recorded_file(path, recorded, "Resume from an earlier checkpoint.")
