"""hf_distill: knowledge distillation as drop-in `transformers.Trainer` subclasses.

Public names are imported on first use (``from hf_distill import DistillationTrainer`` works as
usual): ``import hf_distill`` alone, and the ``hf-distill-plot-influence`` command, do not load torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module of the package that defines it.
_EXPORTS: dict[str, str] = {
    "InfluenceLoggerCallback": "callbacks",
    "CheckpointIntegrityError": "checksums",
    "DistillationBatch": "data",
    "DistillationDataCollator": "data",
    "add_teacher_inputs": "data",
    "cache_teacher_logits": "data",
    "masked_transfer_set": "transfer",
    "DistillationTrainingArguments": "distillation_config",
    "DistillationTrainer": "distillation_trainer",
    "LearningTeacherTrainingArguments": "learning_teacher_config",
    "LearningTeacherTrainer": "learning_teacher_trainer",
    "LGTMTrainingArguments": "lgtm_config",
    "LGTMTrainer": "lgtm_trainer",
    "MetaDistillTrainingArguments": "meta_config",
    "MetaDistillTrainer": "meta_trainer",
    "GLUE_TASKS": "metrics",
    "glue_compute_metrics": "metrics",
    "glue_metrics": "metrics",
    "is_regression_task": "metrics",
    "NonFiniteError": "nonfinite",
    "DISTILL_LOSSES": "objectives",
    "dist_loss": "objectives",
    "distillation_loss": "objectives",
    "ensemble_teacher_logits": "objectives",
    "generalized_jsd": "objectives",
    "kl_divergence": "objectives",
    "logit_mse": "objectives",
    "reverse_kl_divergence": "objectives",
    "OnlineDistillTrainingArguments": "online_config",
    "OnlineDistillTrainer": "online_trainer",
    "split_quiz": "quiz",
    "QuizDistillTrainingArguments": "quiz_config",
    "QuizDistillTrainer": "quiz_trainer",
    "MemoryBank": "representation",
    "RepresentationHeads": "representation",
    "attention_loss": "representation",
    "hidden_state_loss": "representation",
    "info_nce_loss": "representation",
    "layer_map": "representation",
    "pool": "representation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
