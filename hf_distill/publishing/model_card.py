"""Model cards for distilled students (and trained teachers), built from plain inputs.

Everything here is a pure function of plain values (method name, hyperparameters, teacher ids, metrics,
parameter counts, `Trainer.state.log_history`), so cards can be built and tested without a trainer, a
model or the network. The trainers gather those values (`DistillationTrainer.create_model_card`) and
write the card as ``README.md`` next to the student's weights; `huggingface_hub.ModelCardData` writes its
YAML metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .citations import METHODS
from .model_sources import LOCAL, TeacherInfo

LIBRARY_TAG = "hf-distill"
DISTILLATION_TAG = "knowledge-distillation"
TEACHER_TAG = "distillation-teacher"

# Hyperparameters worth a place in the YAML metadata (all of them go in the card's table).
KEY_HYPERPARAMETERS = (
    "temperature",
    "alpha",
    "distill_loss",
    "teacher_learning_rate",
    "teacher_alpha",
    "quiz_split",
    "influence_mode",
)


@dataclass
class DistillationRun:
    """Everything a student's card says, as plain values.

    Args:
        method: the trainer's ``method_name`` (``kd``, ``online``, ``meta``, ``lgtm`` or a custom one).
        model_name: the card's title (the Hub repository's name).
        teachers: one `TeacherInfo` per teacher (several for an ensemble).
        student_parameters: the student's parameter count.
        base_model: the Hub id the student was initialised from, or None.
        base_model_note: how the student was initialised when ``base_model`` is None (e.g. ``"local"``).
        hyperparameters: the distillation arguments (and a few of `Trainer`'s), name to value.
        student_metrics: the final evaluation metrics of the student, without the ``eval_`` prefix.
        teacher_metrics: the final evaluation metrics of the teacher, without the ``eval_teacher_`` prefix.
        eval_step: the training step of the final evaluation.
        dataset_name: a human-readable name of the training data.
        dataset_tags: Hub dataset ids for the metadata.
        influence_summary: `summarize_influence`'s output (LGTM runs).
        collapsed_to_class: the one class the student predicted on every row of its final evaluation
            (it has collapsed), or None; see `final_collapsed_classes`.
        teacher_collapsed_to_class: the same for a learning teacher's final evaluation.
        repo_id: the repository (or folder) the usage snippet loads from.
        pipeline_tag: the Hub task of the student (``text-classification``, ...).
        language: card metadata.
        license: card metadata.
        tags: tags added to the standard ones.
        library_name: ``transformers``, or ``peft`` for an adapter.
        auto_class: the `transformers` Auto class of the usage snippet.
    """

    method: str
    model_name: str
    teachers: list[TeacherInfo] = field(default_factory=list)
    student_parameters: int | None = None
    base_model: str | None = None
    base_model_note: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    student_metrics: dict[str, float] = field(default_factory=dict)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None
    dataset_name: str | None = None
    dataset_tags: list[str] = field(default_factory=list)
    influence_summary: dict[str, Any] | None = None
    collapsed_to_class: int | None = None
    teacher_collapsed_to_class: int | None = None
    repo_id: str | None = None
    pipeline_tag: str | None = None
    language: str | list[str] | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    library_name: str = "transformers"
    auto_class: str = "AutoModel"


def influence_paragraph(summary: Mapping[str, Any]) -> str:
    """One paragraph describing `summarize_influence`'s output in words."""
    steps = summary["logged_steps"]
    first, last = summary.get("first_step"), summary.get("last_step")
    if first is None or last is None:
        where = f"Over the {steps} training log{'s' if steps != 1 else ''} of the influence weights"
    else:
        # Named as the influence log (InfluenceLoggerCallback) numbers them, so that the two agree.
        span = f"step {first}" if first == last else f"steps {first}–{last}"
        where = f"Over optimisation {span} (counted from 0, as in the influence log"
        if last - first + 1 != steps:  # logging_steps > 1: each log averages the steps since the last one
            where += (
                f"; {steps} training log{'s' if steps != 1 else ''}, each averaging the steps since the last"
            )
        where += ")"
    text = (
        f"{where}, "
        f"{_percent(summary['frac_negative'])} of each batch's per-sample distillation-influence weights "
        "were negative on average: samples whose distillation, in the lookahead, would have raised the "
        "student's quiz loss, which the teacher's update weighs against"
    )
    if steps >= 3:
        text += (
            f" ({_percent(summary['frac_negative_early'])} in the first third of the training logs, "
            f"{_percent(summary['frac_negative_late'])} in the last third)"
        )
    text += "."
    if summary.get("influence_mean") is not None:
        text += f" The mean weight was {_number(summary['influence_mean'])}"
        if steps >= 3:
            text += (
                f" ({_number(summary['influence_mean_early'])} early, "
                f"{_number(summary['influence_mean_late'])} late)"
            )
        text += "."
    if summary.get("grad_norm_ratio") is not None:
        text += (
            " The influence part of the teacher's gradient had a median norm of "
            f"{_number(summary['grad_norm_ratio'])}× the auxiliary (online-distillation) part."
        )
    return text


# ----- the card --------------------------------------------------------------------------------------------


def key_hyperparameters(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters that go in the YAML metadata (`KEY_HYPERPARAMETERS` present in the run)."""
    return {k: _plain(hyperparameters[k]) for k in KEY_HYPERPARAMETERS if hyperparameters.get(k) is not None}


def compression_ratio(teachers: Sequence[TeacherInfo], student_parameters: int | None) -> float | None:
    """Teacher parameters (all teachers of an ensemble together) per student parameter."""
    counts = [t.num_parameters for t in teachers]
    if not student_parameters or not counts or any(c is None for c in counts):
        return None
    return round(sum(counts) / student_parameters, 2)


def card_metadata(run: DistillationRun) -> ModelCardData:
    """The card's YAML metadata: ``base_model``, ``tags``, datasets, results, and a ``distillation`` block."""
    tags = list(dict.fromkeys([DISTILLATION_TAG, run.method, LIBRARY_TAG, *run.tags]))
    distillation: dict[str, Any] = {
        "method": run.method,
        "teachers": [_teacher_metadata(t) for t in run.teachers],
        "student_parameters": run.student_parameters,
        "compression_ratio": compression_ratio(run.teachers, run.student_parameters),
        **key_hyperparameters(run.hyperparameters),
    }
    if run.method in METHODS:
        distillation["paper"] = METHODS[run.method]["url"]
    if run.teacher_metrics:
        distillation["teacher_metrics"] = {k: _round(v) for k, v in run.teacher_metrics.items()}
    if run.collapsed_to_class is not None:
        distillation["collapsed_to_class"] = run.collapsed_to_class
    if run.teacher_collapsed_to_class is not None:
        distillation["teacher_collapsed_to_class"] = run.teacher_collapsed_to_class
    if run.influence_summary is not None:
        distillation["influence"] = {k: _round(v) for k, v in run.influence_summary.items()}
    eval_results = None
    if run.dataset_name and run.pipeline_tag:
        eval_results = [
            EvalResult(
                task_type=run.pipeline_tag,
                dataset_type=run.dataset_tags[0] if run.dataset_tags else run.dataset_name,
                dataset_name=run.dataset_name,
                metric_type=name,
                metric_value=_round(value),
            )
            for name, value in run.student_metrics.items()
            if name != "loss"
        ] or None
    return ModelCardData(
        base_model=run.base_model,
        datasets=run.dataset_tags or None,
        eval_results=eval_results,
        language=run.language,
        library_name=run.library_name,
        license=run.license,
        model_name=run.model_name,
        pipeline_tag=run.pipeline_tag,
        tags=tags,
        distillation=distillation,
    )


def card_body(run: DistillationRun) -> str:
    """The card's markdown (everything after the metadata)."""
    method = METHODS.get(run.method)
    title = method["title"] if method else f"`{run.method}` distillation"
    lines = [f"# {run.model_name}", ""]
    teachers = " and ".join(_teacher_text(t) for t in run.teachers) or "an unnamed teacher"
    intro = f"This model is a student distilled with **{title}**"
    if method:
        intro += f" ([{method['paper']}]({method['url']}))"
    intro += f" from {teachers}, with `hf_distill`."
    if run.base_model:
        intro += (
            f" The student was initialised from [{run.base_model}](https://huggingface.co/{run.base_model})"
        )
    elif run.base_model_note == LOCAL:
        intro += " The student was initialised from a local checkpoint"
    else:
        intro += " The student was initialised from a configuration (random weights)"
    intro += f" and trained on {run.dataset_name or 'an unnamed dataset'}."
    lines += [intro, ""]

    lines += ["## Size", "", "| model | parameters |", "|---|---|"]
    lines.append(f"| student | {_count(run.student_parameters)} |")
    for position, teacher in enumerate(run.teachers):
        label = "teacher" if len(run.teachers) == 1 else f"teacher {position}"
        based_on = f", initialised from `{teacher.based_on.id}`" if teacher.based_on is not None else ""
        lines.append(f"| {label} (`{teacher.id}`{based_on}) | {_count(teacher.num_parameters)} |")
    ratio = compression_ratio(run.teachers, run.student_parameters)
    if ratio is not None:
        lines += ["", f"Compression ratio: **{ratio}×** fewer parameters than the teacher."]
    lines.append("")

    lines += ["## Results", ""]
    if run.student_metrics or run.teacher_metrics:
        names = list(dict.fromkeys([*run.student_metrics, *run.teacher_metrics]))
        at = f" (step {run.eval_step})" if run.eval_step is not None else ""
        lines += [f"Final evaluation{at}:", "", "| metric | student | teacher |", "|---|---|---|"]
        for name in names:
            lines.append(
                f"| {name} | {_number(run.student_metrics.get(name))} | {_number(run.teacher_metrics.get(name))} |"
            )
        if not run.teacher_metrics:
            lines += [
                "",
                "The teacher was not evaluated during training (a frozen teacher is the input model).",
            ]
        for model, only in (("student", run.collapsed_to_class), ("teacher", run.teacher_collapsed_to_class)):
            if only is not None:
                lines += ["", _collapse_warning(model, only)]
    else:
        lines.append(
            "No evaluation was run before this card was written (call `trainer.evaluate()` before "
            "`save_model()` for the card to carry the results)."
        )
    lines.append("")

    if run.influence_summary is not None:
        lines += ["## Influence weights", "", influence_paragraph(run.influence_summary), ""]

    lines += ["## Training hyperparameters", "", "| argument | value |", "|---|---|"]
    for name, value in run.hyperparameters.items():
        lines.append(f"| `{name}` | {_number(value) if isinstance(value, float) else value} |")
    lines.append("")

    lines += usage_lines(run)
    if method:
        lines += ["## Citation", "", "```bibtex", method["bibtex"], "```", ""]
    return "\n".join(lines)


def usage_lines(run: DistillationRun) -> list[str]:
    """The card's Usage section: a plain `transformers` load, or for a PEFT adapter the base model then the adapter."""
    repo = run.repo_id or run.model_name
    classes = ", ".join(sorted({"AutoTokenizer", run.auto_class}))
    if run.library_name != "peft":
        code = [
            f"from transformers import {classes}",
            "",
            f'model = {run.auto_class}.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        note = "The student is a standard `transformers` model: the teacher is not needed at inference."
    else:
        base = run.base_model or "<the base model's id or folder>"
        code = [
            "from peft import PeftModel",
            f"from transformers import {classes}",
            "",
            f'base = {run.auto_class}.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        where = (
            f"`{run.base_model}`"
            if run.base_model
            else "its base model (not on the Hub: load it from where you keep it)"
        )
        note = (
            f"The student is a PEFT (LoRA) adapter on {where}: load the base model, then the adapter "
            "(`model.merge_and_unload()` gives a plain `transformers` model). The teacher is not needed at inference."
        )
    return ["## Usage", "", "```python", *code, "```", "", note, ""]


def build_model_card(run: DistillationRun) -> ModelCard:
    """The student's `huggingface_hub.ModelCard` (YAML metadata and markdown)."""
    return ModelCard(f"---\n{card_metadata(run).to_yaml()}\n---\n\n{card_body(run)}")


def build_teacher_card(
    method: str,
    model_name: str,
    teacher: TeacherInfo,
    student: str,
    hyperparameters: Mapping[str, Any],
    teacher_metrics: Mapping[str, float],
    library_name: str = "transformers",
    pipeline_tag: str | None = None,
) -> ModelCard:
    """The card of a teacher trained by a learning-teacher method, pushed with `push_teacher_to_hub`."""
    methods = METHODS.get(method)
    title = methods["title"] if methods else f"`{method}` distillation"
    based_on = teacher.based_on
    data = ModelCardData(
        base_model=teacher.id if teacher.on_hub else based_on.id if based_on and based_on.on_hub else None,
        library_name=library_name,
        model_name=model_name,
        pipeline_tag=pipeline_tag,
        tags=[DISTILLATION_TAG, method, LIBRARY_TAG, TEACHER_TAG],
        distillation={
            "method": method,
            "role": "teacher",
            "student": student,
            "initial_teacher": {k: v for k, v in _teacher_metadata(teacher).items() if k != "parameters"},
            **key_hyperparameters(hyperparameters),
        },
    )
    lines = [
        f"# {model_name}",
        "",
        f"This is a **teacher** trained by **{title}** with `hf_distill`, alongside the "
        f"student `{student}`. It started from "
        + (f"`{teacher.id}`" if teacher.id != LOCAL else "a model built in memory")
        + (f" (revision `{teacher.revision}`)" if teacher.revision else "")
        + (f", initialised from `{based_on.id}`" if based_on is not None else "")
        + " and was updated at every training step to teach that student: it is not an ordinary "
        "fine-tune of its task, and the student is usually the model you want.",
        "",
    ]
    if teacher_metrics:
        lines += ["## Final evaluation", "", "| metric | teacher |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in teacher_metrics.items()]
        lines.append("")
    if methods:
        lines += ["## Citation", "", "```bibtex", methods["bibtex"], "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ----- formatting -------------------------------------------------------------------------------------------


def _teacher_metadata(teacher: TeacherInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": teacher.id,
        "revision": teacher.revision,
        "parameters": teacher.num_parameters,
    }
    if teacher.local:
        entry["local"] = True
    if teacher.based_on is not None:
        entry["based_on"] = {
            k: v for k, v in _teacher_metadata(teacher.based_on).items() if k != "parameters"
        }
    return entry


def _teacher_text(teacher: TeacherInfo) -> str:
    if teacher.id == LOCAL and teacher.based_on is not None:
        return (
            f"a teacher passed in memory, initialised from {_checkpoint_text(teacher.based_on)} "
            "(its weights could not be matched to that checkpoint's, e.g. because it was fine-tuned)"
        )
    if teacher.id == LOCAL:
        return "a teacher built in memory (no checkpoint name)"
    text = (
        f"the local teacher checkpoint `{teacher.id}`"
        if teacher.local
        else f"the teacher {_checkpoint_text(teacher)}"
    )
    if teacher.based_on is not None:
        text += f" (initialised from {_checkpoint_text(teacher.based_on)})"
    return text


def _checkpoint_text(source: TeacherInfo) -> str:
    """A checkpoint's name: a link for a Hub id (with its revision), the folder's name for a local one."""
    if source.local:
        return f"the local checkpoint `{source.id}`"
    text = f"[{source.id}](https://huggingface.co/{source.id})"
    return text + (f" at revision `{source.revision}`" if source.revision else "")


def _collapse_warning(model: str, only: int) -> str:
    return (
        f"**Warning: the {model} has collapsed to one class.** At this final evaluation it predicted class "
        f"{only} on every row, so its scores above only measure how common that class is: they say nothing "
        "about the task."
    )


def _plain(value: Any) -> Any:
    """A YAML-friendly value (enums and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(getattr(value, "value", value))


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _count(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit} ({value:,})"
    return f"{value:,}"
