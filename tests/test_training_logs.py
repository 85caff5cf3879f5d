"""hf_distill.publishing.training_logs: what a model card reads from Trainer's log history (the card's
text built from it is tested in test_model_card.py)."""

from __future__ import annotations

from hf_distill.publishing.training_logs import final_eval_metrics


def test_final_eval_metrics_takes_the_latest_evaluation_and_separates_the_teacher():
    history = [
        {"loss": 0.9, "step": 1},
        {"eval_loss": 0.7, "eval_accuracy": 0.6, "eval_runtime": 1.0, "epoch": 1.0, "step": 5},
        {"eval_teacher_loss": 0.5, "eval_teacher_accuracy": 0.7, "step": 5},
        {"eval_loss": 0.6, "eval_accuracy": 0.75, "eval_samples_per_second": 9.0, "step": 10},
        {"eval_teacher_loss": 0.4, "eval_teacher_accuracy": 0.8, "step": 10},
        {"train_runtime": 3.0, "step": 10},
    ]
    student, teacher, step = final_eval_metrics(history)
    assert student == {"loss": 0.6, "accuracy": 0.75}
    assert teacher == {"loss": 0.4, "accuracy": 0.8}
    # Trainer's model-preparation time describes the run, not the model, whichever model it was logged for.
    timed = [*history, {"eval_teacher_model_preparation_time": 0.01, "eval_model_preparation_time": 0.02}]
    assert final_eval_metrics(timed)[:2] == (student, teacher)
    assert step == 10
    # The best checkpoint's evaluation, when the best model was loaded at the end.
    assert final_eval_metrics(history, up_to_step=5) == (
        {"loss": 0.7, "accuracy": 0.6},
        {"loss": 0.5, "accuracy": 0.7},
        5,
    )
    assert final_eval_metrics([{"loss": 1.0, "step": 1}]) == ({}, {}, None)
