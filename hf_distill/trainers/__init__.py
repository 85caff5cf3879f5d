"""The trainers, one method each: its arguments (``*_config.py``) beside its trainer (``*_trainer.py``).

``distillation`` (frozen teachers) is the base; ``learning_teacher`` adds a teacher with its own optimizer,
which ``online`` trains on its own loss, and ``quiz`` on a held-out quiz set for ``meta`` (MetaDistil) and
``lgtm`` (LGTM). Each is exported from `hf_distill` itself. The base trainer's shared machinery sits beside
them: ``checkpointing`` (verified checkpoints and resumes), ``data_checks`` (the data checked against the
models when a trainer is built) and ``topk_targets`` (training from a top-k teacher cache).
"""
