"""Processes and devices: unwrapping models, cross-process means and broadcasts, and defaults that
depend on the hardware the run finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import broadcast, reduce
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT, DDP or DeepSpeed wrapper."""
    while True:
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engine
            model = model.module
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s parameters (each rank holds a `DTensor` shard of each)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with whole tensors: for a model FSDP2 shards, gathered with torch's full
    state-dict API (a collective: call it on every process; complete on the main process, on the CPU)."""
    if not is_sharded(model):
        return unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A `DTensor` (e.g. the gradient norm of sharded parameters) as its full value, a collective; any other
    tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# ----- whole-weight passes over a model FSDP2 shards ---------------------------------------------------------


def unsharded_skeleton(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``model``'s structure to run whole weights through with `torch.func.functional_call`,
    outside FSDP2's hooks (which put back FSDP2's own weights inside every sharded layer). Take it before
    sharding. Its trainable parameters live on the meta device (no memory: the caller passes them); its
    frozen parameters and buffers, which never change, are kept whole, on ``device``. Tied parameters stay
    tied (one object under every name), so passing one name's value serves all of them."""
    import copy

    # The copy takes a meta parameter for each trainable one (never copying its values), one per tied group.
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta")) for p in model.parameters() if p.requires_grad
    }
    skeleton = copy.deepcopy(model, memo)
    placed: dict[int, nn.Parameter] = {}
    for module in skeleton.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad:
                if id(param) not in placed:
                    placed[id(param)] = nn.Parameter(param.detach().to(device), requires_grad=False)
                setattr(module, name, placed[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return skeleton


def whole_trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s trainable parameters, whole: a sharded one all-gathered (a collective), others as they are
    (a root FSDP2 unit between its forward and backward holds its whole weights: views of them, valid until
    FSDP2 reshards it). Detached: what is differentiated is each caller's own leaf of them."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class WholeWeightsModel(nn.Module):
    """``skeleton`` (`unsharded_skeleton`) run at the whole weights ``values`` (by name): a module whose
    forward is the sharded model's forward at those weights, differentiable in them."""

    def __init__(self, skeleton: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.skeleton = skeleton
        self.values = values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.skeleton, self.values, args, kwargs)


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back in ``model``: after a forward without backward (under no_grad)
    the root unit keeps its whole weights registered, and `named_parameters` returns those instead."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def mean_into_shards(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> None:
    """Set each sharded parameter's gradient to this rank's shard of the mean over ranks of the whole
    gradient in ``grads`` (None: no gradient)."""
    from torch.distributed.tensor import distribute_tensor

    filled = [
        torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device) if g is None else g
        for p, g in zip(params, grads, strict=True)
    ]
    for param, grad, given in zip(params, all_reduce_mean(filled), grads, strict=True):
        if given is not None:  # every rank holds the same mean: each keeps its own shard, no communication
            param.grad = distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)


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


# ----- devices ---------------------------------------------------------------------------------------------


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, ROCm, MPS, XPU, ...) that pinned memory would serve."""
    return bool(torch.accelerator.is_available())  # what torch's DataLoader asks before pinning


def no_pin_memory_without_accelerator(args: Any) -> Any:
    """Turn ``args.dataloader_pin_memory`` off when there is no accelerator (or ``use_cpu``); returns ``args``.

    Pinned memory only speeds up copies to an accelerator; without one, torch's DataLoader warns at every
    loader that pinning was asked for and does nothing. `TrainingArguments` turns it off for ``use_cpu``
    only; our argument classes do it whenever no accelerator is present, and the examples apply this to
    their plain `TrainingArguments`.
    """
    if getattr(args, "dataloader_pin_memory", False) and (args.use_cpu or not accelerator_available()):
        args.dataloader_pin_memory = False
    return args
