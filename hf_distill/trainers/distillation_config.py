"""Arguments of `DistillationTrainer`: `TrainingArguments` plus the distillation objective and the
representation terms (https://hf-distill.readthedocs.io/algorithms/, "Distillation objectives")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..distributed import no_pin_memory_without_accelerator
from ..losses.chunked import check_loss_chunk_size
from ..losses.objectives import DISTILL_LOSSES, registered_distill_losses
from ..losses.representation import ATTENTION_LOSSES, CRD_POOLINGS, HIDDEN_LOSSES, POOLINGS, parse_layer_map
from ..losses.sparse import TOPK_TAILS
from ..safety.nonfinite import NONFINITE_POLICIES
from ..safety.redaction import RedactedSecretsMixin
from ..safety.validation import check_finite, check_integer


@dataclass
class DistillationTrainingArguments(RedactedSecretsMixin, TrainingArguments):
    """`TrainingArguments` plus the distillation objective (https://hf-distill.readthedocs.io/algorithms/, "Distillation objectives").

    Args:
        temperature (`float`, defaults to `2.0`):
            Softmax temperature τ of the distillation term (> 0).
        alpha (`float`, defaults to `0.5`):
            Weight of the distillation term; the task loss gets 1 - alpha. 1.0 is pure distillation (no
            labels needed), 0.0 is plain fine-tuning.
        distill_loss (`str`, defaults to `'kl'`):
            Distillation objective: kl, mse, dist, jsd, reverse_kl, or a loss registered with
            `register_distill_loss` before the arguments are built.
        jsd_beta (`float`, defaults to `0.5`):
            β of the generalized JSD (distill_loss='jsd'): 0 is forward KL, 1 is reverse KL.
        dist_intra_weight (`float`, defaults to `1.0`):
            Weight of the intra-class (across the batch) term of distill_loss='dist'.
        topk_tail (`str`, defaults to `'renormalize'`):
            Training data from a top-k teacher cache: renormalize (KL over the teacher's K tokens, both
            distributions renormalised over them; any temperature) or bucket (the K tokens plus one bucket for
            the rest, for both models; temperature 1 only).
        scale_by_temperature_squared (`bool`, defaults to `True`):
            Multiply kl/reverse_kl/jsd/dist by τ² so gradients keep their scale across τ.
        teacher_weights (`list[float] | None`, defaults to `None`):
            Weights of several teachers' softened distributions (default: equal weights).
        teacher_model_init_kwargs (`dict[str, Any] | str | None`, defaults to `None`):
            Keyword arguments (a dict or a JSON string) for from_pretrained when the teacher is given as a
            path or Hub id, e.g. '{"dtype": "bfloat16", "revision": "main"}'.
        teacher_name (`str | None`, defaults to `None`):
            The name the model card gives the teacher, e.g. your Hub id of the fine-tuned teacher (several
            teachers: one name each, separated by commas, in order). Default: the teacher's path or Hub id
            when given as a string; a module is named after its checkpoint only while it holds that
            checkpoint's weights, else described as initialised from it.
        allow_untrained_teacher_head (`bool`, defaults to `False`):
            Accept a teacher path or Hub id whose task head is missing from the checkpoint (initialised at
            random); by default that is an error, since such a teacher is not fine-tuned on the task.
        allow_partial_checkpoint (`bool`, defaults to `False`):
            Resume from a checkpoint whose save did not finish or that lost its optimizer or schedule state
            (they then start afresh, with a warning). Off: such a checkpoint is refused, naming the newest
            complete one.
        nonfinite (`str`, defaults to `'error'`):
            What a NaN or infinite loss, logits, gradient or influence weight does: error (stop, naming the step,
            the quantity and the first non-finite weight) or skip (skip both models' updates for that step and
            count it in the logs as nonfinite_skipped_steps).
        max_consecutive_nonfinite_skips (`int`, defaults to `5`):
            With nonfinite='skip', stop with an error after this many skipped steps in a row.
        loss_chunk_size (`int | None`, defaults to `None`):
            Causal language models: compute the token-level distillation and task losses from the last hidden
            states, this many token positions at a time, never forming the full (tokens × vocabulary) logits
            (same loss and gradients; for large vocabularies). None computes them from the full logits.
        hidden_distill_weight (`float`, defaults to `0.0`):
            Weight of the hidden-state (PKD) term added to the student's loss (0 turns it off); see
            https://hf-distill.readthedocs.io/representation/.
        hidden_layer_map (`str`, defaults to `'uniform'`):
            Student layer → teacher layer for the hidden-state and attention terms: a preset (uniform, skip,
            last) or a dict / JSON object such as '{"1": 4, "2": 8}' (0 is the embeddings).
        hidden_pooling (`str`, defaults to `'cls'`):
            Representation compared by the hidden-state term: cls (position 0), mean (over the attention
            mask) or tokens (every attended token).
        hidden_loss (`str`, defaults to `'mse'`):
            Hidden-state loss: mse (‖ŝ − t̂‖² of L2-normalised vectors, PKD) or cosine (1 − cos).
        attention_distill_weight (`float`, defaults to `0.0`):
            Weight of the attention-map term over the mapped layers (0 turns it off); needs equal head
            counts and attn_implementation='eager' for both models.
        attention_loss (`str`, defaults to `'mse'`):
            Attention-map loss: mse, or kl = KL(teacher ‖ student) per query row.
        crd_weight (`float`, defaults to `0.0`):
            Weight of the contrastive (CRD, InfoNCE) term (0 turns it off).
        crd_temperature (`float`, defaults to `0.07`):
            Temperature of the CRD critic exp(g_s · g_t / temperature) (> 0).
        crd_dim (`int`, defaults to `128`):
            Width of CRD's shared projection space (heads g_s, g_t).
        crd_num_negatives (`int`, defaults to `0`):
            Size of the memory bank of past teacher embeddings used as extra CRD negatives (0: the other
            inputs of the batch only).
        crd_pooling (`str`, defaults to `'cls'`):
            Embedding of the last layer that CRD contrasts: cls or mean (over the attention mask).

    Every argument of `TrainingArguments` applies too. Credentials in any argument (``hub_token``, a ``token``
    in ``teacher_model_init_kwargs``) stay usable in memory but are replaced by ``"<redacted>"`` in what is
    saved or printed (``training_args.bin``, ``to_dict``, ``to_json_string``, ``str``).
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature τ of the distillation term (> 0)."}
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the distillation term; the task loss gets 1 - alpha. 1.0 is pure distillation "
            "(no labels needed), 0.0 is plain fine-tuning."
        },
    )
    distill_loss: str = field(
        default="kl",
        metadata={
            # No "choices": a loss registered after this class is defined is accepted, checked in __post_init__.
            "help": f"Distillation objective: {', '.join(DISTILL_LOSSES)}, or a loss registered with "
            "hf_distill.register_distill_loss before the arguments are built.",
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "β of the generalized JSD (distill_loss='jsd'): 0 is forward KL, 1 is reverse KL."},
    )
    dist_intra_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the intra-class (across the batch) term of distill_loss='dist'."},
    )
    topk_tail: str = field(
        default="renormalize",
        metadata={
            "help": "Training data from a top-k teacher cache: renormalize (KL over the teacher's K tokens, both "
            "distributions renormalised over them; any temperature) or bucket (the K tokens plus one bucket for "
            "the rest, for both models; temperature 1 only).",
            "choices": TOPK_TAILS,
        },
    )
    scale_by_temperature_squared: bool = field(
        default=True,
        metadata={"help": "Multiply kl/reverse_kl/jsd/dist by τ² so gradients keep their scale across τ."},
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of several teachers' softened distributions (default: equal weights)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments (a dict or a JSON string) for from_pretrained when the teacher is given "
            'as a path or Hub id, e.g. \'{"dtype": "bfloat16", "revision": "main"}\'.'
        },
    )
    teacher_name: str | None = field(
        default=None,
        metadata={
            "help": "The name the model card gives the teacher, e.g. your Hub id of the fine-tuned teacher "
            "(several teachers: one name each, separated by commas, in order). Default: the teacher's path or "
            "Hub id when given as a string; a module is named after its checkpoint only while it holds that "
            "checkpoint's weights, else described as initialised from it."
        },
    )
    allow_untrained_teacher_head: bool = field(
        default=False,
        metadata={
            "help": "Accept a teacher path or Hub id whose task head is missing from the checkpoint (initialised "
            "at random); by default that is an error, since such a teacher is not fine-tuned on the task."
        },
    )
    allow_partial_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint whose save did not finish (no checkpoint_manifest.json) or that lost "
            "its optimizer.pt or scheduler.pt (the optimizer or schedule then start afresh, with a warning). "
            "Off: such a checkpoint is refused, naming the newest complete one."
        },
    )
    nonfinite: str = field(
        default="error",
        metadata={
            "help": "What a NaN or infinite loss, logits, gradient or influence weight does: error (stop, naming "
            "the step, the quantity and the first non-finite weight) or skip (skip both models' updates for that "
            "step and count it in the logs as nonfinite_skipped_steps).",
            "choices": NONFINITE_POLICIES,
        },
    )
    max_consecutive_nonfinite_skips: int = field(
        default=5,
        metadata={
            "help": "With nonfinite='skip', stop with an error after this many skipped steps in a row."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Causal language models: compute the token-level distillation and task losses from the last "
            "hidden states, this many token positions at a time, never forming the full (tokens × vocabulary) "
            "logits (same loss and gradients; for large vocabularies). None computes them from the full logits."
        },
    )

    hidden_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state (PKD) term added to the student's loss (0 turns it off); see "
            "https://hf-distill.readthedocs.io/representation/."
        },
    )
    hidden_layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Student layer → teacher layer for the hidden-state and attention terms: a preset (uniform, "
            'skip, last) or a dict / JSON object such as \'{"1": 4, "2": 8}\' (0 is the embeddings).'
        },
    )
    hidden_pooling: str = field(
        default="cls",
        metadata={
            "help": "Representation compared by the hidden-state term: cls (position 0), mean (over the "
            "attention mask) or tokens (every attended token).",
            "choices": POOLINGS,
        },
    )
    hidden_loss: str = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss: mse (‖ŝ − t̂‖² of L2-normalised vectors, PKD) or cosine (1 − cos).",
            "choices": HIDDEN_LOSSES,
        },
    )
    attention_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the attention-map term over the mapped layers (0 turns it off); needs equal head "
            "counts and attn_implementation='eager' for both models."
        },
    )
    attention_loss: str = field(
        default="mse",
        metadata={
            "help": "Attention-map loss: mse, or kl = KL(teacher ‖ student) per query row.",
            "choices": ATTENTION_LOSSES,
        },
    )
    crd_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the contrastive (CRD, InfoNCE) term (0 turns it off)."},
    )
    crd_temperature: float = field(
        default=0.07, metadata={"help": "Temperature of the CRD critic exp(g_s · g_t / temperature) (> 0)."}
    )
    crd_dim: int = field(
        default=128, metadata={"help": "Width of CRD's shared projection space (heads g_s, g_t)."}
    )
    crd_num_negatives: int = field(
        default=0,
        metadata={
            "help": "Size of the memory bank of past teacher embeddings used as extra CRD negatives (0: the "
            "other inputs of the batch only)."
        },
    )
    crd_pooling: str = field(
        default="cls",
        metadata={
            "help": "Embedding of the last layer that CRD contrasts: cls or mean (over the attention mask).",
            "choices": CRD_POOLINGS,
        },
    )

    def __post_init__(self) -> None:
        # Checked before TrainingArguments' own set-up so that a typo fails fast.
        self._check_representation_arguments()
        check_finite(
            "temperature", self.temperature, 0, low_open=True, hint="1.0 leaves the logits unchanged."
        )
        check_finite(
            "alpha", self.alpha, 0, 1, hint="It weights the distillation term and 1 - alpha the task loss."
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            check_integer(name, getattr(self, name), 1, hint="It is the number of rows per device and step.")
        if self.distill_loss not in registered_distill_losses():
            raise ValueError(
                f"distill_loss={self.distill_loss!r} is unknown; choose one of {registered_distill_losses()}, "
                "or register it with hf_distill.register_distill_loss before building the arguments."
            )
        check_finite("jsd_beta", self.jsd_beta, 0, 1, hint="0 is forward KL, 1 reverse KL.")
        check_finite("dist_intra_weight", self.dist_intra_weight, 0)
        if self.topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail={self.topk_tail!r} is unknown; choose one of {TOPK_TAILS}.")
        if self.loss_chunk_size is not None:
            self.loss_chunk_size = check_loss_chunk_size(self)
        check_finite("learning_rate", self.learning_rate, 0, hint="The student's, e.g. 5e-5.")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={self.nonfinite!r} is unknown; choose one of {NONFINITE_POLICIES}.")
        self.max_consecutive_nonfinite_skips = check_integer(
            "max_consecutive_nonfinite_skips", self.max_consecutive_nonfinite_skips, 1
        )
        check_finite("max_grad_norm", self.max_grad_norm, 0, hint="0 disables the student's clipping.")
        if self.teacher_weights is not None:
            if len(self.teacher_weights) == 0:
                raise ValueError("teacher_weights must hold one weight per teacher, got an empty list.")
            for position, weight in enumerate(self.teacher_weights):
                check_finite(f"teacher_weights[{position}]", weight, 0)
            if sum(self.teacher_weights) <= 0:
                raise ValueError("teacher_weights must not all be zero.")
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"teacher_model_init_kwargs is not valid JSON: {err}") from err
        if self.teacher_name is not None and (
            not isinstance(self.teacher_name, str) or not all(n.strip() for n in self.teacher_name.split(","))
        ):
            raise ValueError(
                f"teacher_name={self.teacher_name!r} is not a list of names: give one name per teacher, "
                "separated by commas (e.g. 'me/teacher-a,me/teacher-b'), with no empty one."
            )
        super().__post_init__()
        no_pin_memory_without_accelerator(self)

    def _check_representation_arguments(self) -> None:
        for name in ("hidden_distill_weight", "attention_distill_weight", "crd_weight"):
            check_finite(name, getattr(self, name), 0, hint="0 turns the term off.")
        self.hidden_layer_map = parse_layer_map(self.hidden_layer_map)
        for name, choices in (
            ("hidden_pooling", POOLINGS),
            ("hidden_loss", HIDDEN_LOSSES),
            ("attention_loss", ATTENTION_LOSSES),
            ("crd_pooling", CRD_POOLINGS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; choose one of {choices}.")
        check_finite("crd_temperature", self.crd_temperature, 0, low_open=True, hint="CRD uses 0.07.")
        if isinstance(self.crd_dim, bool) or int(self.crd_dim) != self.crd_dim or self.crd_dim < 1:
            raise ValueError(f"crd_dim must be an integer >= 1 (e.g. 128), got {self.crd_dim!r}.")
        if (
            isinstance(self.crd_num_negatives, bool)
            or int(self.crd_num_negatives) != self.crd_num_negatives
            or self.crd_num_negatives < 0
        ):
            raise ValueError(
                f"crd_num_negatives must be an integer >= 0 (0: in-batch negatives only), got "
                f"{self.crd_num_negatives!r}."
            )
        self.crd_dim, self.crd_num_negatives = int(self.crd_dim), int(self.crd_num_negatives)

    @property
    def uses_representations(self) -> bool:
        """Whether any representation term (hidden states, attention, CRD) has a weight."""
        return self.hidden_distill_weight > 0 or self.attention_distill_weight > 0 or self.crd_weight > 0
