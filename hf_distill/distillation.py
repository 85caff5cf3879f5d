"""Classic teacher→student distillation (shared/ALGORITHMS.md §2): arguments and trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, get_last_checkpoint

from .data import (
    ROW_ID,
    TEACHER_LOGITS,
    TEACHER_PREFIX,
    DistillationDataCollator,
    dataset_columns,
    default_student_collator,
    split_batch,
)
from .label_checks import check_label_range, check_not_empty, find_label_column
from .model_card import (
    LOCAL,
    DistillationRun,
    TeacherInfo,
    build_model_card,
    dataset_name_and_tags,
    describe_source,
    final_eval_metrics,
    summarize_influence,
)
from .objectives import DISTILL_LOSSES, distillation_loss, ensemble_teacher_logits, logit_mse, token_mask
from .redaction import RedactedSecretsMixin
from .representation import (
    ATTENTION_LOSSES,
    CRD_POOLINGS,
    HEADS_FILE,
    HIDDEN_LOSSES,
    POOLINGS,
    RepresentationHeads,
    attention_loss,
    heads_are_empty,
    hidden_state_loss,
    layer_map,
    model_dimensions,
    parse_layer_map,
    pool,
)
from .teacher import (
    CAUSAL_LM,
    MASKED_LM,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TOKEN_LEVEL_TASKS,
    average_gradients_across_processes,
    check_teacher_student_compatible,
    count_parameters,
    forward_arg_names,
    load_teacher,
    prepare_frozen_teacher,
    task_type,
    unwrap_model,
)
from .validation import check_finite

try:  # the HfApi that transformers' own Hub calls use (tagged with the library's name)
    from transformers.utils.hub import hf_api
except ImportError:  # pragma: no cover - older transformers
    from huggingface_hub import HfApi

    def hf_api() -> HfApi:
        return HfApi(library_name="transformers")


logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels", "label_ids")
# The folder, inside output_dir, from which the student is uploaded ("_*" is never uploaded from output_dir).
HUB_STAGING_DIR = "_hub_student"
_PIPELINE_TAGS = {
    SEQUENCE_CLASSIFICATION: ("text-classification", "AutoModelForSequenceClassification"),
    TOKEN_CLASSIFICATION: ("token-classification", "AutoModelForTokenClassification"),
    CAUSAL_LM: ("text-generation", "AutoModelForCausalLM"),
    MASKED_LM: ("fill-mask", "AutoModelForMaskedLM"),
}


@dataclass
class DistillationTrainingArguments(RedactedSecretsMixin, TrainingArguments):
    """`TrainingArguments` plus the distillation objective (shared/ALGORITHMS.md §1).

    Credentials in any argument (``hub_token``, a ``token`` in ``teacher_model_init_kwargs``) stay usable in
    memory but are replaced by ``"<redacted>"`` in what is saved or printed (``training_args.bin``,
    ``to_dict``, ``to_json_string``, ``str``).
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
            "help": f"Distillation objective, one of {', '.join(DISTILL_LOSSES)}.",
            "choices": DISTILL_LOSSES,
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

    hidden_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state (PKD) term added to the student's loss (0 turns it off); see "
            "docs/representation.md."
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
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(
                f"distill_loss={self.distill_loss!r} is unknown; choose one of {DISTILL_LOSSES}."
            )
        check_finite("jsd_beta", self.jsd_beta, 0, 1, hint="0 is forward KL, 1 reverse KL.")
        check_finite("dist_intra_weight", self.dist_intra_weight, 0)
        check_finite("learning_rate", self.learning_rate, 0, hint="The student's, e.g. 5e-5.")
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
        super().__post_init__()

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


class DistillationTrainer(Trainer):
    """`Trainer` that distils a frozen teacher (or several) into ``model``.

    ``DistillationTrainer(model=student, teacher_model=teacher, args=DistillationTrainingArguments(...), ...)``;
    every other `Trainer` argument keeps its meaning. ``teacher_model`` is a module, a local path, a Hub id,
    or a list of them (an ensemble). ``teacher_processing_class`` is the teacher's own tokenizer, used to pad
    ``teacher_`` input columns when the teacher reads the text differently from the student.
    """

    method_name = "kd"
    _tag_names = ["hf-distill", "knowledge-distillation"]

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | Sequence[nn.Module | str] | None = None,
        args: DistillationTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher_model is None:
            raise ValueError(
                f"{type(self).__name__} needs teacher_model= (a model, a path, a Hub id or a list of them); "
                "for fine-tuning without a teacher use transformers.Trainer."
            )
        if args is None:
            args = self._default_args_class()(output_dir="tmp_trainer")
        if not isinstance(args, self._default_args_class()):
            raise TypeError(
                f"{type(self).__name__} needs args of type {self._default_args_class().__name__} (it carries the "
                f"distillation settings), got {type(args).__name__}. Build it with the same fields."
            )
        if not isinstance(data_collator, DistillationDataCollator):
            data_collator = DistillationDataCollator(
                data_collator or default_student_collator(processing_class), teacher_processing_class
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher_processing_class = teacher_processing_class
        teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
            raise ValueError(
                f"teacher_weights has {len(args.teacher_weights)} entries for {len(teachers)} teachers; give one "
                "weight per teacher."
            )
        self._teacher_sources = [_teacher_source(t, args.teacher_model_init_kwargs) for t in teachers]
        teachers = [load_teacher(t, self.model, args.teacher_model_init_kwargs) for t in teachers]
        for position, teacher in enumerate(teachers):
            check_teacher_student_compatible(teacher, self.model, position)
        self.teacher_models: list[nn.Module] = self._prepare_teachers(teachers)
        self._teacher_arg_names = [forward_arg_names(t) - {"labels"} for t in self.teacher_models]
        self._student_task = task_type(self.model)
        self._token_level = self._student_task in TOKEN_LEVEL_TASKS
        # Causal LM logits at position t predict token t + 1 (Trainer's own flag misses models whose
        # loss_type is only set at the first forward).
        self._shift_labels = self._student_task == CAUSAL_LM or bool(
            getattr(self, "_loss_shifts_labels", False)
        )
        # Sequence-level losses are per-micro-batch means, so Trainer divides them by the accumulation
        # steps; token-level ones follow Trainer's own num_items_in_batch normalisation.
        self.loss_is_scaled_for_ga = None if self._token_level else False
        self._logged_components: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._check_teacher_inputs(self.train_dataset)
        self._check_labels(self.train_dataset)
        self.representation_heads: RepresentationHeads | None = None
        self._layer_map: dict[int, int] = {}
        self._teacher_features: dict[str, Any] | None = None
        self._setup_representations()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names + [self.method_name])

    # ----- set-up -------------------------------------------------------------------------------------------

    @classmethod
    def _default_args_class(cls) -> type[DistillationTrainingArguments]:
        return DistillationTrainingArguments

    def _prepare_teachers(self, teachers: list[nn.Module]) -> list[nn.Module]:
        """Frozen teachers, placed for this run; trainers whose teacher learns override this."""
        return [prepare_frozen_teacher(t, self.accelerator) for t in teachers]

    @property
    def teacher_model(self) -> nn.Module | list[nn.Module]:
        """The teacher (or the list of teachers of an ensemble)."""
        return self.teacher_models[0] if len(self.teacher_models) == 1 else self.teacher_models

    def _set_signature_columns_if_needed(self) -> None:
        # The one place Trainer decides which dataset columns survive `remove_unused_columns`; the teacher's
        # inputs, cached logits and row ids must survive too.
        super()._set_signature_columns_if_needed()
        extra = [TEACHER_LOGITS, ROW_ID]
        for names in getattr(self, "_teacher_arg_names", []):
            extra += [TEACHER_PREFIX + n for n in names]
        self._signature_columns = list(dict.fromkeys(self._signature_columns + extra))

    def _teachers_need_own_inputs(self) -> list[int]:
        """Positions of teachers whose vocabulary differs from the student's."""
        student_config = getattr(unwrap_model(self.model), "config", None)
        student_vocab = getattr(student_config, "vocab_size", None)
        differing = []
        for position, teacher in enumerate(self.teacher_models):
            teacher_vocab = getattr(getattr(unwrap_model(teacher), "config", None), "vocab_size", None)
            if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
                differing.append(position)
        if (
            not differing
            and isinstance(self.teacher_processing_class, PreTrainedTokenizerBase)
            and isinstance(self.processing_class, PreTrainedTokenizerBase)
            and self.teacher_processing_class.get_vocab() != self.processing_class.get_vocab()
        ):
            differing = list(range(len(self.teacher_models)))
        return differing

    def _check_teacher_inputs(self, dataset: Any) -> None:
        columns = dataset_columns(dataset)
        if not columns or TEACHER_LOGITS in columns:
            return
        has_teacher_inputs = any(c.startswith(TEACHER_PREFIX) for c in columns)
        if has_teacher_inputs and self._token_level:
            raise ValueError(
                "teacher_ input columns (a teacher with its own tokenizer) cannot be used for token-level tasks: "
                "the two tokenisations do not align position by position. Use a teacher that shares the "
                "student's tokenizer."
            )
        differing = self._teachers_need_own_inputs()
        if differing and not has_teacher_inputs:
            raise ValueError(
                f"Teacher(s) {differing} and the student have different vocabularies, and the training data has "
                "no teacher_ input columns, so the teacher would read the student's token ids as its own. "
                "Tokenise the text for the teacher with hf_distill.add_teacher_inputs(dataset, teacher_tokenizer, "
                "text_columns) and pass teacher_processing_class=teacher_tokenizer, or cache the teacher's logits "
                "with hf_distill.cache_teacher_logits."
            )

    def _check_labels(self, dataset: Any) -> None:
        check_not_empty(dataset, "training set (train_dataset)", "Pass a dataset with rows.")
        self._check_label_range(dataset, "training")
        if isinstance(self.eval_dataset, Sized):
            self._check_label_range(self.eval_dataset, "evaluation")
        columns = dataset_columns(dataset)
        if not columns or self.args.alpha == 1.0 or self._student_task not in (SEQUENCE_CLASSIFICATION, None):
            return  # language-model labels are often made by the collator: checked per batch instead
        if not any(c in columns for c in (*LABEL_COLUMNS, *self.label_names)):
            raise ValueError(
                f"The training data has no label column (looked for {LABEL_COLUMNS}), but alpha={self.args.alpha} "
                "gives the task loss a weight of 1 - alpha. Add a 'label' column, or set alpha=1.0 to distil "
                "from the teacher alone."
            )

    def _check_label_range(self, dataset: Any, description: str) -> None:
        """Class labels outside [0, num_labels) fail at construction, with the value and row named."""
        if self._student_task not in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION) or self._is_regression():
            return
        num_labels = getattr(getattr(unwrap_model(self.model), "config", None), "num_labels", None)
        column = find_label_column(dataset_columns(dataset), self.label_names)
        if num_labels and column is not None:
            check_label_range(dataset, column, num_labels, description)

    # ----- representation distillation (hidden states, attention maps, CRD) -----------------------------------

    def _setup_representations(self) -> None:
        """Check the models against the representation arguments and build the heads, before any training."""
        args = self.args
        if not args.uses_representations:
            return
        if len(self.teacher_models) != 1:
            raise ValueError(
                f"Representation distillation (hidden_distill_weight, attention_distill_weight, crd_weight) reads "
                f"one teacher's hidden states; got an ensemble of {len(self.teacher_models)} teachers. Use one "
                "teacher, or set those weights to 0 for an ensemble."
            )
        if TEACHER_LOGITS in dataset_columns(self.train_dataset):
            raise ValueError(
                f"The training data has a cached '{TEACHER_LOGITS}' column, which holds no hidden states, and "
                "representation distillation needs the teacher's forward. Remove the column, or set "
                "hidden_distill_weight, attention_distill_weight and crd_weight to 0."
            )
        columns = dataset_columns(self.train_dataset)
        own_inputs = any(c.startswith(TEACHER_PREFIX) for c in columns) or bool(
            self._teachers_need_own_inputs()
        )
        token_aligned = args.attention_distill_weight > 0 or (
            args.hidden_distill_weight > 0 and args.hidden_pooling == "tokens"
        )
        if own_inputs and token_aligned:
            raise ValueError(
                "Attention maps and hidden_pooling='tokens' compare the models position by position, but the "
                "teacher reads its own tokenisation (teacher_ input columns); use hidden_pooling='cls' or 'mean' "
                "and attention_distill_weight=0, or a teacher that shares the student's tokenizer."
            )
        student, teacher = unwrap_model(self.model), unwrap_model(self.teacher_models[0])
        s_width, s_layers, s_heads = model_dimensions(_base_with_config(student))
        t_width, t_layers, t_heads = model_dimensions(_base_with_config(teacher))
        hidden_layers: list[int] = []
        if args.hidden_distill_weight > 0 or args.attention_distill_weight > 0:
            self._layer_map = layer_map(args.hidden_layer_map, s_layers, t_layers)
            hidden_layers = list(self._layer_map) if args.hidden_distill_weight > 0 else []
        if args.attention_distill_weight > 0:
            if s_heads != t_heads:
                raise ValueError(
                    f"attention_distill_weight > 0 compares attention maps head by head, but the student has "
                    f"{s_heads} attention heads and the teacher {t_heads}. Use models with the same head count, "
                    "or set attention_distill_weight=0 (hidden states and CRD work across head counts)."
                )
            if 0 in self._layer_map or 0 in self._layer_map.values():
                raise ValueError(
                    f"hidden_layer_map {self._layer_map} maps layer 0 (the embeddings), which has no attention "
                    "map; map layers >= 1 or set attention_distill_weight=0."
                )
            for role, model in (("student", student), ("teacher", teacher)):
                attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
                if attention not in (None, "eager"):
                    raise ValueError(
                        f"attention_distill_weight > 0 needs the {role}'s attention weights, which "
                        f"attn_implementation={attention!r} does not return. Load the {role} with "
                        f"attn_implementation='eager' (or call {role}.set_attn_implementation('eager'))."
                    )
        heads = RepresentationHeads(
            s_width,
            t_width,
            hidden_layers,
            crd_dim=args.crd_dim if args.crd_weight > 0 else None,
            crd_num_negatives=args.crd_num_negatives,
        )
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.representation_heads = heads.to(device)

    def _wants_attentions(self) -> bool:
        return self.args.attention_distill_weight > 0

    def _student_feed(self, student_inputs: dict[str, Any]) -> dict[str, Any]:
        """The student's training inputs, asking for hidden states / attention maps when they are used."""
        if not self.args.uses_representations:
            return student_inputs
        feed = {**student_inputs, "output_hidden_states": True}
        if self._wants_attentions():
            feed["output_attentions"] = True
        return feed

    def _keep_teacher_features(self, outputs: Any, attention_mask: torch.Tensor | None) -> None:
        """Keep the mapped layers' (pooled) hidden states and attention maps of a teacher forward, drop the rest."""
        args = self.args
        hidden = outputs.hidden_states
        features: dict[str, Any] = {}
        if args.hidden_distill_weight > 0:
            features["hidden"] = {
                t: pool(hidden[t], attention_mask, args.hidden_pooling) for t in set(self._layer_map.values())
            }
        if args.crd_weight > 0:
            features["crd"] = pool(hidden[-1], attention_mask, args.crd_pooling)
        if self._wants_attentions():
            features["attention"] = {t: outputs.attentions[t - 1] for t in set(self._layer_map.values())}
        self._teacher_features = features

    def representation_term(
        self, student_outputs: Any, student_inputs: dict[str, Any]
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The weighted sum of the representation terms, and each unweighted term for the logs."""
        args = self.args
        teacher, self._teacher_features = self._teacher_features, None
        if not args.uses_representations:
            return None, {}
        if teacher is None:
            raise RuntimeError(
                "Representation distillation found no teacher hidden states for this batch (cached teacher "
                "logits, or a teacher forward that was skipped); they cannot be combined."
            )
        heads = self.representation_heads
        mask = student_inputs.get("attention_mask")
        hidden = student_outputs.hidden_states
        if hidden is None:
            raise ValueError(
                "The student returned no hidden_states for output_hidden_states=True; representation "
                "distillation needs a model that returns them."
            )
        total, parts = None, {}
        if args.hidden_distill_weight > 0:
            losses = []
            for s_layer, t_layer in self._layer_map.items():
                s_vec = heads.project_hidden(s_layer, pool(hidden[s_layer], mask, args.hidden_pooling))
                t_vec = teacher["hidden"][t_layer].to(s_vec.device)
                token_mask_ = mask if args.hidden_pooling == "tokens" else None
                if token_mask_ is not None and t_vec.shape[1] != s_vec.shape[1]:
                    raise ValueError(
                        f"hidden_pooling='tokens' needs the same sequence length for both models, got student "
                        f"{s_vec.shape[1]} and teacher {t_vec.shape[1]}."
                    )
                losses.append(hidden_state_loss(s_vec, t_vec, args.hidden_loss, token_mask_))
            parts["hidden_loss"] = torch.stack(losses).mean()
            total = args.hidden_distill_weight * parts["hidden_loss"]
        if self._wants_attentions():
            attentions = student_outputs.attentions
            if not attentions:
                raise ValueError(
                    "The student returned no attentions for output_attentions=True; load it with "
                    "attn_implementation='eager'."
                )
            losses = [
                attention_loss(
                    attentions[s_layer - 1],
                    teacher["attention"][t_layer].to(attentions[s_layer - 1].device),
                    args.attention_loss,
                    mask,
                )
                for s_layer, t_layer in self._layer_map.items()
            ]
            parts["attention_loss"] = torch.stack(losses).mean()
            term = args.attention_distill_weight * parts["attention_loss"]
            total = term if total is None else total + term
        if args.crd_weight > 0:
            s_emb = pool(hidden[-1], mask, args.crd_pooling)
            parts["crd_loss"] = heads.crd_loss(s_emb, teacher["crd"].to(s_emb.device), args.crd_temperature)
            term = args.crd_weight * parts["crd_loss"]
            total = term if total is None else total + term
        return total, parts

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, plus a parameter group for the representation heads (trained with the
        student, at its learning rate, without weight decay); their gradients are clipped on their own (to
        ``max_grad_norm``) and averaged over processes before each step."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        heads = self.representation_heads
        params = [] if heads is None else [p for p in heads.parameters() if p.requires_grad]
        inner = getattr(optimizer, "optimizer", optimizer)
        known = {id(p) for g in inner.param_groups for p in g["params"]}
        if params and not any(id(p) in known for p in params):
            inner.add_param_group({"params": params, "weight_decay": 0.0, "lr": self.args.learning_rate})
            inner.register_step_pre_hook(lambda *_: self._prepare_head_gradients(params))
            inner.register_step_post_hook(lambda *_: heads.zero_grad(set_to_none=True))
        return optimizer

    def _prepare_head_gradients(self, params: list[nn.Parameter]) -> None:
        # The heads are not in the student's DDP wrapper nor in Trainer's gradient clipping.
        average_gradients_across_processes(params)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Written before Trainer rotates old checkpoints away (as the learning teacher's state in online.py).
        if self.args.should_save and not heads_are_empty(self.representation_heads):
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            save_heads(folder, self.representation_heads)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, also restoring the representation heads (``distill_heads.safetensors``) on resume."""
        if not heads_are_empty(self.representation_heads) and resume_from_checkpoint not in (None, False, ""):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(
                        f"No checkpoint found in output_dir {self.args.output_dir} to resume from."
                    )
            load_heads(resume_from_checkpoint, self.representation_heads)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ----- the loss -----------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``alpha · distillation + (1 − alpha) · task loss`` in training; the student's task loss in evaluation."""
        student_inputs, teacher_inputs, cached_logits, _ = split_batch(inputs)
        task_items = num_items_in_batch if self._token_level else None
        if not model.training:
            return super().compute_loss(
                model, student_inputs, return_outputs=return_outputs, num_items_in_batch=task_items
            )
        task_loss, outputs = self._student_forward(model, student_inputs, task_items)
        self.before_teacher_targets(model, inputs, outputs)
        if cached_logits is not None:
            if self.args.uses_representations:
                raise ValueError(
                    f"The batch carries cached '{TEACHER_LOGITS}', which hold no hidden states; representation "
                    "distillation needs the teacher's forward. Remove the column or the representation weights."
                )
            teacher_logits = self._combine_teachers(self._split_cached(cached_logits))
        else:
            teacher_logits = self.teacher_logits(student_inputs, teacher_inputs)
        distill, distill_for_log = self.distillation_term(
            outputs.logits, teacher_logits, student_inputs, task_items
        )
        alpha = self.args.alpha
        loss = distill if task_loss is None else alpha * distill + (1.0 - alpha) * task_loss
        self._record("distill_loss", distill_for_log)
        if task_loss is not None:
            self._record("task_loss", self._task_loss_for_log(task_loss, student_inputs, task_items))
        representation, parts = self.representation_term(outputs, student_inputs)
        if representation is not None:
            if task_items is not None and self.model_accepts_loss_kwargs:
                # Trainer does not divide a num_items-normalised loss by the accumulation steps: a
                # per-micro-batch mean must be divided here.
                representation = representation / self.current_gradient_accumulation_steps
            loss = loss + representation
            for name, value in parts.items():
                self._record(name, value)
        return (loss, outputs) if return_outputs else loss

    def before_teacher_targets(self, model: nn.Module, inputs: dict[str, Any], student_outputs: Any) -> None:
        """Hook between the student's forward and the teacher's soft labels; trainers whose teacher learns
        update it here, so that the student learns from the updated teacher. Nothing for a frozen teacher."""

    def _student_forward(
        self, model: nn.Module, student_inputs: dict[str, Any], task_items: torch.Tensor | int | None
    ) -> tuple[torch.Tensor | None, Any]:
        """The student's outputs and task loss (``None`` when the batch has no labels and alpha is 1)."""
        has_labels = any(student_inputs.get(n) is not None for n in self.label_names)
        feed = self._student_feed(student_inputs)
        if has_labels:
            return super().compute_loss(model, feed, return_outputs=True, num_items_in_batch=task_items)
        if self.args.alpha < 1.0:
            raise ValueError(
                f"The training batch has no labels (expected {self.label_names}) but alpha={self.args.alpha} needs "
                "the task loss. Add labels to the data (or a collator that makes them), or set alpha=1.0."
            )
        return None, model(**feed)

    @torch.no_grad()
    def teacher_logits(self, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> torch.Tensor:
        """The teachers' (combined) logits for a batch; ``teacher_inputs`` win over the student's inputs."""
        if not teacher_inputs and self._teachers_need_own_inputs():
            raise ValueError(
                "The batch has no teacher_ input columns but the teacher's vocabulary differs from the "
                "student's; add them with hf_distill.add_teacher_inputs."
            )
        return self._combine_teachers(
            [self._run_teacher(i, student_inputs, teacher_inputs) for i in range(len(self.teacher_models))]
        )

    def _run_teacher(self, position: int, student_inputs: dict[str, Any], teacher_inputs: dict[str, Any]):
        teacher = self.teacher_models[position]
        if teacher.training:  # a callback or user code may have flipped it; a frozen teacher never drops out
            teacher.eval()
        source = teacher_inputs or student_inputs
        accepted = self._teacher_arg_names[position]
        feed = {k: v for k, v in source.items() if k in accepted}
        if position != 0 or not self.args.uses_representations:
            return teacher(**feed).logits
        feed["output_hidden_states"] = True
        if self._wants_attentions():
            feed["output_attentions"] = True
        outputs = teacher(**feed)
        self._keep_teacher_features(outputs, source.get("attention_mask"))
        logits = outputs.logits
        del outputs  # the unmapped layers' hidden states go with it
        return logits

    def _split_cached(self, cached: torch.Tensor) -> list[torch.Tensor]:
        if len(self.teacher_models) == 1:
            return [cached]
        if cached.dim() < 3 or cached.shape[1] != len(self.teacher_models):
            raise ValueError(
                f"Cached teacher_logits of shape {tuple(cached.shape)} do not hold one entry per teacher "
                f"({len(self.teacher_models)}); recompute them with hf_distill.cache_teacher_logits(dataset, "
                "[teacher, ...])."
            )
        return list(cached.unbind(1))

    def _is_regression(self) -> bool:
        config = getattr(unwrap_model(self.model), "config", None)
        return self._student_task == SEQUENCE_CLASSIFICATION and (
            getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 0) == 1
        )

    def _combine_teachers(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            return logits[0]
        average = "logits" if self.args.distill_loss == "mse" or self._is_regression() else "probs"
        return ensemble_teacher_logits(logits, self.args.teacher_weights, self.args.temperature, average)

    def aligned_positions(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) student and teacher logits of the positions that count.

        Sequence-level logits pass through; token-level ones keep the positions whose label is not -100
        (after the causal shift), or the attended ones when the batch has no labels.
        """
        teacher_logits = teacher_logits.to(student_logits.device)
        if student_logits.dim() == 2:
            return student_logits, teacher_logits
        teacher_logits = _match_length(teacher_logits, student_logits.shape[1])
        if self._shift_labels:
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        mask = token_mask(
            student_inputs.get("labels"), student_inputs.get("attention_mask"), self._shift_labels
        )
        if mask is None:
            return student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)
        return student_logits[mask], teacher_logits[mask]

    def distillation_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation loss for the backward pass, and its per-position mean for the logs."""
        if self._is_regression():
            # A regression head has no distribution to soften: match the teacher's prediction.
            loss = logit_mse(student_logits, teacher_logits.to(student_logits.device))
            return loss, loss.detach()
        s_flat, t_flat = self.aligned_positions(student_logits, teacher_logits, student_inputs)
        if student_logits.dim() == 2:
            loss = self._objective(s_flat, t_flat, "mean")
            return loss, loss.detach()
        if s_flat.shape[0] == 0:  # every label masked: nothing to distil, keep the graph connected
            zero = student_logits.sum() * 0.0
            return zero, zero.detach()
        summed = self._objective(s_flat, t_flat, "sum")
        mean_for_log = summed.detach() / s_flat.shape[0]
        if num_items_in_batch is None:
            return summed / s_flat.shape[0], mean_for_log
        loss = summed / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # num_items is global; DDP averages the gradients
        return loss, mean_for_log

    def _objective(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str
    ) -> torch.Tensor:
        a = self.args
        return distillation_loss(
            student_logits,
            teacher_logits,
            loss_type=a.distill_loss,
            temperature=a.temperature,
            scale_by_temperature_squared=a.scale_by_temperature_squared,
            jsd_beta=a.jsd_beta,
            dist_intra_weight=a.dist_intra_weight,
            reduction=reduction,
        )

    def _task_loss_for_log(
        self, task_loss: torch.Tensor, student_inputs: dict[str, Any], task_items: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The task loss as a per-position mean of this micro-batch, whatever normalisation Trainer used."""
        if task_items is None:
            return task_loss.detach()
        labels = student_inputs["labels"]
        shift = self._shift_labels
        local = (labels[:, 1:] if shift else labels).ne(-100).sum().clamp_min(1)
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return task_loss.detach() * task_items / scale / local

    # ----- logging ------------------------------------------------------------------------------------------

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._logged_components[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean distillation and task losses since the last training log to Trainer's logs."""
        if "loss" in logs and self._logged_components:
            for name, values in self._logged_components.items():
                mean = torch.stack(values).mean()
                # Six significant digits, not decimals: influence terms and their gradient norms are ~1e-6.
                logs[name] = float(f"{self.accelerator.reduce(mean, reduction='mean').item():.6g}")
            self._logged_components.clear()
        super().log(logs, start_time)

    # ----- saving and publishing the student ---------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`: the student alone (never the teacher), and, when you call it, its model card.

        The folder gets the student's weights (safetensors), config, tokenizer or processor, the training
        arguments, and ``README.md``, a model card describing the distillation (see `create_model_card`).
        """
        super().save_model(output_dir, _internal_call=True)
        if _internal_call:  # checkpoints and pushes: the card is written where it is needed
            return
        self.create_model_card(output_dir=output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        """Write the student's model card, ``README.md``, to ``output_dir`` (default ``args.output_dir``).

        The card's metadata has ``base_model`` (the student's initialisation, when it is a Hub model), the
        tags ``knowledge-distillation``, the method and ``hf-distill``, and a ``distillation`` block with the
        teacher's id and revision (``local`` for a local teacher), the key hyperparameters, the parameter
        counts and the compression ratio. The text adds the final student and teacher metrics, the
        training data, every distillation hyperparameter, the method's citation and, for LGTM, a summary
        of the influence weights. Arguments are those of `Trainer.create_model_card`; ``dataset`` names
        the training data and ``dataset_tags`` are its Hub ids (both default to the training set's own
        name); ``dataset_args`` is accepted for compatibility and unused.
        """
        if not self.args.should_save:
            return
        folder = os.fspath(output_dir) if output_dir is not None else self.args.output_dir
        if model_name is None:
            model_name = Path(folder).name if output_dir is not None else self._hub_model_name()
        run = self._distillation_run(
            model_name=model_name,
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
        )
        os.makedirs(folder, exist_ok=True)
        build_model_card(run).save(os.path.join(folder, "README.md"))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload the student alone to ``args.hub_model_id``: what `save_model` writes, model card included.

        Arguments are those of `Trainer.push_to_hub`; extra keyword arguments go to `create_model_card`.
        The teacher, its optimizer, checkpoints, influence logs and TensorBoard runs are never uploaded.
        As with `Trainer`, ``output_dir`` also receives the pushed student and its card.
        """
        # Trainer.push_to_hub uploads all of output_dir, which also holds what the run wrote there (influence
        # logs, TensorBoard runs/, a saved teacher): we save the student to a clean folder and upload that.
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        model_name = kwargs.pop("model_name", None) or self._hub_model_name()
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._finish_current_push()  # a checkpoint push may still be reading the staging folder
        staging = os.path.join(self.args.output_dir, HUB_STAGING_DIR)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.save_model(staging, _internal_call=True)  # every process: sharded models gather here
        if not self.is_world_process_zero():
            return None
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in getattr(self.model, "model_tags", None) or [] if t not in tags]
        self.create_model_card(model_name=model_name, tags=tags, output_dir=staging, **kwargs)
        for name in os.listdir(staging):  # output_dir holds the pushed student, as after Trainer.push_to_hub
            if os.path.isfile(os.path.join(staging, name)):
                shutil.copy2(os.path.join(staging, name), os.path.join(self.args.output_dir, name))
        return upload_staged_folder(
            staging,
            blocking,
            repo_id=self.hub_model_id,
            commit_message=commit_message,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer's pushes at each save (hub_strategy "every_save", "checkpoint", ...) upload all of output_dir
        # too: point them at the staging folder, which holds the student and its card alone. The checkpoint
        # pushes of hub_strategy "checkpoint"/"all_checkpoints" upload the resumable checkpoint as it is.
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        in_progress = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and in_progress is not None and not in_progress.is_done():
            return  # Trainer skips this push; the previous one may still be reading the staging folder
        output_dir = self.args.output_dir
        staging = os.path.join(output_dir, HUB_STAGING_DIR)
        self.create_model_card(model_name=self._hub_model_name(), output_dir=staging)
        self.args.output_dir = staging
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        finally:
            self.args.output_dir = output_dir

    def _hub_model_name(self) -> str:
        if self.args.hub_model_id is not None:
            return self.args.hub_model_id.split("/")[-1]
        return Path(self.args.output_dir).name

    def _distillation_run(
        self,
        model_name: str,
        language: str | None = None,
        license: str | None = None,
        tags: list[str] | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
    ) -> DistillationRun:
        """The plain inputs of the student's model card, gathered from this trainer."""
        name_or_path = getattr(getattr(unwrap_model(self.model), "config", None), "_name_or_path", "") or ""
        base_model, base_note = finetuned_from, None
        if base_model is None:
            identity = describe_source(name_or_path)[0]
            base_model = None if identity == LOCAL else identity
            base_note = LOCAL if base_model is None and name_or_path else None
        teachers = [
            TeacherInfo(identity, revision, count_parameters(teacher))
            for (identity, revision), teacher in zip(self._teacher_sources, self.teacher_models, strict=True)
        ]
        inferred_name, inferred_tags = dataset_name_and_tags(self.train_dataset)
        if isinstance(dataset_tags, str):
            dataset_tags = [dataset_tags]
        if isinstance(dataset, (list, tuple)):
            dataset = ", ".join(dataset)
        # With load_best_model_at_end the student is the best checkpoint's: report that evaluation.
        best_step = (
            getattr(self.state, "best_global_step", None) if self.args.load_best_model_at_end else None
        )
        student_metrics, teacher_metrics, eval_step = final_eval_metrics(
            self.state.log_history, up_to_step=best_step or None
        )
        pipeline_tag, auto_class = _PIPELINE_TAGS.get(self._student_task, (None, "AutoModel"))
        if tasks is not None:
            pipeline_tag = tasks if isinstance(tasks, str) else tasks[0]
        return DistillationRun(
            method=self.method_name,
            model_name=model_name,
            teachers=teachers,
            student_parameters=count_parameters(self.model),
            base_model=base_model,
            base_model_note=base_note,
            hyperparameters=self._card_hyperparameters(),
            student_metrics=student_metrics,
            teacher_metrics=teacher_metrics,
            eval_step=eval_step,
            dataset_name=dataset or (dataset_tags[0] if dataset_tags else inferred_name),
            dataset_tags=list(dataset_tags) if dataset_tags is not None else inferred_tags,
            influence_summary=summarize_influence(self.state.log_history),
            repo_id=self.hub_model_id or self.args.hub_model_id or model_name,
            pipeline_tag=pipeline_tag,
            language=language,
            license=license,
            tags=list(tags or []),
            library_name="peft"
            if hasattr(self.accelerator.unwrap_model(self.model), "peft_config")
            else "transformers",
            auto_class=auto_class,
        )

    def _card_hyperparameters(self) -> dict[str, Any]:
        """The run's optimisation settings and every distillation argument that applies, name to value."""
        args = self.args
        values: dict[str, Any] = {
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
            "max_steps": args.max_steps if args.max_steps > 0 else None,
            "seed": args.seed,
        }
        trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        for f in dataclasses.fields(args):
            if f.name not in trainer_fields and f.name != "teacher_model_init_kwargs":  # may hold a token
                values[f.name] = getattr(args, f.name)
        if args.distill_loss != "jsd":
            values.pop("jsd_beta", None)
        if args.distill_loss != "dist":
            values.pop("dist_intra_weight", None)
        for names, on in (
            (("hidden_distill_weight", "hidden_pooling", "hidden_loss"), args.hidden_distill_weight > 0),
            (("attention_distill_weight", "attention_loss"), args.attention_distill_weight > 0),
            (("hidden_layer_map",), args.hidden_distill_weight > 0 or args.attention_distill_weight > 0),
            (
                ("crd_weight", "crd_temperature", "crd_dim", "crd_num_negatives", "crd_pooling"),
                args.crd_weight > 0,
            ),
        ):
            for name in names if not on else ():
                values.pop(name, None)
        if isinstance(values.get("hidden_layer_map"), dict):
            values["hidden_layer_map"] = json.dumps(
                {str(k): v for k, v in values["hidden_layer_map"].items()}
            )
        if "quiz_split" in values and getattr(self, "quiz_from_train", True) is False:
            values["quiz_split"] = "quiz_dataset"  # given explicitly: no split of the training set
        return {k: v for k, v in values.items() if v is not None}


def upload_staged_folder(staging: str, blocking: bool, **upload_kwargs: Any) -> Any:
    """``HfApi.upload_folder`` of a staging folder, removed once the upload is done (or has failed)."""
    try:
        result = hf_api().upload_folder(folder_path=staging, run_as_future=not blocking, **upload_kwargs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if blocking:
        shutil.rmtree(staging, ignore_errors=True)
    else:
        result.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
    return result


def save_heads(checkpoint_dir: str | os.PathLike, heads: nn.Module) -> Path:
    """Write the representation heads' state to ``checkpoint_dir/distill_heads.safetensors`` (via a temporary
    file renamed at the end, so a crash never leaves a half-written file that a resume would trust)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    target = Path(checkpoint_dir) / HEADS_FILE
    staging = Path(checkpoint_dir) / f".{HEADS_FILE}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(staging), metadata={"format": "pt"})
    os.replace(staging, target)
    return target


def load_heads(checkpoint_dir: str | os.PathLike, heads: nn.Module) -> None:
    """Restore the representation heads written by `save_heads`, or a clear error."""
    path = Path(checkpoint_dir) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir} holds no representation heads ({path} is missing): it was written by a run "
            "without hidden_distill_weight / attention_distill_weight / crd_weight, or with other settings. Resume "
            "with the settings of that run, or start a new run."
        )
    saved = load_file(str(path))
    expected = heads.state_dict()
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        raise ValueError(
            f"The representation heads in {path} do not match this run's (saved {sorted(saved)[:6]}, expected "
            f"{sorted(expected)[:6]}); resume with the same models and representation arguments."
        )
    heads.load_state_dict({k: v.to(expected[k].device) for k, v in saved.items()})


def _base_with_config(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose config is the base model's anyway)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _teacher_source(teacher: Any, init_kwargs: dict[str, Any] | None) -> tuple[str, str | None]:
    """(id, revision) of a ``teacher_model`` entry, before it is loaded."""
    if isinstance(teacher, nn.Module):
        name_or_path = getattr(getattr(unwrap_model(teacher), "config", None), "_name_or_path", "")
        return describe_source(name_or_path)[0], None  # the revision it was loaded at is not recorded
    return describe_source(teacher, (init_kwargs or {}).get("revision"))


def _match_length(teacher_logits: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad cached token-level teacher logits to the student's padded length."""
    current = teacher_logits.shape[1]
    if current == length:
        return teacher_logits
    if current > length:
        return teacher_logits[:, :length]
    return torch.nn.functional.pad(teacher_logits, [0, 0, 0, length - current])
