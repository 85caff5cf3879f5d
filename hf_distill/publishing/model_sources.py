"""How a model card names a teacher, a student's base model and the training data, without the network.

A Hub id keeps its name (and the commit the local Hub cache records); a local folder is named by the Hub id
its ``config.json`` records, else by its folder name, never by a path on the author's machine. A teacher
passed in memory is named after the checkpoint it was loaded from only when it still holds that
checkpoint's weights; otherwise the card says it was initialised from that checkpoint.
"""

from __future__ import annotations

import dataclasses
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
    model built from a configuration, or passed in memory with weights of its own). ``based_on`` is the
    checkpoint such an in-memory teacher was initialised from (e.g. before you fine-tuned it): the card
    says "initialised from" it, never that it is the teacher.
    """

    id: str = LOCAL
    revision: str | None = None
    num_parameters: int | None = None
    local: bool = False
    based_on: TeacherInfo | None = None

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


def split_teacher_names(teacher_name: str) -> list[str]:
    """The names in ``teacher_name``: one per teacher, separated by commas; an empty one is an error."""
    names = [name.strip() for name in teacher_name.split(",")]
    if not all(names):
        raise ValueError(
            f"teacher_name={teacher_name!r} has an empty name: give one name per teacher, separated by "
            "commas (e.g. 'me/teacher-a,me/teacher-b')."
        )
    return names


def name_teachers(sources: list[TeacherInfo], teacher_name: str | None) -> list[TeacherInfo]:
    """``sources`` named by ``teacher_name`` (one name per teacher, in order), or unchanged when it is None.

    A name that is a Hub id (``owner/name``) is linked; any other name is shown as it is (``local``). A
    teacher keeps the checkpoint it was initialised from (``based_on``), and its revision when the name is
    its own id.
    """
    if teacher_name is None:
        return list(sources)
    names = split_teacher_names(teacher_name)
    if len(names) != len(sources):
        raise ValueError(
            f"teacher_name gives {len(names)} name{'s' if len(names) != 1 else ''} ({teacher_name!r}) for "
            f"{len(sources)} teacher{'s' if len(sources) != 1 else ''}; give one name per teacher, in the "
            "order of teacher_model, separated by commas."
        )
    return [
        source
        if name == source.id
        else TeacherInfo(
            name,
            num_parameters=source.num_parameters,
            local=not ("/" in name and is_hub_id(name)),
            based_on=source.based_on,
        )
        for source, name in zip(sources, names, strict=True)
    ]


def describe_teacher_module(model: Any) -> TeacherInfo:
    """How a card names a teacher passed as a module: by its checkpoint only if it holds that checkpoint's weights.

    ``config._name_or_path`` says where the module was loaded from, not what it holds now: after you
    fine-tune it, naming that checkpoint would credit the wrong model. When the checkpoint's safetensors
    (a local folder, or the local Hub cache) hold exactly the module's weights, the teacher is that
    checkpoint (`describe_teacher`, with the cached commit); otherwise it is ``"local"`` with ``based_on``
    naming the checkpoint. Nothing is downloaded.
    """
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    source = describe_teacher(name)
    if source.id == LOCAL:
        return TeacherInfo()
    files = _local_weight_files(name) if not is_hub_id(name) else _cached_weight_files(source.id)
    if files and _holds_weights(model, files):
        return source  # a Hub id's revision is the cached commit whose weights were compared
    return TeacherInfo(based_on=dataclasses.replace(source, revision=None))


def _local_weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        return [os.path.join(folder, shard) for shard in _shards(index)]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def _cached_weight_files(repo_id: str) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> str | None:
        try:
            path = try_to_load_from_cache(repo_id, filename)
        except Exception:  # an invalid id: nothing cached
            return None
        return path if isinstance(path, str) else None

    index = cached("model.safetensors.index.json")
    if index is None:
        single = cached("model.safetensors")
        return [single] if single else []
    shards = [cached(shard) for shard in _shards(index)]
    return shards if all(shards) else []


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as file:
            return sorted(set(json.load(file)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError):
        return []


def _holds_weights(model: Any, files: list[str]) -> bool:
    """Whether every parameter and buffer of ``model`` equals the tensor of the same name in ``files``.

    A parameter missing from the files (a task head initialised at random, a PEFT adapter) or a different
    value (a fine-tuned weight) means the module is not that checkpoint. Compared in the module's dtype; a
    module FSDP2 shards is not compared (unverified).
    """
    import torch
    from safetensors import safe_open

    from ..distributed import is_sharded

    if is_sharded(model):  # each rank holds a shard: comparing would take a gather on every process
        return False
    state = model.state_dict()
    seen: set[str] = set()
    try:
        for path in files:
            with safe_open(path, framework="pt") as weights:
                for key in weights.keys():
                    if key not in state:
                        continue
                    mine = state[key].detach()
                    theirs = weights.get_tensor(key).to(device=mine.device, dtype=mine.dtype)
                    if mine.shape != theirs.shape or not torch.equal(mine, theirs):
                        return False
                    seen.add(key)
    except (OSError, ValueError, RuntimeError):  # unreadable weights: unverified
        return False
    # A tied weight is saved once, under one of its names: the others count as compared.
    return bool(seen) and {name for name, _ in model.named_parameters()} <= _tied_aliases(model, seen)


def _tied_aliases(model: Any, seen: set[str]) -> set[str]:
    """``seen``, plus the other names of parameters tied to one of them."""
    by_tensor: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), set()).add(name)
    return {name for names in by_tensor.values() if names & seen for name in names}


def dataset_name_and_tags(dataset: Any) -> tuple[str | None, list[str]]:
    """A `datasets.Dataset`'s name (``builder/config``) and Hub tag, or (None, []) when it has none."""
    info = getattr(dataset, "info", None)
    builder = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if not builder or builder in _FILE_BUILDERS:
        return None, []
    config = getattr(info, "config_name", None)
    name = builder if not config or config == "default" else f"{builder}/{config}"
    return name, [builder]
