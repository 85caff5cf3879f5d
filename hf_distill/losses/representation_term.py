"""The representation terms of a run, wired to its models: hidden states, attention maps and CRD.

`RepresentationTerm` checks the models against the arguments before training, owns the learned heads,
says what extra outputs each forward must return, keeps what the student's loss needs from the teacher's
forward, and computes the weighted terms (https://hf-distill.readthedocs.io/algorithms/, "Representation terms"). The losses
themselves are the pure functions of `representation`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import average_gradients_across_processes, unwrap_model
from .representation import (
    HEADS_FILE,
    RepresentationHeads,
    attention_loss,
    heads_are_empty,
    hidden_state_loss,
    layer_map,
    model_dimensions,
    pool,
)


@dataclass
class TeacherFeatures:
    """What the student's representation terms need from one teacher forward (the rest is dropped)."""

    hidden: dict[int, torch.Tensor] | None = None  # mapped teacher layer -> pooled hidden state
    crd: torch.Tensor | None = None  # pooled last layer
    attention: dict[int, torch.Tensor] | None = None  # mapped teacher layer -> attention map


class RepresentationTerm:
    """The weighted hidden-state, attention-map and CRD terms of a run, and their learned heads.

    Built by `RepresentationTerm.build` (which checks the models first); ``None`` stands for a run without
    representation terms.
    """

    def __init__(self, args: Any, layers: dict[int, int], heads: RepresentationHeads) -> None:
        self.args = args
        self.layer_map = layers
        self.heads = heads

    @classmethod
    def build(
        cls, args: Any, student: nn.Module, teacher: nn.Module, own_inputs: bool
    ) -> RepresentationTerm | None:
        """The run's term, or ``None`` when no representation weight is set; a clear error for models the
        arguments cannot apply to. ``own_inputs``: the teacher reads its own tokenisation."""
        if not args.uses_representations:
            return None
        token_aligned = args.attention_distill_weight > 0 or (
            args.hidden_distill_weight > 0 and args.hidden_pooling == "tokens"
        )
        if own_inputs and token_aligned:
            raise ValueError(
                "Attention maps and hidden_pooling='tokens' compare the models position by position, but the "
                "teacher reads its own tokenisation (teacher_ input columns); use hidden_pooling='cls' or 'mean' "
                "and attention_distill_weight=0, or a teacher that shares the student's tokenizer."
            )
        student, teacher = unwrap_model(student), unwrap_model(teacher)
        s_width, s_layers, s_heads = model_dimensions(_base_with_config(student))
        t_width, t_layers, t_heads = model_dimensions(_base_with_config(teacher))
        layers: dict[int, int] = {}
        hidden_layers: list[int] = []
        if args.hidden_distill_weight > 0 or args.attention_distill_weight > 0:
            layers = layer_map(args.hidden_layer_map, s_layers, t_layers)
            hidden_layers = list(layers) if args.hidden_distill_weight > 0 else []
        if args.attention_distill_weight > 0:
            _check_attention_maps(layers, s_heads, t_heads, student, teacher)
        heads = RepresentationHeads(
            s_width,
            t_width,
            hidden_layers,
            crd_dim=args.crd_dim if args.crd_weight > 0 else None,
            crd_num_negatives=args.crd_num_negatives,
        )
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        return cls(args, layers, heads.to(device))

    @property
    def wants_attentions(self) -> bool:
        return self.args.attention_distill_weight > 0

    def forward_kwargs(self) -> dict[str, bool]:
        """What a forward must also return for these terms (hidden states, and attention maps if used)."""
        kwargs = {"output_hidden_states": True}
        if self.wants_attentions:
            kwargs["output_attentions"] = True
        return kwargs

    def teacher_features(self, outputs: Any, attention_mask: torch.Tensor | None) -> TeacherFeatures:
        """The mapped layers' (pooled) hidden states and attention maps of a teacher forward."""
        args = self.args
        hidden = outputs.hidden_states
        mapped = set(self.layer_map.values())
        features = TeacherFeatures()
        if args.hidden_distill_weight > 0:
            features.hidden = {t: pool(hidden[t], attention_mask, args.hidden_pooling) for t in mapped}
        if args.crd_weight > 0:
            features.crd = pool(hidden[-1], attention_mask, args.crd_pooling)
        if self.wants_attentions:
            features.attention = {t: outputs.attentions[t - 1] for t in mapped}
        return features

    def loss(
        self, student_outputs: Any, student_inputs: dict[str, Any], teacher: TeacherFeatures | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the terms, and each unweighted term for the logs."""
        if teacher is None:
            raise RuntimeError(
                "Representation distillation found no teacher hidden states for this batch (cached teacher "
                "logits, or a teacher forward that was skipped); they cannot be combined."
            )
        hidden = student_outputs.hidden_states
        if hidden is None:
            raise ValueError(
                "The student returned no hidden_states for output_hidden_states=True; representation "
                "distillation needs a model that returns them."
            )
        args, mask = self.args, student_inputs.get("attention_mask")
        parts: dict[str, torch.Tensor] = {}
        weighted = []
        if args.hidden_distill_weight > 0:
            parts["hidden_loss"] = self._hidden_loss(hidden, mask, teacher)
            weighted.append(args.hidden_distill_weight * parts["hidden_loss"])
        if self.wants_attentions:
            parts["attention_loss"] = self._attention_loss(student_outputs.attentions, mask, teacher)
            weighted.append(args.attention_distill_weight * parts["attention_loss"])
        if args.crd_weight > 0:
            s_emb = pool(hidden[-1], mask, args.crd_pooling)
            parts["crd_loss"] = self.heads.crd_loss(s_emb, teacher.crd.to(s_emb.device), args.crd_temperature)
            weighted.append(args.crd_weight * parts["crd_loss"])
        total = weighted[0]
        for term in weighted[1:]:
            total = total + term
        return total, parts

    def _hidden_loss(
        self, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor | None, teacher: TeacherFeatures
    ) -> torch.Tensor:
        args = self.args
        losses = []
        for s_layer, t_layer in self.layer_map.items():
            s_vec = self.heads.project_hidden(s_layer, pool(hidden[s_layer], mask, args.hidden_pooling))
            t_vec = teacher.hidden[t_layer].to(s_vec.device)
            token_mask_ = mask if args.hidden_pooling == "tokens" else None
            if token_mask_ is not None and t_vec.shape[1] != s_vec.shape[1]:
                raise ValueError(
                    f"hidden_pooling='tokens' needs the same sequence length for both models, got student "
                    f"{s_vec.shape[1]} and teacher {t_vec.shape[1]}."
                )
            losses.append(hidden_state_loss(s_vec, t_vec, args.hidden_loss, token_mask_))
        return torch.stack(losses).mean()

    def _attention_loss(
        self, attentions: Any, mask: torch.Tensor | None, teacher: TeacherFeatures
    ) -> torch.Tensor:
        if not attentions:
            raise ValueError(
                "The student returned no attentions for output_attentions=True; load it with "
                "attn_implementation='eager'."
            )
        losses = [
            attention_loss(
                attentions[s_layer - 1],
                teacher.attention[t_layer].to(attentions[s_layer - 1].device),
                self.args.attention_loss,
                mask,
            )
            for s_layer, t_layer in self.layer_map.items()
        ]
        return torch.stack(losses).mean()

    def add_to_optimizer(
        self, optimizer: torch.optim.Optimizer, learning_rate: float, max_grad_norm: float
    ) -> None:
        """A parameter group for the heads (the student's learning rate, no weight decay); their gradients are
        averaged over processes and clipped on their own before each step, and cleared after it."""
        heads = self.heads
        params = [p for p in heads.parameters() if p.requires_grad]
        inner = getattr(optimizer, "optimizer", optimizer)
        known = {id(p) for g in inner.param_groups for p in g["params"]}
        if not params or any(id(p) in known for p in params):
            return

        def prepare_gradients(*_: Any) -> None:
            if all(p.grad is None for p in params):
                return  # a step skipped for non-finite values (on every rank alike): AdamW skips them too
            # The heads are not in the student's DDP wrapper nor in Trainer's gradient clipping.
            average_gradients_across_processes(params)
            if max_grad_norm and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)

        inner.add_param_group({"params": params, "weight_decay": 0.0, "lr": learning_rate})
        inner.register_step_pre_hook(prepare_gradients)
        inner.register_step_post_hook(lambda *_: heads.zero_grad(set_to_none=True))

    @property
    def has_state(self) -> bool:
        """Whether the heads hold anything a checkpoint must keep."""
        return not heads_are_empty(self.heads)


def _check_attention_maps(
    layers: dict[int, int], s_heads: int | None, t_heads: int | None, student: nn.Module, teacher: nn.Module
) -> None:
    if s_heads != t_heads:
        raise ValueError(
            f"attention_distill_weight > 0 compares attention maps head by head, but the student has "
            f"{s_heads} attention heads and the teacher {t_heads}. Use models with the same head count, "
            "or set attention_distill_weight=0 (hidden states and CRD work across head counts)."
        )
    if 0 in layers or 0 in layers.values():
        raise ValueError(
            f"hidden_layer_map {layers} maps layer 0 (the embeddings), which has no attention "
            "map; map layers >= 1 or set attention_distill_weight=0."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attention not in (None, "eager"):
            raise ValueError(
                f"attention_distill_weight > 0 needs the {role}'s attention weights, which "
                f"attn_implementation={attention!r} does not return. Load the {role} with "
                f"attn_implementation='eager' (or call {role}.set_attn_implementation('eager'))."
            )


def _base_with_config(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose config is the base model's anyway)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def save_heads(checkpoint_dir: str | os.PathLike, heads: nn.Module) -> Path:
    """Write the representation heads' state to ``checkpoint_dir/distill_heads.safetensors`` (via a temporary
    file renamed at the end, so a crash never leaves a half-written file that a resume would trust)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    target = Path(checkpoint_dir) / HEADS_FILE
    staging = Path(checkpoint_dir) / f".{HEADS_FILE}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(staging), metadata={"format": "pt"})
    os.replace(staging, target)
    return target


def load_heads(checkpoint_dir: str | os.PathLike, heads: nn.Module) -> None:
    """Restore the representation heads written by `save_heads`, or a clear error."""
    path = Path(checkpoint_dir) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir} holds no representation heads ({path} is missing): it was written by a run "
            "without hidden_distill_weight / attention_distill_weight / crd_weight, or with other settings. Resume "
            "with the settings of that run, or start a new run."
        )
    saved = load_file(str(path))
    expected = heads.state_dict()
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        raise ValueError(
            f"The representation heads in {path} do not match this run's (saved {sorted(saved)[:6]}, expected "
            f"{sorted(expected)[:6]}); resume with the same models and representation arguments."
        )
    heads.load_state_dict({k: v.to(expected[k].device) for k, v in saved.items()})
