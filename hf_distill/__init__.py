"""hf_distill: knowledge distillation as drop-in `transformers.Trainer` subclasses.

Public names are imported on first use (``from hf_distill import DistillationTrainer`` works as
usual): ``import hf_distill`` alone, and the ``hf-distill-plot-influence`` command, do not load torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._moved_modules import install as _install_moved_modules

__version__ = "0.1.0"
_install_moved_modules()  # the flat layout's module paths (hf_distill.objectives, ...) keep importing

# Public name -> the module of the package that defines it.
_EXPORTS: dict[str, str] = {
    "InfluenceLoggerCallback": "callbacks",
    "CheckpointIntegrityError": "safety.checksums",
    "DistillationBatch": "data.batch",
    "DistillationDataCollator": "data.collators",
    "add_teacher_inputs": "data.teacher_logits",
    "cache_teacher_logits": "data.teacher_logits",
    "topk_cache_metadata": "data.teacher_logits",
    "masked_transfer_set": "data.transfer",
    "DistillationTrainingArguments": "trainers.distillation_config",
    "DistillationTrainer": "trainers.distillation_trainer",
    "LearningTeacherTrainingArguments": "trainers.learning_teacher_config",
    "LearningTeacherTrainer": "trainers.learning_teacher_trainer",
    "LGTMTrainingArguments": "trainers.lgtm_config",
    "LGTMTrainer": "trainers.lgtm_trainer",
    "MetaDistillTrainingArguments": "trainers.meta_config",
    "MetaDistillTrainer": "trainers.meta_trainer",
    "GLUE_TASKS": "glue.metrics",
    "glue_compute_metrics": "glue.metrics",
    "glue_metrics": "glue.metrics",
    "is_regression_task": "glue.metrics",
    "NonFiniteError": "safety.nonfinite",
    "DISTILL_LOSSES": "losses.objectives",
    "dist_loss": "losses.objectives",
    "distillation_loss": "losses.objectives",
    "ensemble_teacher_logits": "losses.objectives",
    "generalized_jsd": "losses.objectives",
    "kl_divergence": "losses.objectives",
    "logit_mse": "losses.objectives",
    "register_distill_loss": "losses.objectives",
    "registered_distill_losses": "losses.objectives",
    "reverse_kl_divergence": "losses.objectives",
    "sparse_forward_kl": "losses.sparse",
    "OnlineDistillTrainingArguments": "trainers.online_config",
    "OnlineDistillTrainer": "trainers.online_trainer",
    "split_quiz": "data.quiz",
    "QuizDistillTrainingArguments": "trainers.quiz_config",
    "QuizDistillTrainer": "trainers.quiz_trainer",
    "MemoryBank": "losses.representation",
    "RepresentationHeads": "losses.representation",
    "attention_loss": "losses.representation",
    "hidden_state_loss": "losses.representation",
    "info_nce_loss": "losses.representation",
    "layer_map": "losses.representation",
    "pool": "losses.representation",
    "student_from_teacher": "students",
    "classification_compute_metrics": "evaluation",
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
