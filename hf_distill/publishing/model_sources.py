"""How a model card names a teacher, a student's base model and the training data, without the network.

A Hub id keeps its name (and the commit the local Hub cache records); a local folder is named by the Hub id
its ``config.json`` records, else by its folder name, never by a path on the author's machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL = "local"

# Datasets made from local files: their builder names are not datasets on the Hub.
_FILE_BUILDERS = {
    "csv",
    "json",
    "pandas",
    "parquet",
    "text",
    "arrow",
    "generator",
    "imagefolder",
    "audiofolder",
}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class TeacherInfo:
    """Where a teacher came from, its revision when known, and its size.

    ``id`` is a Hub id, or with ``local=True`` the name of the local folder it was loaded from (a card on
    the Hub names it without the path on the author's machine); ``"local"`` when nothing names it (a
    model built from a configuration).
    """

    id: str = LOCAL
    revision: str | None = None
    num_parameters: int | None = None
    local: bool = False

    @property
    def on_hub(self) -> bool:
        """Whether ``id`` is a Hub repository the card can link to."""
        return not self.local and self.id != LOCAL


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` reads as a Hub repository id rather than a local folder."""
    if not isinstance(name, str) or not name or os.path.exists(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of ``repo_id`` at ``revision`` as recorded in the local Hub cache (no network), or None."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid id or revision: nothing to report
        return None
    if isinstance(path, str):
        commit = Path(path).parent.name
        if _COMMIT.match(commit):
            return commit
    return None


def describe_source(name_or_path: Any, revision: str | None = None) -> tuple[str, str | None]:
    """(id, revision) of a model given as a string or read from ``config._name_or_path``.

    A Hub id keeps its name and gets the cached commit of ``revision`` when the cache has it (else
    ``revision`` itself); a local folder, or a model built from a configuration, is ``("local", None)``:
    a card on the Hub should not carry a path on the author's machine.
    """
    name = os.fspath(name_or_path) if hasattr(name_or_path, "__fspath__") else name_or_path
    if not is_hub_id(name):
        return LOCAL, None
    return name, cached_commit(name, revision) or revision


def recorded_hub_id(folder: str | os.PathLike) -> str | None:
    """The Hub id a local model folder's ``config.json`` records as its ``_name_or_path``, or None."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            recorded = json.load(file).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if is_hub_id(recorded) else None


def describe_teacher(name_or_path: Any, revision: str | None = None) -> TeacherInfo:
    """How a card names a teacher given as a string, or read from a loaded model's ``config._name_or_path``.

    A Hub id keeps its name and gets the cached commit of ``revision`` (see `describe_source`). A local
    folder is named by the Hub id its ``config.json`` records (``_name_or_path``), else by the folder's
    name (``local=True``); never by its full path. Anything else (an empty name: a model built from a
    configuration) is ``"local"``.
    """
    name = os.fspath(name_or_path) if hasattr(name_or_path, "__fspath__") else name_or_path
    if is_hub_id(name):
        identity, resolved = describe_source(name, revision)
        return TeacherInfo(identity, resolved)
    if isinstance(name, str) and name and os.path.isdir(name):
        recorded = recorded_hub_id(name)
        if recorded is not None:
            return TeacherInfo(recorded)
        return TeacherInfo(Path(name).resolve().name, local=True)
    return TeacherInfo()


def dataset_name_and_tags(dataset: Any) -> tuple[str | None, list[str]]:
    """A `datasets.Dataset`'s name (``builder/config``) and Hub tag, or (None, []) when it has none."""
    info = getattr(dataset, "info", None)
    builder = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if not builder or builder in _FILE_BUILDERS:
        return None, []
    config = getattr(info, "config_name", None)
    name = builder if not config or config == "default" else f"{builder}/{config}"
    return name, [builder]
