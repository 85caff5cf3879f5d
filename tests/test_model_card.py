"""hf_distill.publishing.model_card: the card's pure functions, without trainers, models or network."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from hf_distill.publishing.model_card import (
    METHODS,
    DistillationRun,
    build_model_card,
    build_teacher_card,
    compression_ratio,
    influence_paragraph,
)
from hf_distill.publishing.model_sources import LOCAL, TeacherInfo, name_teachers
from hf_distill.publishing.training_logs import (
    final_collapsed_classes,
    final_eval_metrics,
    summarize_influence,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_run(**overrides) -> DistillationRun:
    values = dict(
        method="lgtm",
        model_name="tiny-student",
        teachers=[TeacherInfo("org/teacher", COMMIT, 1000)],
        student_parameters=250,
        base_model="org/teacher",
        hyperparameters={"temperature": 1.0, "alpha": 1.0, "teacher_alpha": 0.4, "fd_radius": 0.01},
        student_metrics={"loss": 0.4, "accuracy": 0.8},
        teacher_metrics={"loss": 0.3, "accuracy": 0.9},
        eval_step=30,
        dataset_name="glue/sst2",
        dataset_tags=["glue"],
        pipeline_tag="text-classification",
    )
    return DistillationRun(**{**values, **overrides})


def test_influence_summary_compares_early_and_late_steps():
    history = []
    for step, frac in enumerate([0.6, 0.6, 0.4, 0.4, 0.2, 0.2], start=1):
        history.append(
            {
                "loss": 1.0,
                "influence_frac_negative": frac,
                "influence_mean": -frac,
                "teacher_grad_norm_aux": 2.0,
                "teacher_grad_norm_influence": 0.02,
                "step": step,
            }
        )
    summary = summarize_influence(history)
    # Trainer logs the steps 1-6 (global_step after each step); the influence log numbers them 0-5.
    assert summary["logged_steps"] == 6 and (summary["first_step"], summary["last_step"]) == (0, 5)
    assert summary["frac_negative"] == pytest.approx(0.4)
    assert summary["frac_negative_early"] == pytest.approx(0.6)
    assert summary["frac_negative_late"] == pytest.approx(0.2)
    assert summary["influence_mean_late"] == pytest.approx(-0.2)
    assert summary["grad_norm_ratio"] == pytest.approx(0.01)
    text = influence_paragraph(summary)
    assert "40.0 %" in text and "60.0 %" in text and "20.0 %" in text
    assert "Over optimisation steps 0–5 (counted from 0, as in the influence log)," in text
    assert summarize_influence([{"loss": 1.0, "step": 1}]) is None


def test_influence_steps_with_logs_every_few_steps_and_after_a_resume():
    # logging_steps=4, resumed at step 8 from a checkpoint whose logs (steps 4 and 8) came back with it.
    history = [
        {"loss": 1.0, "influence_frac_negative": 0.5, "step": 4},
        {"eval_loss": 0.9, "step": 4},
        {"loss": 1.0, "influence_frac_negative": 0.5, "step": 8},
        {"loss": 1.0, "influence_frac_negative": 0.5, "step": 12},
    ]
    summary = summarize_influence(history)
    assert (summary["first_step"], summary["last_step"]) == (0, 11)
    text = influence_paragraph(summary)
    assert "steps 0–11 (counted from 0, as in the influence log; 3 training logs, each averaging" in text
    # Influence logged only from step 8 on (after a training log without it): its steps start at 4.
    summary = summarize_influence([{"loss": 1.0, "step": 4}, *history[2:]])
    assert (summary["first_step"], summary["last_step"], summary["logged_steps"]) == (4, 11, 2)


def test_a_collapsed_models_latest_evaluation_is_a_warning_not_a_metric():
    history = [
        {"eval_loss": 0.7, "eval_accuracy": 0.5, "eval_collapsed_to_class": 1, "step": 5},
        {"eval_teacher_accuracy": 0.5, "eval_teacher_collapsed_to_class": 0, "step": 5},
        {"eval_loss": 0.6, "eval_accuracy": 0.75, "step": 10},  # predicts several classes again
        {"eval_teacher_accuracy": 0.8, "step": 10},
    ]
    assert final_collapsed_classes(history) == (None, None)
    assert final_collapsed_classes(history, up_to_step=5) == (1, 0)
    assert final_collapsed_classes(history[:3]) == (None, 0)  # the teacher's latest evaluation is step 5's
    assert final_eval_metrics(history, up_to_step=5)[:2] == (
        {"loss": 0.7, "accuracy": 0.5},
        {"accuracy": 0.5},
    )

    card = ModelCard(str(build_model_card(make_run(collapsed_to_class=1))))
    assert "**Warning: the student has collapsed to one class.**" in card.text
    assert "predicted class 1 on every row" in card.text and "the teacher has collapsed" not in card.text
    assert card.data.to_dict()["distillation"]["collapsed_to_class"] == 1
    healthy = ModelCard(str(build_model_card(make_run())))
    assert (
        "collapsed" not in healthy.text and "collapsed_to_class" not in healthy.data.to_dict()["distillation"]
    )


def test_card_metadata_and_text():
    card = ModelCard(
        str(build_model_card(make_run(influence_summary={"logged_steps": 1, "frac_negative": 0.5})))
    )
    data = card.data.to_dict()
    assert data["base_model"] == "org/teacher"
    assert data["tags"][:3] == ["knowledge-distillation", "lgtm", "hf-distill"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert data["datasets"] == ["glue"]
    distillation = data["distillation"]
    assert distillation["method"] == "lgtm"
    assert distillation["teachers"] == [{"id": "org/teacher", "revision": COMMIT, "parameters": 1000}]
    assert distillation["student_parameters"] == 250 and distillation["compression_ratio"] == 4.0
    assert distillation["temperature"] == 1.0 and distillation["teacher_alpha"] == 0.4
    assert "fd_radius" not in distillation  # only the key hyperparameters go in the metadata
    assert distillation["teacher_metrics"] == {"loss": 0.3, "accuracy": 0.9}
    assert distillation["influence"]["frac_negative"] == 0.5
    # The model index holds the student's metrics on the named dataset (the loss is left out).
    results = data["model-index"][0]["results"]
    assert [m["type"] for m in results[0]["metrics"]] == ["accuracy"]
    text = card.text
    assert "| accuracy | 0.8 | 0.9 |" in text
    assert "`fd_radius`" in text
    assert "4.0×" in text and "## Influence weights" in text
    assert "Ren, Yuxin" in text and "AutoModelForSequenceClassification" not in text  # default AutoModel


@pytest.mark.parametrize(
    ("method", "author"),
    [("kd", "Hinton"), ("online", "Shi, Wenxian"), ("meta", "Zhou, Wangchunshu"), ("lgtm", "Ren, Yuxin")],
)
def test_each_method_cites_its_paper(method, author):
    text = str(build_model_card(make_run(method=method)))
    assert METHODS[method]["title"] in text
    assert "```bibtex" in text and author in text


def test_custom_method_local_teacher_and_no_evaluation():
    run = make_run(
        method="my-method",
        teachers=[TeacherInfo(LOCAL, None, 10), TeacherInfo(LOCAL, None, 30)],
        student_parameters=20,
        base_model=None,
        base_model_note=None,
        student_metrics={},
        teacher_metrics={},
        dataset_name=None,
        dataset_tags=[],
    )
    card = ModelCard(str(build_model_card(run)))
    data = card.data.to_dict()
    assert "base_model" not in data and "model-index" not in data and "datasets" not in data
    assert data["tags"][:3] == ["knowledge-distillation", "my-method", "hf-distill"]
    assert data["distillation"]["compression_ratio"] == 2.0  # all teachers of an ensemble together
    assert [t["id"] for t in data["distillation"]["teachers"]] == [LOCAL, LOCAL]
    assert "bibtex" not in card.text
    assert "No evaluation was run" in card.text and "random weights" in card.text
    assert compression_ratio([TeacherInfo(LOCAL, None, None)], 10) is None


def test_teacher_card():
    card = build_teacher_card(
        method="online",
        model_name="tiny-teacher",
        teacher=TeacherInfo("org/teacher", "v1", 1000),
        student="user/tiny-student",
        hyperparameters={"teacher_alpha": 0.4, "teacher_learning_rate": 3e-5},
        teacher_metrics={"accuracy": 0.9},
    )
    data = card.data.to_dict()
    assert data["base_model"] == "org/teacher"
    assert "distillation-teacher" in data["tags"] and "online" in data["tags"]
    assert (
        data["distillation"]["role"] == "teacher" and data["distillation"]["student"] == "user/tiny-student"
    )
    assert "user/tiny-student" in card.text and "| accuracy | 0.9 |" in card.text


def test_card_of_a_local_teacher_names_its_folder_without_a_hub_link():
    run = make_run(teachers=[TeacherInfo("mrpc-teacher", None, 1000, local=True)])
    card = ModelCard(str(build_model_card(run)))
    entry = card.data.to_dict()["distillation"]["teachers"][0]
    assert entry == {"id": "mrpc-teacher", "revision": None, "parameters": 1000, "local": True}
    assert "the local teacher checkpoint `mrpc-teacher`" in card.text
    assert "huggingface.co/mrpc-teacher" not in card.text
    teacher_card = build_teacher_card("online", "t", TeacherInfo("mrpc-teacher", local=True), "s", {}, {})
    assert "base_model" not in teacher_card.data.to_dict()


def test_a_teacher_initialised_from_a_checkpoint_is_never_named_as_it():
    fine_tuned = TeacherInfo(LOCAL, None, 1000, based_on=TeacherInfo("org/base-teacher"))
    card = ModelCard(str(build_model_card(make_run(teachers=[fine_tuned]))))
    entry = card.data.to_dict()["distillation"]["teachers"][0]
    assert entry == {
        "id": LOCAL,
        "revision": None,
        "parameters": 1000,
        "based_on": {"id": "org/base-teacher", "revision": None},
    }
    assert "initialised from [org/base-teacher](https://huggingface.co/org/base-teacher)" in card.text
    assert "the teacher [org/base-teacher]" not in card.text
    # Named by the user: the name, linked when it is a Hub id, and still where it started from.
    (named,) = name_teachers([fine_tuned], "me/sst2-teacher")
    card = ModelCard(str(build_model_card(make_run(teachers=[named]))))
    assert (
        "the teacher [me/sst2-teacher](https://huggingface.co/me/sst2-teacher) (initialised from" in card.text
    )
    assert card.data.to_dict()["distillation"]["teachers"][0]["id"] == "me/sst2-teacher"
    # The trained teacher's own card: a fine-tune of that checkpoint.
    teacher_card = build_teacher_card("online", "t", fine_tuned, "s", {}, {})
    assert teacher_card.data.to_dict()["base_model"] == "org/base-teacher"
    assert "initialised from `org/base-teacher`" in teacher_card.text


def test_teacher_name_gives_one_name_per_teacher():
    hub, folder = TeacherInfo("org/teacher", COMMIT, 10), TeacherInfo("mrpc-teacher", None, 20, local=True)
    assert name_teachers([hub, folder], None) == [hub, folder]
    assert name_teachers([hub, folder], " org/teacher , my teacher ") == [
        hub,  # its own id: the revision is kept
        TeacherInfo("my teacher", None, 20, local=True),  # not a Hub id: shown, not linked
    ]
    with pytest.raises(
        ValueError, match=r"teacher_name gives 1 name \('me/t'\) for 2 teachers; give one name per"
    ):
        name_teachers([hub, folder], "me/t")
    with pytest.raises(ValueError, match=r"teacher_name='me/a,,me/b' has an empty name"):
        name_teachers([hub, hub, folder], "me/a,,me/b")
