"""hf_distill.safety.run_lock: one live run per output folder; a dead run's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from hf_distill.safety.run_lock import LOCK_NAME, OutputDirInUseError, acquire, output_dir_lock, release


def _write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": time.time()}
    (folder / LOCK_NAME).write_text(json.dumps(record))


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_is_held_for_the_block_and_removed_after(tmp_path):
    with output_dir_lock(tmp_path / "run") as path:
        assert path.exists()
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_second_run_on_a_live_runs_folder_is_refused_naming_it(tmp_path, live_process):
    _write_lock(tmp_path, live_process.pid)
    with pytest.raises(OutputDirInUseError, match=f"in use by another run \\(pid {live_process.pid}"):
        acquire(tmp_path)
    # The live run's lock is left as it was.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == live_process.pid


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, dead)
    with caplog.at_level(logging.WARNING, logger="hf_distill.safety.run_lock"):
        path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"from pid {dead}, which is no longer running" in caplog.text
    release(path)
    assert not path.exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, 1, host="another-machine.example")
    with pytest.raises(OutputDirInUseError, match="another-machine.example"):
        acquire(tmp_path)


def test_a_damaged_lock_file_is_replaced(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_release_leaves_another_processes_lock_alone(tmp_path, live_process):
    _write_lock(tmp_path, live_process.pid)
    release(tmp_path / LOCK_NAME)
    assert (tmp_path / LOCK_NAME).exists()


def test_disabled_lock_takes_nothing(tmp_path, live_process):
    # Ranks other than the main process take no lock, whatever the folder holds.
    _write_lock(tmp_path, live_process.pid)
    with output_dir_lock(tmp_path, enabled=False) as path:
        assert path is None
