"""The trainers, one method each: its arguments (``*_config.py``) beside its trainer (``*_trainer.py``).

``distillation`` (frozen teachers) is the base; ``learning_teacher`` adds a teacher with its own optimizer,
which ``online`` trains on its own loss, and ``quiz`` on a held-out quiz set for ``meta`` (MetaDistil) and
``lgtm`` (LGTM). Each is exported from `hf_distill` itself.
"""
