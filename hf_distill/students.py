"""Students built from their teacher: the same architecture with fewer transformer layers, initialised
from the teacher's weights (DistilBERT, PKD)."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from .distributed import unwrap_model

# Attribute names under which transformers models keep their stack of layers (BERT's encoder.layer,
# DistilBERT's transformer.layer, Llama's layers, GPT-2's h, T5's block).
LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")
LAYER_CHOICES = ("first", "spread")


def student_from_teacher(
    teacher: nn.Module, num_layers: int, *, layers: str | Sequence[int] = "first"
) -> nn.Module:
    """A student of the teacher's architecture with ``num_layers`` of its transformer layers.

    The student keeps a copy of the teacher's embeddings, of the chosen layers and of its head (its own
    tensors: training it leaves the teacher unchanged), in the teacher's dtype and on its device. This
    is what ``from_pretrained(path, num_hidden_layers=k)`` builds, without reloading the checkpoint and
    without its report of the unused layers' weights.

    Args:
        teacher: A transformers model (``config.num_hidden_layers`` layers in one list of modules).
        num_layers: How many layers the student has, from 1 to the teacher's number of layers.
        layers: Which teacher layers the student starts from: ``"first"`` (layers 0 … k−1),
            ``"spread"`` (evenly spaced from the first to the last, e.g. 0, 2, 4, 7, 9, 11 for 6 of 12),
            or the teacher's layer indices themselves (``num_layers`` of them, e.g. ``[0, 2, 4, 6, 8, 10]``
            as DistilBERT, which kept one layer in two).

    Example:
        ```python
        teacher = AutoModelForSequenceClassification.from_pretrained("path/to/fine-tuned-teacher")
        student = student_from_teacher(teacher, 3)  # the embeddings, layers 0-2 and the classifier
        ```
    """
    teacher = unwrap_model(teacher)
    config = getattr(teacher, "config", None)
    available = getattr(config, "num_hidden_layers", None)
    if not isinstance(available, int):
        raise ValueError(
            f"student_from_teacher needs a transformers model whose config has num_hidden_layers; "
            f"{type(teacher).__name__} has none."
        )
    kept = teacher_layer_indices(available, num_layers, layers)
    prefix = _layer_list_prefix(teacher, available)
    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer (e.g. sliding attention)
        student_config.layer_types = [config.layer_types[i] for i in kept]
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten: keep the caller's random stream
        student = type(teacher)(student_config)
    student.load_state_dict(_renumbered_state_dict(teacher.state_dict(), prefix, kept), strict=True)
    reference = next(teacher.parameters())
    student.to(device=reference.device, dtype=reference.dtype)
    return student.train(teacher.training)


def teacher_layer_indices(
    available: int, num_layers: int, layers: str | Sequence[int] = "first"
) -> list[int]:
    """The teacher's layers (0-based) a ``num_layers``-layer student starts from; see `student_from_teacher`."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= available:
        raise ValueError(
            f"num_layers must be an integer from 1 to the teacher's {available} layers, got {num_layers!r}."
        )
    if isinstance(layers, str):
        if layers == "first":
            return list(range(num_layers))
        if layers == "spread":
            if num_layers == 1:
                return [0]
            return [round(i * (available - 1) / (num_layers - 1)) for i in range(num_layers)]
        raise ValueError(
            f"layers={layers!r} is unknown; choose one of {LAYER_CHOICES} or give layer indices."
        )
    kept = list(layers)
    if len(kept) != num_layers:
        raise ValueError(f"layers names {len(kept)} teacher layers for a student of num_layers={num_layers}.")
    if any(not isinstance(i, int) or not 0 <= i < available for i in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"layers must be distinct indices from 0 to {available - 1}, got {kept}.")
    return kept


def _layer_list_prefix(model: nn.Module, num_layers: int) -> str:
    """The state-dict prefix of the model's list of layers, such as ``bert.encoder.layer``."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and name.rpartition(".")[2] in LAYER_LIST_NAMES
    ]
    if len(found) != 1:
        what = "none" if not found else f"several ({', '.join(found)})"
        raise ValueError(
            f"student_from_teacher looks for one list of {num_layers} modules (config.num_hidden_layers) named "
            f"{' / '.join(LAYER_LIST_NAMES)} in {type(model).__name__}, and found {what}; build this student "
            "with from_pretrained(..., num_hidden_layers=k) instead."
        )
    return found[0]


def _renumbered_state_dict(
    state: dict[str, torch.Tensor], prefix: str, kept: list[int]
) -> dict[str, torch.Tensor]:
    """The teacher's tensors under the student's names: teacher layer ``kept[j]`` becomes layer ``j``."""
    position = {teacher_index: j for j, teacher_index in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match is None:
            renamed[name] = tensor
        elif int(match.group(1)) in position:
            renamed[f"{prefix}.{position[int(match.group(1))]}.{match.group(2)}"] = tensor
    return renamed
