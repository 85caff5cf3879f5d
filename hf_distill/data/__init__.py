"""What the trainers read: the batch layout (``batch``), collators that keep the distillation columns
(``collators``), a teacher's own inputs and its cached logits (``teacher_logits``), the quiz split
(``quiz``), the masked transfer set (``transfer``) and the label checks (``label_checks``)."""

from .batch import ROW_ID, TEACHER_LOGITS, TEACHER_PREFIX, DistillationBatch, dataset_columns, has_columns
from .collators import DistillationDataCollator, default_student_collator
from .teacher_logits import add_teacher_inputs, cache_teacher_logits

__all__ = [
    "ROW_ID",
    "TEACHER_LOGITS",
    "TEACHER_PREFIX",
    "DistillationBatch",
    "DistillationDataCollator",
    "add_teacher_inputs",
    "cache_teacher_logits",
    "dataset_columns",
    "default_student_collator",
    "has_columns",
]
