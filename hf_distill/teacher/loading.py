"""Loading a teacher, telling a model's head, freezing and placing a frozen teacher, and the
teacher/student compatibility checks.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import Any

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from ..distributed import unwrap_model

logger = logging.getLogger(__name__)


SEQUENCE_CLASSIFICATION = "sequence_classification"


TOKEN_CLASSIFICATION = "token_classification"


CAUSAL_LM = "causal_lm"


MASKED_LM = "masked_lm"


_AUTO_CLASS = {
    SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    CAUSAL_LM: AutoModelForCausalLM,
    MASKED_LM: AutoModelForMaskedLM,
}


_CLASS_NAMES = {
    SEQUENCE_CLASSIFICATION: set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()),
    TOKEN_CLASSIFICATION: set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()),
    CAUSAL_LM: set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()),
    MASKED_LM: set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()),
}


TOKEN_LEVEL_TASKS = (TOKEN_CLASSIFICATION, CAUSAL_LM, MASKED_LM)


def task_type(model: nn.Module) -> str | None:
    """The head type of a transformers model (one of the constants above), from its class name."""
    name = type(unwrap_model(model)).__name__
    for task, names in _CLASS_NAMES.items():
        if name in names:
            return task
    return None


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model, shared ones once (DeepSpeed ZeRO-3 shards counted whole)."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in unwrap_model(model).parameters())


def forward_arg_names(model: nn.Module) -> set[str]:
    """Names the model's ``forward`` accepts explicitly (``**kwargs`` excluded)."""
    params = inspect.signature(unwrap_model(model).forward).parameters
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}


def load_teacher(
    teacher: nn.Module | str,
    student: nn.Module,
    init_kwargs: dict[str, Any] | None = None,
    allow_untrained_head: bool = False,
) -> nn.Module:
    """Return ``teacher`` as a module; a string is a local folder or a Hub id.

    A string is loaded with the Auto class of the student's head (a sequence-classification student gets
    ``AutoModelForSequenceClassification``), safetensors only, and ``trust_remote_code`` only if the caller
    sets it in ``init_kwargs``. A checkpoint without that head (a pretrained model not fine-tuned on the
    task), whose head ``from_pretrained`` therefore initialises at random, is refused unless
    ``allow_untrained_head``. A module is returned as it is: whether its head was trained cannot be told.
    """
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, bytes)) and not hasattr(teacher, "__fspath__"):
        raise TypeError(
            f"teacher_model must be a torch module, a local path or a Hub id (or a list of them); got "
            f"{type(teacher).__name__}."
        )
    task = task_type(student)
    if task is None:
        raise ValueError(
            f"Cannot tell which Auto class loads a teacher for a student of class "
            f"{type(unwrap_model(student)).__name__}; load the teacher yourself and pass the module."
        )
    kwargs = dict(init_kwargs or {})
    if kwargs.get("use_safetensors", True) is not True:
        raise ValueError(
            "Teachers are loaded from safetensors only (a pickled checkpoint can run code when it is loaded); "
            "remove use_safetensors from teacher_model_init_kwargs, or load the teacher yourself and pass the "
            "module."
        )
    kwargs["use_safetensors"] = True
    path = os.fsdecode(teacher)
    check_local_path_exists(path, "teacher_model")
    if os.path.isdir(path) and not any(name.endswith(".safetensors") for name in os.listdir(path)):
        pickled = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise ValueError(
            f"The teacher folder {path} has no safetensors weights"
            + (f" (only {', '.join(pickled)})" if pickled else "")
            + ". hf_distill loads teachers from safetensors only, since a pickled checkpoint can run code when "
            "it is loaded. If you trust the file, convert it once with "
            "`AutoModel.from_pretrained(path).save_pretrained(path)` (transformers writes safetensors), or "
            "load the teacher yourself and pass the module."
        )
    model, loading_info = _AUTO_CLASS[task].from_pretrained(path, output_loading_info=True, **kwargs)
    new_head = untrained_head_parameters(model, loading_info)
    if new_head and not allow_untrained_head:
        raise ValueError(
            f"The teacher {path} has no trained {task.replace('_', '-')} head: loading it as "
            f"{type(model).__name__} initialised {', '.join(new_head)} at random, so it would teach noise. "
            "Fine-tune it on your task first (with transformers.Trainer; the GLUE example does it with "
            "--teacher_finetune_epochs N) and pass the fine-tuned folder. To start from the new head anyway "
            "(a learning teacher trains it), set allow_untrained_teacher_head=True in the training arguments."
        )
    if new_head:
        logger.warning("The teacher %s starts from an untrained head (%s).", path, ", ".join(new_head))
    return model


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` was meant as a folder rather than a Hub id: it starts with ``.``, ``/`` or ``~``, or
    names a file in a folder that exists (``models/my-teacher`` when ``models/`` is there)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a Hub id has one slash
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def check_local_path_exists(name: str, argument: str) -> None:
    """Refuse a path that does not exist before ``from_pretrained`` would send it to the Hub (a minute of
    retries offline, then a network or repo-id error that never says the folder is missing)."""
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"{argument}={name!r} looks like a local folder, but {os.path.abspath(os.path.expanduser(name))} "
            "does not exist. Check the spelling and the working directory, or pass a Hub id (owner/name)."
        )


def untrained_head_parameters(model: nn.Module, loading_info: dict[str, Any]) -> list[str]:
    """Parameters outside the base model that ``from_pretrained`` initialised instead of loading: a task
    head that was missing from the checkpoint (or had another shape), from ``output_loading_info=True``."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = set(loading_info.get("missing_keys") or ())
    names |= {k[0] if isinstance(k, tuple) else k for k in loading_info.get("mismatched_keys") or ()}
    return sorted(n for n in names if not (prefix and n.startswith(f"{prefix}.")))


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: a frozen teacher never trains."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def max_input_positions(model: nn.Module) -> int | None:
    """How many token positions the model's learned absolute position embeddings allow (BERT, RoBERTa,
    GPT-2, ...), or None where longer inputs do not fail (rotary or relative positions, or no embedding).

    RoBERTa-style embeddings number positions from ``padding_idx + 1``, so they allow that many fewer.
    """
    for name, module in unwrap_model(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and leaf in ("position_embeddings", "wpe"):
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            return module.num_embeddings - offset
    return None


def output_width(model: nn.Module) -> int | None:
    """Size of the model's last logits dimension: num_labels for classifiers, vocab size for LMs."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    if task_type(model) in (CAUSAL_LM, MASKED_LM):
        return getattr(config, "vocab_size", None)
    return getattr(config, "num_labels", None)


def check_teacher_student_compatible(teacher: nn.Module, student: nn.Module, position: int = 0) -> None:
    """Raise before training if the teacher's outputs cannot be compared with the student's."""
    t_width, s_width = output_width(teacher), output_width(student)
    which = "teacher_model" if position == 0 else f"teacher_model[{position}]"
    if t_width is not None and s_width is not None and t_width != s_width:
        kind = "vocabulary size" if task_type(student) in (CAUSAL_LM, MASKED_LM) else "number of labels"
        raise ValueError(
            f"The {which} predicts {t_width} outputs but the student predicts {s_width} ({kind}). Load both "
            f"with the same num_labels (and label2id), or distil from a teacher fine-tuned on the same labels."
        )
    t_task, s_task = task_type(teacher), task_type(student)
    if t_task is not None and s_task is not None and t_task != s_task:
        raise ValueError(
            f"The {which} is a {t_task} model but the student is a {s_task} model; use the same head."
        )
    if {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}:
        raise ValueError(
            f"The {which} and the student share parameters; pass a separate copy of the teacher "
            "(e.g. copy.deepcopy(teacher))."
        )


def prepare_frozen_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Place a frozen teacher for the run, sharded the way the student is.

    Under DeepSpeed the teacher gets an inference engine (ZeRO-3 keeps it sharded; other stages run it
    unsharded, as stage 0). Under FSDP2 it is sharded with ``fully_shard`` by the student's policy (see
    `shard_frozen_teacher`). Under FSDP1, which accelerate leaves unwrapped and on the CPU in evaluation
    mode, it is a full replica on this rank's device. Everywhere else accelerate places it on the device
    without a DDP wrapper.
    """
    state = getattr(accelerator, "state", None)
    if getattr(state, "deepspeed_plugin", None) is not None:
        return freeze(deepspeed_inference_engine(teacher, state.deepspeed_plugin))
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if is_fsdp2(accelerator):
        return shard_frozen_teacher(teacher, accelerator)
    if fsdp_plugin is not None:
        logger.warning(
            "FSDP1 keeps a full copy of the frozen teacher on every rank; set fsdp_version: 2 (accelerate) or "
            "fsdp_config={'version': 2} (TrainingArguments) to shard it like the student."
        )
        return freeze(accelerator.prepare_model(teacher.to(accelerator.device), evaluation_mode=True))
    return freeze(accelerator.prepare_model(teacher, evaluation_mode=True))


def deepspeed_inference_engine(teacher: nn.Module, plugin: Any) -> nn.Module:
    """A DeepSpeed engine without optimizer for a frozen teacher, from the run's DeepSpeed config."""
    import deepspeed  # only present in DeepSpeed runs

    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if hidden is not None:  # bucket sizes that fit the model, as recommended for inference
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            )
    else:
        zero["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine


def shard_frozen_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Shard a frozen teacher across the ranks with FSDP2 (`shard_teacher`), frozen first, so mixed
    precision does not upcast its weights to float32 master copies."""
    return freeze(shard_teacher(freeze(teacher), accelerator))


def shard_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Shard a teacher across the ranks with FSDP2, by the policy accelerate applies to the student.

    accelerate's ``prepare_model(..., evaluation_mode=True)`` neither shards nor places a model under FSDP,
    so the teacher would stay whole, on the CPU, on every rank. Instead the teacher goes through accelerate's
    own FSDP2 preparation (the student's device mesh, wrap policy, ``reshard_after_forward``, mixed precision
    and offload settings), given a copy of the FSDP plugin, since that preparation fits the plugin's
    wrap policy to the model it sees and the student's must not be fitted to the teacher. A teacher that
    learns keeps its trainable parameters, sharded, and FSDP2 reduce-scatters their gradients in backward.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    state = accelerator.state
    student_plugin = state.fsdp_plugin
    teacher_plugin = copy.copy(student_plugin)
    teacher_plugin.transformer_cls_names_to_wrap = teacher_layer_classes(
        teacher, student_plugin.transformer_cls_names_to_wrap
    )
    state.fsdp_plugin = teacher_plugin
    try:
        return fsdp2_prepare_model(accelerator, teacher)
    finally:
        state.fsdp_plugin = student_plugin


def is_fsdp2(accelerator: Any) -> bool:
    """Whether the run shards its models with FSDP2."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def teacher_layer_classes(teacher: nn.Module, names: list[str] | None) -> list[str] | None:
    """The layer classes to wrap in the teacher: those of ``names`` (the classes configured for the
    student) that the teacher has, or None, for the teacher's own ``_no_split_modules``, when it has none
    of them (a student of another architecture)."""
    if not names:
        return None
    present = {type(module).__name__ for module in teacher.modules()}
    kept = [name for name in names if name in present]
    return kept or None
