"""hf_distill.model_sources: how cards name teachers, base models and data, without the network."""

from __future__ import annotations

import json

import datasets

from hf_distill.publishing.model_sources import (
    LOCAL,
    TeacherInfo,
    dataset_name_and_tags,
    describe_source,
    describe_teacher,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_describe_source(tmp_path, monkeypatch):
    assert describe_source(str(tmp_path)) == (LOCAL, None)
    assert describe_source("") == (LOCAL, None)
    assert describe_source("/no/such/folder") == (LOCAL, None)
    assert describe_source("org/teacher", "v1") == ("org/teacher", "v1")
    assert describe_source("org/teacher", COMMIT) == ("org/teacher", COMMIT)
    # A model in the local Hub cache: its revision resolves to the cached commit, without the network.
    repo = tmp_path / "cache" / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    assert describe_source("org/cached") == ("org/cached", COMMIT)


def test_describe_teacher_names_a_local_folder_by_its_recorded_hub_id_or_its_name(tmp_path):
    plain = tmp_path / "runs" / "mrpc-teacher"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert describe_teacher(str(plain)) == TeacherInfo("mrpc-teacher", local=True)
    recorded = tmp_path / "copy"
    recorded.mkdir()
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "org/teacher"}))
    assert describe_teacher(recorded) == TeacherInfo("org/teacher")
    # A recorded path (not a Hub id) does not count; nothing at all is "local".
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": str(plain)}))
    assert describe_teacher(recorded) == TeacherInfo("copy", local=True)
    assert describe_teacher("") == TeacherInfo(LOCAL) and describe_teacher(None) == TeacherInfo(LOCAL)
    assert describe_teacher("org/teacher", "v1") == TeacherInfo("org/teacher", "v1")


def test_dataset_name_and_tags():
    plain = datasets.Dataset.from_dict({"label": [0, 1]})
    assert dataset_name_and_tags(plain) == (None, [])
    info = datasets.DatasetInfo(builder_name="glue", config_name="sst2", dataset_name="glue")
    named = datasets.Dataset.from_dict({"label": [0, 1]}, info=info)
    assert dataset_name_and_tags(named) == ("glue/sst2", ["glue"])
    from_csv = datasets.Dataset.from_dict({"label": [0]}, info=datasets.DatasetInfo(builder_name="csv"))
    assert dataset_name_and_tags(from_csv) == (None, [])
    assert dataset_name_and_tags(None) == (None, [])
