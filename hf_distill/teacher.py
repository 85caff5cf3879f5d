"""Teacher handling: loading, freezing, placement on the training device, and compatibility checks."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast, reduce
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

logger = logging.getLogger(__name__)

SEQUENCE_CLASSIFICATION = "sequence_classification"
TOKEN_CLASSIFICATION = "token_classification"
CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"

_AUTO_CLASS = {
    SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    CAUSAL_LM: AutoModelForCausalLM,
    MASKED_LM: AutoModelForMaskedLM,
}
_CLASS_NAMES = {
    SEQUENCE_CLASSIFICATION: set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()),
    TOKEN_CLASSIFICATION: set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()),
    CAUSAL_LM: set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()),
    MASKED_LM: set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()),
}
TOKEN_LEVEL_TASKS = (TOKEN_CLASSIFICATION, CAUSAL_LM, MASKED_LM)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT, DDP or DeepSpeed wrapper."""
    while True:
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engine
            model = model.module
        else:
            return model


def task_type(model: nn.Module) -> str | None:
    """The head type of a transformers model (one of the constants above), from its class name."""
    name = type(unwrap_model(model)).__name__
    for task, names in _CLASS_NAMES.items():
        if name in names:
            return task
    return None


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model, shared ones once (DeepSpeed ZeRO-3 shards counted whole)."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in unwrap_model(model).parameters())


def forward_arg_names(model: nn.Module) -> set[str]:
    """Names the model's ``forward`` accepts explicitly (``**kwargs`` excluded)."""
    params = inspect.signature(unwrap_model(model).forward).parameters
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}


def load_teacher(
    teacher: nn.Module | str,
    student: nn.Module,
    init_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Return ``teacher`` as a module; a string is a local folder or a Hub id.

    A string is loaded with the Auto class of the student's head (a sequence-classification student gets
    ``AutoModelForSequenceClassification``), safetensors only, and ``trust_remote_code`` only if the caller
    sets it in ``init_kwargs``.
    """
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, bytes)) and not hasattr(teacher, "__fspath__"):
        raise TypeError(
            f"teacher_model must be a torch module, a local path or a Hub id (or a list of them); got "
            f"{type(teacher).__name__}."
        )
    task = task_type(student)
    if task is None:
        raise ValueError(
            f"Cannot tell which Auto class loads a teacher for a student of class "
            f"{type(unwrap_model(student)).__name__}; load the teacher yourself and pass the module."
        )
    kwargs = dict(init_kwargs or {})
    if kwargs.get("use_safetensors", True) is not True:
        raise ValueError(
            "Teachers are loaded from safetensors only (a pickled checkpoint can run code when it is loaded); "
            "remove use_safetensors from teacher_model_init_kwargs, or load the teacher yourself and pass the "
            "module."
        )
    kwargs["use_safetensors"] = True
    path = os.fsdecode(teacher)
    if os.path.isdir(path) and not any(name.endswith(".safetensors") for name in os.listdir(path)):
        pickled = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise ValueError(
            f"The teacher folder {path} has no safetensors weights"
            + (f" (only {', '.join(pickled)})" if pickled else "")
            + ". hf_distill loads teachers from safetensors only, since a pickled checkpoint can run code when "
            "it is loaded. If you trust the file, convert it once with "
            "`AutoModel.from_pretrained(path).save_pretrained(path)` (transformers writes safetensors), or "
            "load the teacher yourself and pass the module."
        )
    return _AUTO_CLASS[task].from_pretrained(path, **kwargs)


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: a frozen teacher never trains."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def output_width(model: nn.Module) -> int | None:
    """Size of the model's last logits dimension: num_labels for classifiers, vocab size for LMs."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    if task_type(model) in (CAUSAL_LM, MASKED_LM):
        return getattr(config, "vocab_size", None)
    return getattr(config, "num_labels", None)


def check_teacher_student_compatible(teacher: nn.Module, student: nn.Module, position: int = 0) -> None:
    """Raise before training if the teacher's outputs cannot be compared with the student's."""
    t_width, s_width = output_width(teacher), output_width(student)
    which = "teacher_model" if position == 0 else f"teacher_model[{position}]"
    if t_width is not None and s_width is not None and t_width != s_width:
        kind = "vocabulary size" if task_type(student) in (CAUSAL_LM, MASKED_LM) else "number of labels"
        raise ValueError(
            f"The {which} predicts {t_width} outputs but the student predicts {s_width} ({kind}). Load both "
            f"with the same num_labels (and label2id), or distil from a teacher fine-tuned on the same labels."
        )
    t_task, s_task = task_type(teacher), task_type(student)
    if t_task is not None and s_task is not None and t_task != s_task:
        raise ValueError(
            f"The {which} is a {t_task} model but the student is a {s_task} model; use the same head."
        )
    if {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}:
        raise ValueError(
            f"The {which} and the student share parameters; pass a separate copy of the teacher "
            "(e.g. copy.deepcopy(teacher))."
        )


def prepare_frozen_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Place a frozen teacher for the run the way TRL does for its reference models.

    Under DeepSpeed the teacher gets an inference engine (ZeRO-3 keeps it sharded; other stages run it
    unsharded, as stage 0); everywhere else accelerate places it on the device without a DDP wrapper.
    """
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is None:
        return freeze(accelerator.prepare_model(teacher, evaluation_mode=True))
    import deepspeed  # only present in DeepSpeed runs

    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if hidden is not None:  # bucket sizes that fit the model, as recommended for inference
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            )
    else:
        zero["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return freeze(engine)


# ----- a teacher that learns: optimizer, distributed sync, checkpoints -------------------------------------

TEACHER_CHECKPOINT_DIR = "teacher"
TEACHER_WEIGHTS_NAME = "trainable.safetensors"
TEACHER_OPTIMIZER_NAME = "optimizer.pt"
TEACHER_SCHEDULER_NAME = "scheduler.pt"


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a learning teacher updates (a PEFT teacher: its adapters only)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_teacher_can_learn(teacher: nn.Module) -> None:
    if not trainable_parameters(teacher):
        raise ValueError(
            "The teacher has no trainable parameters (every requires_grad is False), so a trainer that updates "
            "the teacher cannot train it. Unfreeze it (teacher.requires_grad_(True)), attach a LoRA adapter, "
            "or use DistillationTrainer for a frozen teacher."
        )


def enable_activation_checkpointing(model: nn.Module, role: str) -> None:
    """Non-reentrant activation checkpointing: reentrant checkpointing allows no `torch.autograd.grad`, which
    the logging steps of LGTM and the meta-gradient take through the teacher."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{role}_activation_checkpointing=True, but the {role} ({type(model).__name__}) does not support "
            "activation checkpointing; set it to False, or use a transformers model that does."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable, or a wrapper that only forwards the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_learning_teacher_supported(accelerator: Any) -> None:
    """FSDP and ZeRO-3 shard parameters across ranks, which our explicit teacher update does not handle."""
    state = getattr(accelerator, "state", None)
    if getattr(state, "fsdp_plugin", None) is not None:
        raise NotImplementedError(
            "Training the teacher under FSDP is not supported yet. Use DDP (torchrun / accelerate launch without "
            "an FSDP config), a LoRA teacher to fit memory, or DistillationTrainer with a frozen teacher (which "
            "FSDP supports)."
        )
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        raise NotImplementedError(
            "Training the teacher under DeepSpeed ZeRO-3 is not supported yet. Use ZeRO stage 1 or 2, DDP, a "
            "LoRA teacher to fit memory, or DistillationTrainer with a frozen teacher (which ZeRO-3 supports)."
        )


def create_teacher_optimizer(
    teacher: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: set[str] | list[str],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the teacher's trainable parameters, without weight decay on biases and norms (as Trainer).

    torch's fused kernel where the parameters' device and dtype have one (Trainer's default for the student,
    ``adamw_torch_fused``): on CPU the unfused step of a 22M-parameter teacher takes about 7× longer.
    """
    decay_names = set(decay_parameter_names)
    params = trainable_parameters(teacher)
    groups = [
        {"params": [p for n, p in params.items() if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n not in decay_names], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor over all processes, as one flat `accelerate.utils.reduce`; unchanged in a
    single process. Explicit because the gradients it averages come from `torch.autograd.grad`, which
    bypasses DDP's reducer."""
    if not is_distributed() or not tensors:
        return tensors
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="mean")
    return [
        chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def zeros_for_missing(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``grads`` with each ``None`` (a parameter the loss does not reach) replaced by zeros of its shape."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def average_gradients_across_processes(parameters: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over all ranks.

    The teacher is not wrapped in DDP (its gradients may come from torch.autograd.grad, which bypasses
    DDP's reducer), so its gradients are averaged explicitly.
    """
    grads = zeros_for_missing([p.grad for p in parameters], parameters)
    for p, g in zip(parameters, all_reduce_mean(grads), strict=True):
        p.grad = g


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s teacher, as DDP does for the student (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        broadcast([t.data for t in list(model.parameters()) + list(model.buffers())], from_process=src)


def save_teacher_state(
    checkpoint_dir: str | os.PathLike,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> Path:
    """Write the teacher's trainable weights (safetensors), optimizer and scheduler into ``checkpoint_dir/teacher``.

    Written to a temporary folder that is renamed at the end, so a crash never leaves a half-written
    teacher that a resume would trust.
    """
    target = Path(checkpoint_dir) / TEACHER_CHECKPOINT_DIR
    staging = Path(checkpoint_dir) / f".{TEACHER_CHECKPOINT_DIR}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    weights = {
        n: p.detach().cpu().contiguous() for n, p in trainable_parameters(unwrap_model(teacher)).items()
    }
    save_file(weights, str(staging / TEACHER_WEIGHTS_NAME), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), staging / TEACHER_OPTIMIZER_NAME)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), staging / TEACHER_SCHEDULER_NAME)
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


def load_teacher_weights(checkpoint_dir: str | os.PathLike, teacher: nn.Module) -> None:
    """Restore the teacher's trainable weights from a checkpoint written by `save_teacher_state`."""
    folder = teacher_state_dir(checkpoint_dir)
    saved = load_file(str(folder / TEACHER_WEIGHTS_NAME))
    params = trainable_parameters(unwrap_model(teacher))
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"The teacher in {folder} does not match this run's teacher (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); resume with the same teacher model and the same trainable parameters."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(device=p.device, dtype=p.dtype))


def load_teacher_optimizer_state(
    checkpoint_dir: str | os.PathLike, optimizer: torch.optim.Optimizer, scheduler: Any | None
) -> None:
    folder = teacher_state_dir(checkpoint_dir)
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    if (folder / TEACHER_OPTIMIZER_NAME).is_file():
        optimizer.load_state_dict(
            torch.load(folder / TEACHER_OPTIMIZER_NAME, map_location=device, weights_only=True)
        )
    if scheduler is not None and (folder / TEACHER_SCHEDULER_NAME).is_file():
        scheduler.load_state_dict(torch.load(folder / TEACHER_SCHEDULER_NAME, weights_only=True))
