"""A learning teacher's state in a checkpoint: written atomically with a SHA-256 manifest, verified
before a resume trusts it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import full_state_dict, is_sharded, unwrap_model
from ..safety.checksums import (
    MANIFEST_NAME,
    CheckpointIntegrityError,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from ..safety.nonfinite import check_finite_tensors
from .optimizer import trainable_parameters

logger = logging.getLogger(__name__)


TEACHER_CHECKPOINT_DIR = "teacher"


TEACHER_WEIGHTS_NAME = "trainable.safetensors"


TEACHER_OPTIMIZER_NAME = "optimizer.pt"


TEACHER_SCHEDULER_NAME = "scheduler.pt"


@dataclass
class TeacherCheckpointState:
    """What a checkpoint holds of a learning teacher: its trainable weights, optimizer and schedule."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None


def gather_teacher_state(
    teacher: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any | None
) -> TeacherCheckpointState:
    """The teacher's checkpoint state, whole, on the CPU; call it on every process.

    A teacher that FSDP2 shards is gathered with torch's full state-dict API (a collective; the result is
    complete on the main process only), its optimizer state then keyed by parameter name.
    """
    params = trainable_parameters(unwrap_model(teacher))
    if is_sharded(teacher):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = full_state_dict(teacher)  # complete on the main process, empty on the others
        missing = sorted(set(params) - set(full)) if full else []
        if missing:
            raise RuntimeError(
                f"The teacher's gathered state lacks trainable weights {missing[:5]}; the checkpoint would be "
                "partial. This is a bug: please report it with the teacher's type and FSDP configuration."
            )
        weights = {n: full[n] for n in params if n in full}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = (
            get_optimizer_state_dict(teacher, optimizer, options=options) if optimizer is not None else None
        )
    else:
        weights = {n: p.detach().cpu().contiguous() for n, p in params.items()}
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
    return TeacherCheckpointState(weights, optimizer_state, scheduler.state_dict() if scheduler else None)


def save_teacher_state(checkpoint_dir: str | os.PathLike, state: TeacherCheckpointState) -> Path:
    """Write the teacher's trainable weights (safetensors), optimizer and scheduler into ``checkpoint_dir/teacher``.

    ``state`` comes from `gather_teacher_state`. Written to a temporary folder that is renamed at the end,
    so a crash never leaves a half-written teacher that a resume would trust; ``manifest.json`` records
    each file's size and SHA-256.
    """
    check_finite_tensors(state.weights.items(), "teacher", "write the teacher into a checkpoint")
    target = Path(checkpoint_dir) / TEACHER_CHECKPOINT_DIR
    staging = Path(checkpoint_dir) / f".{TEACHER_CHECKPOINT_DIR}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(state.weights, str(staging / TEACHER_WEIGHTS_NAME), metadata={"format": "pt"})
    if state.optimizer is not None:
        torch.save(state.optimizer, staging / TEACHER_OPTIMIZER_NAME)
    if state.scheduler is not None:
        torch.save(state.scheduler, staging / TEACHER_SCHEDULER_NAME)
    write_manifest(staging)  # verified before a resume trusts these files
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def teacher_state_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """The teacher folder of a checkpoint, or a clear error if the checkpoint has none."""
    folder = Path(checkpoint_dir) / TEACHER_CHECKPOINT_DIR
    if not (folder / TEACHER_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir} holds no teacher state ({folder / TEACHER_WEIGHTS_NAME} is missing): it "
            "was not written by a trainer whose teacher learns, or the run stopped while saving it. Resume "
            "from an earlier checkpoint, or start a new run."
        )
    return folder


def check_teacher_checkpoint(checkpoint_dir: str | os.PathLike, allow_partial: bool = False) -> Path:
    """The checkpoint's teacher folder, once its files are known to be complete and unaltered.

    Every file must match the SHA-256 recorded when it was written (a checkpoint from before manifests is
    resumed with a warning). A folder that lost the teacher's optimizer or schedule (listed in its manifest,
    or, without a manifest, absent) is refused, since resuming would silently restart the teacher's AdamW
    moments or its learning-rate schedule, unless ``allow_partial`` (then with a warning).
    """
    folder = teacher_state_dir(checkpoint_dir)
    # A missing optimizer or schedule gets the specific message below, with its opt-out.
    verify_manifest(folder, absent_ok={TEACHER_OPTIMIZER_NAME, TEACHER_SCHEDULER_NAME})
    manifest = read_manifest(folder)
    if manifest is None:
        logger.warning(
            "The teacher state in %s has no %s (written by hf_distill before checksums were recorded): its files "
            "cannot be verified and are resumed as they are.",
            folder,
            MANIFEST_NAME,
        )
    # What the manifest lists was written and must be there (a state saved without a scheduler lists none);
    # a checkpoint from before manifests must hold both.
    expected = [
        n for n in (TEACHER_OPTIMIZER_NAME, TEACHER_SCHEDULER_NAME) if manifest is None or n in manifest
    ]
    missing = [n for n in expected if not (folder / n).is_file()]
    if missing and not allow_partial:
        raise CheckpointIntegrityError(
            f"The teacher state in {folder} has no {' or '.join(missing)}: resuming would restart the teacher's "
            "optimizer (AdamW moments) and/or its learning-rate schedule from the start. Resume from a complete "
            "checkpoint, or set allow_partial_teacher_checkpoint=True to resume with a fresh teacher optimizer or "
            "schedule on purpose."
        )
    if missing:
        logger.warning(
            "allow_partial_teacher_checkpoint=True: resuming without the teacher's %s from %s; the teacher's "
            "optimizer and/or schedule start afresh.",
            " and ".join(missing),
            folder,
        )
    return folder


def _load_checkpoint_file(path: Path, load: Any) -> Any:
    """``load(path)``, with a message naming the file when it cannot be read (truncated, overwritten)."""
    try:
        return load(path)
    except Exception as err:  # safetensors and torch.load raise many types for a damaged file
        raise CheckpointIntegrityError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it was "
            "damaged or truncated after the checkpoint was written. Resume from an earlier checkpoint."
        ) from err


def load_teacher_weights(
    checkpoint_dir: str | os.PathLike, teacher: nn.Module, allow_partial: bool = False
) -> None:
    """Restore the teacher's trainable weights from a checkpoint written by `save_teacher_state`, after
    `check_teacher_checkpoint` has verified its files."""
    folder = check_teacher_checkpoint(checkpoint_dir, allow_partial)
    saved = _load_checkpoint_file(folder / TEACHER_WEIGHTS_NAME, lambda p: load_file(str(p)))
    params = trainable_parameters(unwrap_model(teacher))
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"The teacher in {folder} does not match this run's teacher (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); resume with the same teacher model and the same trainable parameters."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_as_held(saved[name], p))


def _as_held(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole saved weight) as ``param`` holds it: this rank's shard of it under FSDP2."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = full.to(device=param.device_mesh.device_type, dtype=param.dtype)
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full.to(device=param.device, dtype=param.dtype)


def load_teacher_optimizer_state(
    checkpoint_dir: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    teacher: nn.Module | None = None,
) -> None:
    """Restore what the checkpoint holds of the teacher's optimizer and scheduler (checked complete, or
    allowed partial, by `check_teacher_checkpoint` when the weights were loaded).

    A state gathered from a sharded teacher is keyed by parameter name: it goes through torch's full
    state-dict API, which shards it again for an FSDP2 ``teacher`` (and fits an unsharded one too). A
    numbered state (an unsharded run's) resumed into a sharded ``teacher`` is keyed by name first.
    """
    folder = teacher_state_dir(checkpoint_dir)
    if (folder / TEACHER_OPTIMIZER_NAME).is_file():
        # On the CPU: a whole state for a sharded teacher is sharded from there, never whole on a device.
        saved = _load_checkpoint_file(
            folder / TEACHER_OPTIMIZER_NAME, lambda p: torch.load(p, map_location="cpu", weights_only=True)
        )
        if teacher is not None and is_sharded(teacher) and not _keyed_by_name(saved):
            saved = _keyed_by_name_from(saved, optimizer, teacher)  # written by an unsharded run
        if _keyed_by_name(saved):
            if teacher is None:
                raise ValueError(
                    f"{folder / TEACHER_OPTIMIZER_NAME} is keyed by parameter name: pass the teacher."
                )
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                teacher, optimizer, saved, options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(saved)  # moves the state to its parameters' devices
    if scheduler is not None and (folder / TEACHER_SCHEDULER_NAME).is_file():
        scheduler.load_state_dict(
            _load_checkpoint_file(folder / TEACHER_SCHEDULER_NAME, lambda p: torch.load(p, weights_only=True))
        )


def _keyed_by_name_from(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, teacher: nn.Module
) -> dict[str, Any]:
    """A numbered ``Optimizer.state_dict`` (an unsharded run's) keyed by parameter name instead, for torch's full
    state-dict API. The numbers follow the order of ``optimizer``'s groups, which this run builds as that run
    did (`create_teacher_optimizer`)."""
    name_of_param = {id(p): n for n, p in teacher.named_parameters()}
    names = [name_of_param[id(p)] for group in optimizer.param_groups for p in group["params"]]
    numbers = [i for group in saved["param_groups"] for i in group["params"]]
    if len(numbers) != len(names) or len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"The teacher optimizer state in the checkpoint covers {len(numbers)} parameters in "
            f"{len(saved['param_groups'])} groups; this run's teacher optimizer has {len(names)} in "
            f"{len(optimizer.param_groups)}. Resume with the same teacher and trainable parameters."
        )
    name_of = dict(zip(numbers, names, strict=True))
    return {
        "state": {name_of[i]: state for i, state in saved["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict names its parameters (torch's full state-dict API) rather than
    numbering them (``Optimizer.state_dict``)."""
    state = optimizer_state.get("state", {})
    groups = optimizer_state.get("param_groups", [])
    keys = list(state) + [p for g in groups for p in g.get("params", [])]
    return any(isinstance(k, str) for k in keys)
