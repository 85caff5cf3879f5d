"""Representation distillation (https://hf-distill.readthedocs.io/algorithms/, "Representation terms"): hidden states (PKD), attention maps, and CRD.

Pure functions (layer maps, pooling, the three losses), a FIFO memory bank of past teacher embeddings,
and `RepresentationHeads`, the module holding the learned projections and CRD critic heads. The trainers
train the heads with the student and keep them out of the student's saved folder.

Layers are numbered as in a model's ``hidden_states`` tuple: 0 is the embedding output, ``i`` (1 … L) the
output of transformer layer ``i``; the attention map of layer ``i`` is ``attentions[i - 1]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LAYER_MAP_PRESETS = ("uniform", "last", "skip")
POOLINGS = ("cls", "mean", "tokens")
CRD_POOLINGS = ("cls", "mean")
HIDDEN_LOSSES = ("mse", "cosine")
ATTENTION_LOSSES = ("mse", "kl")
HEADS_FILE = "distill_heads.safetensors"


# ----- layer maps -------------------------------------------------------------------------------------------


def parse_layer_map(value: str | Mapping[Any, Any]) -> str | dict[int, int]:
    """A preset name, or ``{student_layer: teacher_layer}`` with int keys, from a dict or a JSON string."""
    if isinstance(value, str):
        if value in LAYER_MAP_PRESETS:
            return value
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"hidden_layer_map={value!r} is neither a preset ({', '.join(LAYER_MAP_PRESETS)}) nor a JSON "
                'object such as \'{"1": 4, "2": 8}\' (student layer to teacher layer).'
            ) from err
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"hidden_layer_map must be a preset ({', '.join(LAYER_MAP_PRESETS)}) or a non-empty mapping "
            f"{{student_layer: teacher_layer}}, got {value!r}."
        )
    try:
        parsed = {int(k): int(v) for k, v in value.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"hidden_layer_map entries must be integer layer numbers, got {dict(value)!r}."
        ) from err
    if any(k < 0 or v < 0 for k, v in parsed.items()):
        raise ValueError(f"hidden_layer_map layer numbers must be >= 0 (0 is the embeddings), got {parsed}.")
    return parsed


def layer_map(spec: str | Mapping[Any, Any], student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``{student_layer: teacher_layer}`` for a preset or an explicit map, checked against the layer counts.

    Presets (layers numbered 1 … L; the embeddings, 0, are never mapped by a preset):

    - ``uniform``: every student layer ``i`` → teacher layer ``round(i · T / S)``; the last layers match.
    - ``skip`` (PKD-Skip): student layers ``1 … S−1`` → teacher layers ``k, 2k, …`` with ``k = T // S``
      (12 → 6: {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}); the last layer is left to the logit objective, as in PKD.
    - ``last`` (PKD-Last): student layers ``1 … S−1`` → the teacher's last layers below its top,
      ``T − S + i`` (12 → 6: {1: 7, …, 5: 11}).
    """
    spec = parse_layer_map(spec)
    s, t = int(student_layers), int(teacher_layers)
    if isinstance(spec, dict):
        mapping = dict(sorted(spec.items()))
    elif spec == "uniform":
        mapping = {i: max(1, min(t, round(i * t / s))) for i in range(1, s + 1)}
    else:
        if t < s:
            raise ValueError(
                f"hidden_layer_map={spec!r} needs a teacher at least as deep as the student ({t} < {s} layers); "
                "use 'uniform' or an explicit map."
            )
        if spec == "skip":
            k = t // s
            mapping = {i: i * k for i in range(1, s)}
        else:  # last
            mapping = {i: t - s + i for i in range(1, s)}
        if not mapping:
            raise ValueError(
                f"hidden_layer_map={spec!r} maps no layer for a {s}-layer student (PKD presets skip the last "
                "layer, left to the logit objective); use 'uniform' or an explicit map such as "
                f"'{{\"{s}\": {t}}}'."
            )
    bad = {k: v for k, v in mapping.items() if k > s or v > t}
    if bad:
        raise ValueError(
            f"hidden_layer_map entries {bad} are out of range: the student has layers 0 … {s} and the teacher "
            f"0 … {t} (0 is the embeddings)."
        )
    return mapping


# ----- pooling and losses -----------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """``(B, L, H)`` hidden states pooled to ``(B, H)`` (``cls``: position 0; ``mean``: over the mask), or
    left as they are (``tokens``)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "tokens":
        return hidden
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r} is unknown; choose one of {POOLINGS}.")
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def hidden_state_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over vectors of ``‖ŝ − t̂‖²`` (``mse``, PKD's loss on L2-normalised vectors, = 2 − 2·cos) or
    ``1 − cos(s, t)`` (``cosine``).

    ``student`` and ``teacher`` are ``(..., H)`` of the same shape (project the student first when the widths
    differ); ``mask`` (``(...)``, optional) keeps the vectors that count, e.g. the attended tokens. Float32.
    """
    s, t = student.float(), teacher.float()
    if s.shape != t.shape:
        raise ValueError(f"hidden_state_loss needs equal shapes, got {tuple(s.shape)} and {tuple(t.shape)}.")
    if loss == "mse":
        per_vector = (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)
    elif loss == "cosine":
        per_vector = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"hidden_loss={loss!r} is unknown; choose one of {HIDDEN_LOSSES}.")
    if mask is None:
        return per_vector.mean()
    keep = mask.to(torch.bool)
    if not keep.any():
        return per_vector.sum() * 0.0
    return per_vector[keep].mean()


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss: str = "mse",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between ``(B, heads, L, L)`` attention maps (rows are softmax distributions over keys).

    ``mse``: the mean squared difference over the attended (query, key) pairs; ``kl``: KL(teacher ‖ student)
    of each attended query row, averaged over rows and heads. ``attention_mask`` (``(B, L)``) marks the
    attended tokens. Float32.
    """
    s, t = student.float(), teacher.float()
    if s.shape != t.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}; attention "
            "distillation needs the same head count and the same tokenisation."
        )
    b, h, q, k = s.shape
    if attention_mask is None:
        rows = torch.ones(b, q, dtype=torch.bool, device=s.device)
        keys = torch.ones(b, k, dtype=torch.bool, device=s.device)
    else:
        rows = attention_mask[:, :q].to(torch.bool)
        keys = attention_mask[:, :k].to(torch.bool)
    row_mask = rows[:, None, :].expand(b, h, q)  # (B, H, Q)
    if loss == "mse":
        pair_mask = row_mask[..., None] & keys[:, None, None, :]
        count = pair_mask.sum().clamp_min(1)
        return ((s - t).pow(2) * pair_mask).sum() / count
    if loss == "kl":
        per_row = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1)  # (B, H, Q)
        count = row_mask.sum().clamp_min(1)
        return (per_row * row_mask).sum() / count
    raise ValueError(f"attention_loss={loss!r} is unknown; choose one of {ATTENTION_LOSSES}.")


def info_nce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """CRD's InfoNCE critic loss: each student embedding must pick its own input's teacher embedding.

    ``student`` and ``teacher`` are ``(B, D)`` (projected into the shared space; L2-normalised here). Sample
    ``i`` is scored against ``teacher[j]`` for every ``j`` of the batch (``j ≠ i``: in-batch negatives) and
    against every row of ``negatives`` (``(N, D)``, e.g. a memory bank), by ``ŝ · t̂ / temperature``; the loss
    is the cross-entropy of picking ``teacher[i]``, averaged over the batch. Float32.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.T
    if negatives is not None and negatives.shape[0] > 0:
        logits = torch.cat([logits, s @ F.normalize(negatives.float(), dim=-1).T], dim=1)
    targets = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits / temperature, targets)


# ----- memory bank and heads --------------------------------------------------------------------------------


class MemoryBank(nn.Module):
    """A FIFO queue of the last ``size`` teacher embeddings (``(size, dim)``, no gradients), in buffers so
    that it is checkpointed with the heads."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows filled so far (≤ size)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next row to overwrite

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def negatives(self) -> torch.Tensor:
        """A copy of the filled rows (fewer than ``size`` until the queue has wrapped once); a copy, so that
        a later `push` does not modify tensors saved for a backward pass."""
        return self.embeddings[: int(self.count)].clone()

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        """Enqueue ``(B, dim)`` embeddings, overwriting the oldest ones."""
        batch = batch.detach().to(self.embeddings)[-self.size :]
        n = batch.shape[0]
        rows = (int(self.pointer) + torch.arange(n, device=batch.device)) % self.size
        self.embeddings[rows] = batch
        self.pointer.fill_((int(self.pointer) + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))


class RepresentationHeads(nn.Module):
    """The learned parts of representation distillation, trained with the student but never part of it.

    - ``hidden_projections``: for each mapped student layer, a linear map from the student's width to the
      teacher's, created only when the widths differ (PKD with a narrower student, e.g. MiniLM-384 from
      MPNet-768);
    - ``crd_student`` / ``crd_teacher``: CRD's projection heads g_s, g_t into a shared ``crd_dim`` space;
    - ``memory_bank``: past teacher embeddings (before g_t, so that they are re-projected by the current
      head) when ``crd_num_negatives > 0``.
    """

    def __init__(
        self,
        student_width: int,
        teacher_width: int,
        hidden_layers: list[int] | tuple[int, ...] = (),
        crd_dim: int | None = None,
        crd_num_negatives: int = 0,
    ) -> None:
        super().__init__()
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.hidden_projections = nn.ModuleDict()
        if self.student_width != self.teacher_width:
            for layer in hidden_layers:
                self.hidden_projections[str(layer)] = nn.Linear(self.student_width, self.teacher_width)
        self.crd_student: nn.Module | None = None
        self.crd_teacher: nn.Module | None = None
        self.memory_bank: MemoryBank | None = None
        if crd_dim is not None:
            self.crd_student = nn.Linear(self.student_width, crd_dim)
            self.crd_teacher = nn.Linear(self.teacher_width, crd_dim)
            if crd_num_negatives > 0:
                self.memory_bank = MemoryBank(crd_num_negatives, self.teacher_width)

    def project_hidden(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """A student layer's hidden states in the teacher's width (unchanged when the widths are equal)."""
        key = str(layer)
        if key not in self.hidden_projections:
            return hidden
        projection = self.hidden_projections[key]
        return projection(hidden.to(projection.weight.dtype))

    def crd_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """InfoNCE of g_s(student) against g_t(teacher) and g_t(memory bank); then enqueues ``teacher``."""
        if self.crd_student is None or self.crd_teacher is None:
            raise RuntimeError("These heads were built without CRD (crd_dim=None).")
        dtype = self.crd_student.weight.dtype
        teacher = teacher.detach().to(dtype)
        negatives = None
        if self.memory_bank is not None and int(self.memory_bank.count) > 0:
            negatives = self.crd_teacher(self.memory_bank.negatives().to(dtype))
        loss = info_nce_loss(
            self.crd_student(student.to(dtype)), self.crd_teacher(teacher), temperature, negatives
        )
        if self.memory_bank is not None:
            self.memory_bank.push(teacher)
        return loss


def heads_are_empty(heads: nn.Module | None) -> bool:
    """Whether there is nothing to train or checkpoint."""
    return heads is None or (
        not any(True for _ in heads.parameters()) and not any(True for _ in heads.buffers())
    )


def model_dimensions(model: nn.Module) -> tuple[int, int, int | None]:
    """(hidden width, layer count, attention heads) from a model's config, or a clear error."""
    config = getattr(model, "config", None)
    width = next(
        (getattr(config, n) for n in ("hidden_size", "d_model", "n_embd") if hasattr(config, n)), None
    )
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(width, int) or not isinstance(layers, int):
        raise ValueError(
            f"Representation distillation reads the hidden width and layer count from the model's config, and "
            f"{type(model).__name__}'s config has neither hidden_size nor num_hidden_layers."
        )
    heads = getattr(config, "num_attention_heads", None)
    return width, layers, heads if isinstance(heads, int) else None
