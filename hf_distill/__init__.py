"""hf_distill: knowledge distillation as drop-in `transformers.Trainer` subclasses."""

from .callbacks import InfluenceLoggerCallback
from .checksums import CheckpointIntegrityError
from .data import DistillationBatch, DistillationDataCollator, add_teacher_inputs, cache_teacher_logits
from .distillation_config import DistillationTrainingArguments
from .distillation_trainer import DistillationTrainer
from .learning_teacher_config import LearningTeacherTrainingArguments
from .learning_teacher_trainer import LearningTeacherTrainer
from .lgtm_config import LGTMTrainingArguments
from .lgtm_trainer import LGTMTrainer
from .meta_config import MetaDistillTrainingArguments
from .meta_trainer import MetaDistillTrainer
from .metrics import GLUE_TASKS, glue_compute_metrics, glue_metrics, is_regression_task
from .nonfinite import NonFiniteError
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
from .online_config import OnlineDistillTrainingArguments
from .online_trainer import OnlineDistillTrainer
from .quiz import split_quiz
from .quiz_config import QuizDistillTrainingArguments
from .quiz_trainer import QuizDistillTrainer
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
    "CheckpointIntegrityError",
    "NonFiniteError",
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
    "DistillationBatch",
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
    "LearningTeacherTrainer",
    "LearningTeacherTrainingArguments",
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
