"""hf_distill.checksums: manifests of checkpoint files, and what verification refuses."""

from __future__ import annotations

import hashlib
import json

import pytest

from hf_distill.safety.checksums import (
    MANIFEST_NAME,
    CheckpointIntegrityError,
    file_sha256,
    read_manifest,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "b.pt").write_bytes(b"teacher state")
    write_manifest(tmp_path)
    return tmp_path


def test_file_sha256_is_hashlibs_over_the_whole_file(tmp_path):
    data = bytes(range(256)) * 5000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_manifest_lists_every_file_with_size_and_hash(folder):
    files = read_manifest(folder)
    assert set(files) == {"a.bin", "b.pt"}
    assert files["b.pt"] == {"bytes": 13, "sha256": hashlib.sha256(b"teacher state").hexdigest()}
    verify_manifest(folder)  # intact: no error


def test_a_folder_without_manifest_reads_as_none(tmp_path):
    assert read_manifest(tmp_path) is None
    verify_manifest(tmp_path)  # nothing to verify


def test_same_size_overwrite_is_refused_naming_the_file(folder):
    (folder / "a.bin").write_bytes(b"\x00\x00" * 1000)
    with pytest.raises(CheckpointIntegrityError, match=r"a\.bin does not match the SHA-256"):
        verify_manifest(folder)


def test_truncation_is_refused_naming_the_file(folder):
    (folder / "a.bin").write_bytes(b"\x00\x01" * 10)
    with pytest.raises(CheckpointIntegrityError, match=r"a\.bin has 20 bytes but was written with 2000"):
        verify_manifest(folder)


def test_a_missing_file_is_refused_unless_allowed_absent(folder):
    (folder / "b.pt").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"b\.pt is missing"):
        verify_manifest(folder)
    verify_manifest(folder, absent_ok={"b.pt"})


def test_a_damaged_manifest_is_refused(folder):
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": 1}))
    with pytest.raises(CheckpointIntegrityError, match="not a valid checkpoint manifest"):
        verify_manifest(folder)
