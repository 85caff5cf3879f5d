"""A teacher that learns: its trainable parameters, its optimizer, activation checkpointing, and
where training it is supported.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .master_weights import MasterWeightsAdamW, has_half_precision

logger = logging.getLogger(__name__)


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a learning teacher updates (a PEFT teacher: its adapters only)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_teacher_can_learn(teacher: nn.Module) -> None:
    if not trainable_parameters(teacher):
        raise ValueError(
            "The teacher has no trainable parameters (every requires_grad is False), so a trainer that updates "
            "the teacher cannot train it. A likely cause: a DistillationTrainer built on this teacher froze it "
            "in place. Unfreeze it (teacher.requires_grad_(True)), give each trainer its own copy "
            "(copy.deepcopy(teacher)), attach a LoRA adapter, or use DistillationTrainer for a frozen teacher."
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
            "Training the teacher under FSDP is not supported yet: the teacher's update takes gradients with "
            "torch.autograd.grad and averages them across ranks with all-reduces of whole tensors, which FSDP's "
            "sharded parameters do not take part in, and it would need the teacher whole on every rank. Use DDP "
            "(torchrun / accelerate launch without an FSDP config), a LoRA teacher to fit memory, or "
            "DistillationTrainer with a frozen teacher (which FSDP2 shards like the student)."
        )
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        raise NotImplementedError(
            "Training the teacher under DeepSpeed ZeRO-3 is not supported yet: the meta and LGTM updates read and "
            "perturb the student's weights outside its forward, where ZeRO-3 holds only each rank's partition "
            "(online distillation shares their teacher update and is refused with them until it is tested). "
            "Use ZeRO stage 1 or 2, DDP, a LoRA teacher to fit memory, or DistillationTrainer with a frozen "
            "teacher (which ZeRO-3 shards in an inference engine)."
        )


def create_teacher_optimizer(
    teacher: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: set[str] | list[str],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fp32_master_weights: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the teacher's trainable parameters, without weight decay on biases and norms (as Trainer).

    torch's fused kernel where the parameters' device and dtype have one (Trainer's default for the student,
    ``adamw_torch_fused``): on CPU the unfused step of a 22M-parameter teacher takes about 7× longer. With
    ``fp32_master_weights`` and half-precision trainable parameters, a `MasterWeightsAdamW` that steps float32
    copies of them (a pure-bf16 AdamW rounds most of the teacher's small updates away).
    """
    decay_names = set(decay_parameter_names)
    params = trainable_parameters(teacher)
    groups = [
        {"params": [p for n, p in params.items() if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n not in decay_names], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer_class = (
        MasterWeightsAdamW
        if fp32_master_weights and has_half_precision(params.values())
        else torch.optim.AdamW
    )
    try:
        return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps)
