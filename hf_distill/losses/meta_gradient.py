"""The math of meta distillation: the differentiable pilot step and the meta-gradient, as pure functions,
and the checks that a model can be differentiated twice (https://hf-distill.readthedocs.io/algorithms/, "Meta distillation")."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import unwrap_model

# Attention implementations whose kernels can be differentiated twice (SDPA on its math backend).
DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")

_SECOND_ORDER_FIXES = (
    "Fixes: load the student with attn_implementation='eager' or 'sdpa' (meta steps run SDPA on its math "
    "backend); keep activation checkpointing non-reentrant (activation_checkpointing_kwargs={'use_reentrant': "
    "False}, the transformers default) or turn it off; do not compile the model; replace custom autograd "
    "functions marked @once_differentiable. Or use LGTMTrainer or OnlineDistillTrainer, which need no "
    "second-order gradients."
)
# Fragments of the errors torch raises when a graph cannot be differentiated twice.
_DOUBLE_BACKWARD_ERRORS = (
    "derivative for",
    "once_differentiable",
    "differentiate twice",
    "double backward",
    "use_reentrant",
)


# ----- pure functions ---------------------------------------------------------------------------------------


def pilot_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], learning_rate: float
) -> list[torch.Tensor]:
    """The pilot student ``θs' = θs − η · g``, one plain gradient step.

    Differentiable: when ``grads`` were taken with ``create_graph=True`` the result keeps their graph, so
    θs' is a function of whatever the gradients depend on (the teacher, in meta distillation).
    """
    return [p - learning_rate * g for p, g in zip(params, grads, strict=True)]


def meta_gradient(
    pilot_params: Sequence[torch.Tensor],
    quiz_grads: Sequence[torch.Tensor],
    teacher_params: Sequence[torch.Tensor],
    extra_losses: Sequence[tuple[torch.Tensor, float]] = (),
) -> list[torch.Tensor | None]:
    """∇θt of the quiz loss after the pilot step (plus ``Σ weight · loss`` of ``extra_losses``).

    Back-propagation continued from θs' into the teacher: with ``v = ∂Q/∂θs'`` (``quiz_grads``) the chain rule
    gives ``∂Q/∂θt = (∂θs'/∂θt)ᵀ v = −η (∂g/∂θt)ᵀ v``, one vector-Jacobian product through the pilot's
    gradient graph (a double backward through the student, a first-order backward through the teacher).
    The student's parameters are not inputs, so their ``.grad`` is never touched. Unused teacher
    parameters get ``None``.
    """
    outputs = list(pilot_params)
    grad_outputs = [v.to(p.dtype) for p, v in zip(pilot_params, quiz_grads, strict=True)]
    for loss, weight in extra_losses:
        outputs.append(loss)
        grad_outputs.append(torch.full_like(loss, weight))
    keep = [i for i, o in enumerate(outputs) if o.requires_grad]
    return list(
        torch.autograd.grad(
            [outputs[i] for i in keep],
            list(teacher_params),
            grad_outputs=[grad_outputs[i] for i in keep],
            allow_unused=True,
        )
    )


def check_second_order_support(student: nn.Module, teacher: nn.Module, args: Any) -> None:
    """Refuse, before any training work, settings whose graph cannot be differentiated twice.

    The pilot gradient is differentiated again (double backward through the student) and the teacher's
    gradient is taken with `torch.autograd.grad`, which reentrant activation checkpointing does not allow.
    """
    if getattr(args, "torch_compile", False) or hasattr(student, "_orig_mod"):
        raise ValueError(
            "MetaDistillTrainer differentiates the student's gradient a second time (double backward), which "
            "torch.compile'd graphs do not support; set torch_compile=False (and pass the uncompiled model)."
        )
    if getattr(args, "activation_checkpointing", False) and _kwargs_are_reentrant(
        getattr(args, "activation_checkpointing_kwargs", None)
    ):
        raise ValueError(
            "activation_checkpointing with use_reentrant=True cannot be differentiated twice, and "
            "MetaDistillTrainer back-propagates the quiz loss through the student's pilot gradient. Set "
            "activation_checkpointing_kwargs={'use_reentrant': False} (the transformers default), or turn "
            "activation checkpointing off."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        if _uses_reentrant_checkpointing(model):
            raise ValueError(
                f"The {role} has reentrant activation checkpointing enabled, which supports neither double "
                "backward nor torch.autograd.grad, both of which MetaDistillTrainer needs. Enable it with "
                f"{role}.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}) "
                "or use activation_checkpointing=True in the training arguments (non-reentrant by default)."
            )
    config = getattr(unwrap_model(student), "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention is not None and attention not in DOUBLE_BACKWARD_ATTENTION:
        raise ValueError(
            f"The student uses attn_implementation={attention!r}, whose kernels cannot be differentiated twice, "
            "and MetaDistillTrainer back-propagates through the student's gradient. Load the student with "
            "attn_implementation='sdpa' (meta steps run it on its math backend) or 'eager'. The teacher may "
            "keep any attention implementation."
        )


def _kwargs_are_reentrant(kwargs: dict[str, Any] | None) -> bool:
    """Whether `Trainer` would enable reentrant checkpointing with these activation_checkpointing_kwargs."""
    kwargs = dict(kwargs or {})
    kwargs.pop("every_n_layers", None)
    kwargs.pop("offload", None)
    if not kwargs:
        return False  # transformers then passes use_reentrant=False
    return bool(kwargs.get("use_reentrant", True))  # torch.utils.checkpoint's default is reentrant


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(function, functools.partial) and function.keywords.get("use_reentrant", True):
            return True
    return False


@contextlib.contextmanager
def explain_second_order_errors() -> Iterator[None]:
    """Turn torch's errors about double backward into one that names the problem and the fixes."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        message = str(err)
        if not any(fragment in message for fragment in _DOUBLE_BACKWARD_ERRORS):
            raise
        first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
        raise RuntimeError(
            "MetaDistillTrainer back-propagates the quiz loss through the student's pilot gradient (a double "
            f"backward through the student), and this run's model or settings do not support it: "
            f"{first_line} (raised before this step updated either model). {_SECOND_ORDER_FIXES}"
        ) from err
