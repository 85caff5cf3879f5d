"""The student ready for the Hub: saving and pushing it without the teacher (``hub``), its model card
(``model_card``, with the methods' papers in ``citations``), and where each model came from
(``model_sources``)."""

from .hub import (
    HUB_STAGING_DIR,
    HUB_TEACHER_STAGING_DIR,
    StudentPublishingMixin,
    TeacherPublishingMixin,
    teacher_source,
    upload_staged_folder,
)

__all__ = [
    "HUB_STAGING_DIR",
    "HUB_TEACHER_STAGING_DIR",
    "StudentPublishingMixin",
    "TeacherPublishingMixin",
    "teacher_source",
    "upload_staged_folder",
]
