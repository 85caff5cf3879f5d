"""hf_distill: knowledge distillation as drop-in `transformers.Trainer` subclasses."""

from .callbacks import InfluenceLoggerCallback
from .data import DistillationDataCollator, add_teacher_inputs, cache_teacher_logits
from .distillation import DistillationTrainer, DistillationTrainingArguments
from .lgtm import LGTMTrainer, LGTMTrainingArguments
from .meta import MetaDistillTrainer, MetaDistillTrainingArguments
from .metrics import GLUE_TASKS, glue_compute_metrics, glue_metrics, is_regression_task
from .objectives import (
    DISTILL_LOSSES,
    dist_loss,
    distillation_loss,
    ensemble_teacher_logits,
    generalized_jsd,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
)
from .online import OnlineDistillTrainer, OnlineDistillTrainingArguments
from .quiz import QuizDistillTrainer, QuizDistillTrainingArguments, split_quiz
from .representation import (
    MemoryBank,
    RepresentationHeads,
    attention_loss,
    hidden_state_loss,
    info_nce_loss,
    layer_map,
    pool,
)

__version__ = "0.1.0"

__all__ = [
    "MemoryBank",
    "RepresentationHeads",
    "attention_loss",
    "hidden_state_loss",
    "info_nce_loss",
    "layer_map",
    "pool",
    "DISTILL_LOSSES",
    "GLUE_TASKS",
    "InfluenceLoggerCallback",
    "DistillationDataCollator",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "add_teacher_inputs",
    "cache_teacher_logits",
    "dist_loss",
    "distillation_loss",
    "ensemble_teacher_logits",
    "generalized_jsd",
    "glue_compute_metrics",
    "glue_metrics",
    "is_regression_task",
    "kl_divergence",
    "LGTMTrainer",
    "MetaDistillTrainer",
    "MetaDistillTrainingArguments",
    "LGTMTrainingArguments",
    "QuizDistillTrainer",
    "QuizDistillTrainingArguments",
    "split_quiz",
    "OnlineDistillTrainer",
    "OnlineDistillTrainingArguments",
    "logit_mse",
    "reverse_kl_divergence",
]
