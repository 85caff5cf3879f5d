"""One run per output folder: a lock file held for the run's lifetime.

Two runs pointed at the same ``output_dir`` both report success while each overwrites the other's
checkpoints. The first run to start writes ``.hf_distill_run.lock`` (its pid, host and start time); a
second one is refused while that process lives. A lock left by a killed run (its pid gone on this host)
is taken over with a warning, so resuming after a crash needs no clean-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".hf_distill_run.lock"


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output folder's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being written, or damaged: treated as stale below
    return holder if isinstance(holder, dict) else None


def _holder_is_live(holder: dict | None) -> bool:
    """Whether the lock's writer may still be running: on another host that cannot be told, so yes."""
    if holder is None or not isinstance(holder.get("pid"), int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    return holder["pid"] != os.getpid() and _process_alive(holder["pid"])


def acquire(output_dir: str | os.PathLike) -> Path:
    """Take the output folder's lock, or raise `OutputDirInUseError` naming the run that holds it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if _holder_is_live(holder):
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise OutputDirInUseError(
                    f"output_dir {folder} is in use by another run (pid {holder['pid']} on {holder['host']}, "
                    f"started {started}): two runs in one folder overwrite each other's checkpoints. Wait for "
                    f"it to finish or give this run another output_dir. If that run is gone (another machine "
                    f"sharing the folder), delete {path}."
                ) from None
            if holder is not None and holder.get("pid") != os.getpid():
                logger.warning(
                    "Taking over the lock of output_dir %s from pid %s, which is no longer running (a run that "
                    "was killed or crashed).",
                    folder,
                    holder.get("pid"),
                )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(record)
        return path
    raise OutputDirInUseError(f"Could not take the lock {path}: another run took it at the same moment.")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the output folder's lock for the ``with`` block (``enabled=False``, as on every rank but the
    main process, takes none)."""
    if not enabled:
        yield None
        return
    path = acquire(output_dir)
    try:
        yield path
    finally:
        release(path)
