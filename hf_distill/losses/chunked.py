"""Token-level distillation of causal language models without their full ``(tokens × vocabulary)`` logits.

`chunked_token_losses` takes the student's and the teacher's last hidden states of the positions that count
and their output heads, and forms the logits a chunk of positions at a time: each chunk's logits, loss and
gradients (w.r.t. the student's hidden states, head weight and bias) are computed in the forward and freed,
so only the gradients stay alive until the backward (as fused-linear losses do). The loss of a chunk is the
registered objective itself (`DistillationObjective`), so every per-sample objective gives the same value and
gradient as on the full logits. `ChunkedTokenLoss` wires it into a trainer (``loss_chunk_size``).
Definitions: https://hf-distill.readthedocs.io/algorithms/, "Chunked divergences".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import unwrap_model
from ..safety.validation import check_integer
from ..teacher.loading import CAUSAL_LM, forward_arg_names
from .objectives import DistillationObjective, token_mask

# Config attributes with which a model changes its logits after the output head (softcapping, scaling): the
# chunked path projects with the head alone, so it refuses these models rather than distil other logits.
LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def check_loss_chunk_size(args: Any) -> int:
    """``args.loss_chunk_size`` as an int, or a clear error for it or for settings the chunked path cannot
    compute (a batch-wide loss, representation terms)."""
    size = check_integer("loss_chunk_size", args.loss_chunk_size, 1, hint="None turns chunking off.")
    objective = DistillationObjective.from_args(args)
    if not objective.is_per_sample:
        raise ValueError(
            f"loss_chunk_size needs a per-token distill_loss; {args.distill_loss!r} has a term over the whole "
            f"batch ({objective.entry.batch_term_weight}). Use kl, reverse_kl, jsd or mse, set "
            f"{objective.entry.batch_term_weight}=0, or set loss_chunk_size=None."
        )
    if args.uses_representations:
        raise ValueError(
            "loss_chunk_size cannot be combined with representation terms (hidden_distill_weight, "
            "attention_distill_weight, crd_weight), which read every hidden state; set them to 0 or set "
            "loss_chunk_size=None."
        )
    return size


class ChunkedLosses(NamedTuple):
    """``loss = distill_weight · distill_sum + task_weight · task_sum`` (carries the gradient) and the two sums
    over the kept positions (detached, for the logs)."""

    loss: torch.Tensor
    distill_sum: torch.Tensor
    task_sum: torch.Tensor


class _ChunkedTokenLossFunction(torch.autograd.Function):
    """Forward: per chunk, the logits, the weighted loss and its gradients, accumulated; backward: those
    gradients times the incoming one. One weighted loss rather than two outputs keeps a single gradient
    buffer of the head's size."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, settings):
        objective, chunk_size, distill_weight, task_weight = settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        distill_sum = hidden.new_zeros((), dtype=torch.float32)
        task_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            teacher_logits = F.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            with torch.enable_grad():
                # The head's output in the model's dtype, upcast by the objective as on the full logits.
                logits = F.linear(h, weight, bias).detach().requires_grad_()
                distill = objective(logits, teacher_logits, "sum")
                total = distill_weight * distill
                if labels is not None:
                    task = F.cross_entropy(logits.float(), labels[rows], ignore_index=-100, reduction="sum")
                    total = total + task_weight * task
                    task_sum += task.detach()
                (grad_logits,) = torch.autograd.grad(total, logits) if total.requires_grad else (None,)
            distill_sum += distill.detach()
            if grad_logits is None:
                continue
            if needs_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if needs_weight:
                grad_weight += (grad_logits.t() @ h).float()
            if needs_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (needs_hidden, needs_weight, needs_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = distill_weight * distill_sum + task_weight * task_sum
        ctx.mark_non_differentiable(distill_sum, task_sum)
        return loss, distill_sum, task_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_distill, _grad_task):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        grads = [None if g is None else (g * grad_loss).to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None, None)


def chunked_token_losses(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    objective: DistillationObjective,
    chunk_size: int,
    labels: torch.Tensor | None = None,
    distill_weight: float | torch.Tensor = 1.0,
    task_weight: float | torch.Tensor = 0.0,
) -> ChunkedLosses:
    """The summed distillation loss (and cross-entropy on ``labels``) of ``N`` token positions, ``chunk_size``
    positions at a time, never forming the ``(N, V)`` logits.

    Args:
        student_hidden: ``(N, H)`` student hidden states of the positions that count (after the causal shift).
        student_weight: ``(V, H)`` student output head (``get_output_embeddings().weight``, tied or not).
        student_bias: ``(V,)`` head bias or ``None``.
        teacher_hidden: ``(N, Ht)`` teacher hidden states of the same positions (no gradient flows to them).
        teacher_weight: ``(V, Ht)`` teacher output head; ``teacher_bias`` its bias or ``None``.
        objective: A per-sample objective (``objective.is_per_sample``), applied to each chunk with "sum".
        chunk_size: Token positions per chunk (>= 1).
        labels: ``(N,)`` next-token labels (-100 ignored) for the task loss, or ``None`` for none.
        distill_weight: The weight of the distillation sum in the returned ``loss``.
        task_weight: The weight of the cross-entropy sum in the returned ``loss``.

    Returns:
        `ChunkedLosses`: the weighted ``loss`` (whose gradient equals autograd's on the full logits) and the
        detached ``distill_sum`` and ``task_sum``.
    """
    if not objective.is_per_sample:
        raise ValueError(
            f"distill_loss={objective.loss!r} with these settings has a term over the whole batch, which "
            "chunks cannot compute; use a per-token loss (kl, reverse_kl, jsd, mse) or dist_intra_weight=0."
        )
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"Student ({student_hidden.shape[0]}) and teacher ({teacher_hidden.shape[0]}) hidden states must "
            "hold the same token positions."
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"The student's head predicts {student_weight.shape[0]} tokens and the teacher's "
            f"{teacher_weight.shape[0]}: token-level distillation needs one shared vocabulary."
        )
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    settings = (objective, int(chunk_size), distill_weight, task_weight)
    loss, distill_sum, task_sum = _ChunkedTokenLossFunction.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        teacher_bias,
        labels,
        settings,
    )
    return ChunkedLosses(loss, distill_sum, task_sum)


@contextlib.contextmanager
def gathered_parameters(*params: torch.Tensor | None) -> Iterator[None]:
    """Gather DeepSpeed ZeRO-3 partitioned parameters (an output head the loss reads without calling it) for
    the duration of the block; a no-op for ordinary parameters or ones already gathered."""
    sharded = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")}
    if sharded:
        import deepspeed  # only present in DeepSpeed runs
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        sharded = {k: p for k, p in sharded.items() if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not sharded:
        yield
        return
    with deepspeed.zero.GatheredParameters(list(sharded.values()), modifier_rank=None):
        yield


def _through_wrapper(wrapper: nn.Module, fn: Any) -> Any:
    """Run ``fn()`` as the forward of ``wrapper`` (DDP, a DeepSpeed engine): DDP then prepares its gradient
    reduction and ZeRO-3 its hooks, as for a normal forward. Without a wrapper, ``fn()``."""
    inner = wrapper
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    if inner is wrapper:
        return fn()
    original = inner.forward

    def redirected(*_args: Any, **_kwargs: Any) -> Any:
        inner.forward = original
        return fn()

    inner.forward = redirected
    try:
        return wrapper()
    finally:
        inner.forward = original


def _backbone_and_head(model: nn.Module, who: str) -> tuple[nn.Module, nn.Module]:
    """The base model (last hidden states) and the output head of a causal LM, PEFT or not."""
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"The {who} is a prompt-learning PEFT model, whose virtual tokens the base model alone would miss; "
            "use an adapter such as LoRA, or set loss_chunk_size=None."
        )
    causal = unwrap_model(model)
    backbone = getattr(causal, "base_model", causal)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if backbone is causal or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"loss_chunk_size needs the {who}'s base model and output head (a transformers causal LM with "
            f"get_output_embeddings()); {type(causal).__name__} has none. Set loss_chunk_size=None."
        )
    if hasattr(head, "base_layer"):
        raise ValueError(
            f"The {who}'s output head carries a PEFT adapter, which the chunked loss would ignore (it reads the "
            "head's weight). Remove the head from the adapter's target_modules, or set loss_chunk_size=None."
        )
    config = getattr(causal, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_POSTPROCESSING:
        if getattr(text_config, name, None) is not None:
            raise ValueError(
                f"The {who}'s config sets {name}, which changes its logits after the output head; the chunked "
                "loss projects with the head alone. Set loss_chunk_size=None for this model."
            )
    return backbone, head


def _last_hidden_states(backbone: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The backbone's last hidden states for the inputs it accepts (no cache)."""
    accepted = forward_arg_names(backbone)
    feed = {k: v for k, v in inputs.items() if k in accepted and k != "labels"}
    if "use_cache" in accepted:
        feed["use_cache"] = False
    outputs = backbone(**feed)
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


@dataclass
class ChunkedTokenLoss:
    """A causal-LM trainer's training loss, ``alpha · distillation + (1 − alpha) · task loss``, computed from
    hidden states in chunks (``loss_chunk_size``); built, and checked, by `for_trainer`."""

    trainer: Any
    chunk_size: int

    @classmethod
    def for_trainer(cls, trainer: Any, custom_teacher_targets: bool = False) -> ChunkedTokenLoss | None:
        """The chunked loss of a `DistillationTrainer` whose ``args.loss_chunk_size`` is set (else ``None``);
        refuses what it cannot compute. ``custom_teacher_targets``: the trainer overrides its teacher's
        targets (a teacher that learns), which this path, running the teacher itself, would bypass."""
        chunk_size = trainer.args.loss_chunk_size
        if chunk_size is None:
            return None
        refusals = {
            "the student is not a causal language model": trainer._student_task != CAUSAL_LM,
            "it distils one teacher, not an ensemble": len(trainer.teacher_models) != 1,
            "the trainer's teacher targets are its own (a teacher that learns)": custom_teacher_targets,
            "the task loss must be Trainer's plain cross-entropy (no compute_loss_func, no label smoothing)": (
                trainer.compute_loss_func is not None or trainer.args.label_smoothing_factor != 0
            ),
        }
        for reason, refused in refusals.items():
            if refused:
                raise ValueError(
                    f"loss_chunk_size={chunk_size} cannot be used here: {reason}. Set loss_chunk_size=None."
                )
        _backbone_and_head(trainer.model, "student")
        _backbone_and_head(trainer.teacher_models[0], "teacher")
        return cls(trainer, chunk_size)

    def __call__(
        self, model: nn.Module, batch: Any, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a `DistillationBatch`, and the per-position means of its parts for the logs."""
        trainer, args = self.trainer, self.trainer.args
        if batch.cached_teacher_logits is not None:
            raise ValueError(
                "loss_chunk_size computes the teacher's logits from its hidden states; the batch carries cached "
                "teacher logits instead. Remove the column, or set loss_chunk_size=None."
            )
        inputs = batch.student
        labels = next((inputs[n] for n in trainer.label_names if inputs.get(n) is not None), None)
        if labels is None and args.alpha < 1.0:
            raise ValueError(
                f"The training batch has no labels (expected {trainer.label_names}) but alpha={args.alpha} needs "
                "the task loss. Add labels to the data (or a collator that makes them), or set alpha=1.0."
            )
        teacher = trainer.teacher_models[0]
        if teacher.training:  # a frozen teacher never drops out
            teacher.eval()
        teacher_backbone, teacher_head = _backbone_and_head(teacher, "teacher")
        with torch.no_grad():
            teacher_inputs = batch.teacher_inputs(trainer._teacher_arg_names[0])
            teacher_hidden = _through_wrapper(
                teacher, lambda: _last_hidden_states(teacher_backbone, teacher_inputs)
            )
        # The student's part runs as its wrapper's forward: DDP and ZeRO-3 see a normal forward and backward.
        return _through_wrapper(
            model,
            lambda: self._student_loss(
                model, inputs, labels, teacher_hidden, teacher_head, num_items_in_batch
            ),
        )

    def _student_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        labels: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_head: nn.Module,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer, args = self.trainer, self.trainer.args
        backbone, head = _backbone_and_head(model, "student")
        student_hidden = _last_hidden_states(backbone, inputs)
        # The positions aligned_logits keeps: label != -100 after the causal shift, else attended ones.
        shift = trainer._shift_labels
        mask = token_mask(labels, inputs.get("attention_mask"), shift)
        if shift:
            student_hidden, teacher_hidden = student_hidden[:, :-1], teacher_hidden[:, :-1]
        teacher_hidden = teacher_hidden[:, : student_hidden.shape[1]].to(student_hidden.device)
        if mask is None:
            mask = torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
        kept = int(mask.sum())
        kept_labels = None if labels is None else (labels[:, 1:] if shift else labels)[mask]
        distill_norm, task_norm = self._normalisers(num_items_in_batch, kept)
        # As student_loss: alpha · distill + (1 − alpha) · task, or the distillation alone without labels.
        alpha = args.alpha if kept_labels is not None else 1.0
        heads = (head.weight, head.bias, teacher_head.weight, teacher_head.bias)
        with gathered_parameters(*heads):
            result = chunked_token_losses(
                student_hidden[mask],
                head.weight,
                head.bias,
                teacher_hidden[mask],
                teacher_head.weight,
                teacher_head.bias,
                trainer.objective,
                self.chunk_size,
                kept_labels,
                alpha / distill_norm,
                (1.0 - alpha) / task_norm,
            )
        parts = {"distill_loss": result.distill_sum / max(kept, 1)}
        if kept_labels is not None:
            parts["task_loss"] = result.task_sum / max(kept, 1)
        return result.loss, parts

    def _normalisers(self, num_items_in_batch: torch.Tensor | int | None, kept: int) -> tuple[Any, Any]:
        """What the distillation and task sums are divided by, as on the unchunked path: the optimizer step's
        kept tokens (times the processes when tokens are averaged across devices), else this batch's."""
        trainer, args = self.trainer, self.trainer.args
        if num_items_in_batch is None:
            return max(kept, 1), max(kept, 1)
        processes = trainer.accelerator.num_processes if args.average_tokens_across_devices else 1
        distill = num_items_in_batch / (processes if args.world_size > 1 else 1)
        task = num_items_in_batch / processes if trainer.model_accepts_loss_kwargs else max(kept, 1)
        return distill, task
