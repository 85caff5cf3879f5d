"""Saving and publishing: the student alone (with its model card) and, for a teacher that learns, the teacher.

Two mixins for the trainers: `StudentPublishingMixin` overrides `Trainer.save_model`, `create_model_card`,
`push_to_hub` and the checkpoint pushes so that only the student and its card are written or uploaded;
`TeacherPublishingMixin` adds `save_teacher` and `push_teacher_to_hub`. The card's text comes from
`model_card`; the trainer supplies its numbers through `_card_hyperparameters` and
`_card_influence_summary`, which subclasses extend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from ..distributed import full_state_dict, is_sharded, unwrap_model
from ..losses.objectives import LOSS_SPECIFIC_SETTINGS, distill_loss_entry
from ..safety.nonfinite import check_finite_weights
from ..teacher.loading import (
    CAUSAL_LM,
    MASKED_LM,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    count_parameters,
)
from .model_card import DistillationRun, build_model_card, build_teacher_card
from .model_sources import (
    LOCAL,
    TeacherInfo,
    dataset_name_and_tags,
    describe_source,
    describe_teacher,
    describe_teacher_module,
    name_teachers,
)
from .training_logs import final_collapsed_classes, final_eval_metrics

try:  # the HfApi that transformers' own Hub calls use (tagged with the library's name)
    from transformers.utils.hub import hf_api
except ImportError:  # pragma: no cover - older transformers
    from huggingface_hub import HfApi

    def hf_api() -> HfApi:
        return HfApi(library_name="transformers")


# The folder, inside output_dir, from which the student is uploaded ("_*" is never uploaded from output_dir).
HUB_STAGING_DIR = "_hub_student"
_PIPELINE_TAGS = {
    SEQUENCE_CLASSIFICATION: ("text-classification", "AutoModelForSequenceClassification"),
    TOKEN_CLASSIFICATION: ("token-classification", "AutoModelForTokenClassification"),
    CAUSAL_LM: ("text-generation", "AutoModelForCausalLM"),
    MASKED_LM: ("fill-mask", "AutoModelForMaskedLM"),
}
# The folder, inside output_dir, from which `push_teacher_to_hub` uploads the teacher.
HUB_TEACHER_STAGING_DIR = "_hub_teacher"


class StudentPublishingMixin:
    """`Trainer.save_model`, `create_model_card` and `push_to_hub` for the student alone, with its model card."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`: the student alone (never the teacher), and, when you call it, its model card.

        The folder gets the student's weights (safetensors), config, tokenizer or processor, the training
        arguments, and ``README.md``, a model card describing the distillation (see `create_model_card`).
        A student whose weights are not finite is refused (`NonFiniteError`): checkpoints and pushes save
        through here too.
        """
        check_finite_weights(self.model, "student", "save the student")
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
        check_finite_weights(self.model, "student", "push the student")  # before a Hub repository is created
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
        base_model, base_note = self._card_base_model(finetuned_from)
        teachers = [
            dataclasses.replace(source, num_parameters=count_parameters(teacher))
            for source, teacher in zip(self._card_teacher_sources(), self.teacher_models, strict=True)
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
        collapsed, teacher_collapsed = final_collapsed_classes(
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
            influence_summary=self._card_influence_summary(),
            collapsed_to_class=collapsed,
            teacher_collapsed_to_class=teacher_collapsed,
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

    def _card_teacher_sources(self) -> list[TeacherInfo]:
        """Where each teacher came from, as the cards name it: ``args.teacher_name`` when given."""
        return name_teachers(self._teacher_sources, getattr(self.args, "teacher_name", None))

    def _card_base_model(self, finetuned_from: str | None) -> tuple[str | None, str | None]:
        """(the student's initialisation as a Hub id, or ``None``; ``"local"`` when it was a local folder)."""
        if finetuned_from is not None:
            return finetuned_from, None
        name_or_path = getattr(getattr(unwrap_model(self.model), "config", None), "_name_or_path", "") or ""
        identity = describe_source(name_or_path)[0]
        base_model = None if identity == LOCAL else identity
        return base_model, LOCAL if base_model is None and name_or_path else None

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
            # teacher_model_init_kwargs may hold a token; teacher_name is in the teacher's own entry.
            if f.name not in trainer_fields and f.name not in ("teacher_model_init_kwargs", "teacher_name"):
                values[f.name] = getattr(args, f.name)
        for name in set(LOSS_SPECIFIC_SETTINGS) - set(distill_loss_entry(args.distill_loss).settings):
            values.pop(name, None)
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
        return {k: v for k, v in values.items() if v is not None}

    def _card_influence_summary(self) -> dict[str, Any] | None:
        """The model card's summary of per-sample influence weights; trainers that log them override this."""
        return None


class TeacherPublishingMixin:
    """`save_teacher` and `push_teacher_to_hub` for trainers whose teacher learns."""

    def save_teacher(self, output_dir: str | os.PathLike) -> None:
        """Write the live teacher (``save_pretrained``, safetensors) with its tokenizer to ``output_dir``."""
        teacher = self.teacher_models[0]
        check_finite_weights(teacher, "teacher", "save the teacher")
        # Gathered on every process when FSDP2 shards the teacher; else save_pretrained reads it (PEFT: its adapters).
        state_dict = full_state_dict(teacher) if is_sharded(teacher) else None
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(teacher).save_pretrained(
            output_dir, state_dict=state_dict, safe_serialization=True
        )
        tokenizer = self.teacher_processing_class or self.processing_class
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)

    def push_teacher_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = "Upload the trained teacher",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        blocking: bool = True,
    ) -> Any:
        """Upload the live teacher to the Hub repository ``repo_id`` (created if needed), with a model card.

        The folder is what `save_teacher` writes (weights as safetensors, config, the teacher's tokenizer)
        plus ``README.md``, which says the teacher was trained by this method for the student (``hub_model_id``,
        or ``output_dir``'s name). Call it on every process; only the world process zero uploads, and returns
        `HfApi.upload_folder`'s result.
        """
        staging = os.path.join(self.args.output_dir, HUB_TEACHER_STAGING_DIR)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.save_teacher(staging)  # on every process: a sharded teacher is gathered from all of them
        if not self.is_world_process_zero():
            return None
        token = token if token is not None else self.args.hub_token
        teacher = self.accelerator.unwrap_model(self.teacher_models[0])
        card = build_teacher_card(
            method=self.method_name,
            model_name=repo_id.split("/")[-1],
            teacher=dataclasses.replace(
                self._card_teacher_sources()[0], num_parameters=count_parameters(teacher)
            ),
            student=self.hub_model_id or self.args.hub_model_id or self._hub_model_name(),
            hyperparameters=self._card_hyperparameters(),
            teacher_metrics=final_eval_metrics(self.state.log_history)[1],
            library_name="peft" if hasattr(teacher, "peft_config") else "transformers",
        )
        card.save(os.path.join(staging, "README.md"))
        private = private if private is not None else self.args.hub_private_repo
        repo_id = hf_api().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        return upload_staged_folder(
            staging,
            blocking,
            repo_id=repo_id,
            commit_message=commit_message,
            token=token,
            revision=revision,
        )


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


def teacher_source(teacher: Any, init_kwargs: dict[str, Any] | None) -> TeacherInfo:
    """How the card names a ``teacher_model`` entry (Hub id, or local folder name), before it is loaded.

    A module is named after the checkpoint it was loaded from only while it holds that checkpoint's
    weights (`describe_teacher_module`); ``args.teacher_name`` overrides either when the card is written.
    """
    if isinstance(teacher, nn.Module):
        return describe_teacher_module(unwrap_model(teacher))
    return describe_teacher(teacher, (init_kwargs or {}).get("revision"))
