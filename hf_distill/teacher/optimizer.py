"""A teacher that learns: its trainable parameters, its optimizer, activation checkpointing, and
where training it is supported.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..distributed import is_sharded
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


def check_learning_teacher_supported(
    accelerator: Any, trainer_name: str = "This trainer", shards_under_fsdp2: bool = False
) -> None:
    """Refuse the sharding engines a learning teacher cannot train under, with the reason and a way forward.

    ``shards_under_fsdp2``: the trainer's teacher update runs under FSDP2 with its teacher sharded like the
    student: plain backward passes (online distillation), or passes on gathered whole weights (meta, LGTM).
    A trainer whose update differentiates through a virtual update of the student's weights by plain passes
    is refused: FSDP2 hides those weights from them (docs/algorithms.md, "Teachers that learn, sharded").
    """
    state = getattr(accelerator, "state", None)
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        raise NotImplementedError(
            f"{trainer_name} does not train its teacher under FSDP1, which accelerate leaves unsharded outside "
            "the student's wrapper. Set fsdp_version: 2 (accelerate) or fsdp_config={'version': 2} "
            "(TrainingArguments)"
            + (", which shards the teacher like the student." if shards_under_fsdp2 else ", or use DDP.")
        )
    if fsdp_plugin is not None and not shards_under_fsdp2:
        raise NotImplementedError(
            f"{trainer_name} cannot train its teacher under FSDP2: its teacher update differentiates through a "
            "virtual update of the student's weights (torch.autograd.grad and torch.func.functional_call over "
            "the student's parameters), and FSDP2 hides those weights from both. torch.autograd.grad with respect "
            "to the sharded parameters returns no gradient at all (the graph reaches only FSDP2's all-gathered "
            "copies, whose gradients its own backward hooks move to the shards), and inside every fully_shard "
            "unit FSDP2 replaces the values functional_call passes with its own. MetaDistillTrainer and "
            "LGTMTrainer run these passes on gathered whole weights (QuizDistillTrainer.whole_weights); this "
            "trainer does not. Use DDP (torchrun / accelerate launch without an FSDP config), one of the "
            "trainers whose teachers FSDP2 shards (OnlineDistillTrainer, MetaDistillTrainer, LGTMTrainer), or "
            "DistillationTrainer with a frozen teacher."
        )
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        raise NotImplementedError(
            f"{trainer_name} does not train its teacher under DeepSpeed ZeRO-3: a ZeRO-3 teacher that learns needs "
            "its own DeepSpeed training engine (its partitioned optimizer, its gradients reduced by the engine), "
            "which one accelerate run does not build for a second model, and the meta and LGTM updates also read "
            "and perturb the student's weights outside its forward, where ZeRO-3 holds only each rank's "
            "partition. Use FSDP2 (which shards the teacher of OnlineDistillTrainer, MetaDistillTrainer and "
            "LGTMTrainer), ZeRO stage 1 or 2, DDP, a LoRA teacher to fit memory, or DistillationTrainer with a "
            "frozen teacher (which ZeRO-3 shards in an inference engine)."
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
    master_weights = fp32_master_weights and has_half_precision(params.values())
    if master_weights and is_sharded(teacher):
        raise ValueError(
            "The teacher's trainable weights are in half precision and FSDP2 shards them, where "
            "teacher_fp32_master_weights=True cannot keep its float32 copies (they would not be sharded). Load "
            "the teacher in float32 and let FSDP2's mixed precision compute in bf16 (--bf16, or "
            "mixed_precision_policy in the FSDP config): its sharded float32 weights are the master weights. Or "
            "set teacher_fp32_master_weights=False to step the half-precision weights directly."
        )
    groups = [
        {"params": [p for n, p in params.items() if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n not in decay_names], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer_class = MasterWeightsAdamW if master_weights else torch.optim.AdamW
    try:
        return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps)
