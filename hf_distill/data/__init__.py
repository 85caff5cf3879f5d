"""What the trainers read: the batch layout (``batch``), collators that keep the distillation columns
(``collators``), a teacher's own inputs and its cached logits, whole or top-k (``teacher_logits``, and the
``hf-distill-cache-logits`` command in ``cache_command``), the quiz split (``quiz``), the masked transfer set
(``transfer``), and the checks of a dataset's columns (``label_checks``) against the models that read it
(``dataset_checks``)."""

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
