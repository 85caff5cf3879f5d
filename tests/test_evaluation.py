"""hf_distill.evaluation: accuracy and F1 of any classifier, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from hf_distill import classification_compute_metrics


def random_predictions(rows: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, classes)).astype(np.float32), rng.integers(0, classes, size=rows)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("classes", "f1_average", "expected_average"),
    [
        (2, None, "binary"),
        (3, None, "macro"),
        (5, None, "macro"),
        (2, "macro", "macro"),
        (4, "weighted", "weighted"),
    ],
)
def test_metrics_match_scikit_learn(classes, f1_average, expected_average, seed):
    logits, labels = random_predictions(40, classes, seed)
    metrics = classification_compute_metrics(f1_average)(EvalPrediction(logits, labels))
    predicted = logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predicted, average=expected_average))


def test_binary_f1_of_the_chosen_positive_label():
    logits, labels = random_predictions(30, 2, 4)
    metrics = classification_compute_metrics(positive_label=0)(EvalPrediction(logits, labels))
    assert metrics["f1"] == pytest.approx(f1_score(labels, logits.argmax(-1), pos_label=0))
    assert metrics["f1"] != pytest.approx(f1_score(labels, logits.argmax(-1), pos_label=1))


def test_token_labels_minus_100_are_left_out_and_extra_outputs_ignored():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 3))
    labels = rng.integers(0, 3, size=(4, 6))
    labels[:, -2:] = -100
    metrics = classification_compute_metrics()(EvalPrediction((logits, rng.normal(size=(4, 8))), labels))
    keep = labels != -100
    predicted = logits.argmax(-1)[keep]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels[keep], predicted))
    assert metrics["f1"] == pytest.approx(f1_score(labels[keep], predicted, average="macro"))


def test_bad_settings_and_predictions_are_refused():
    with pytest.raises(ValueError, match="f1_average='samples' is unknown"):
        classification_compute_metrics("samples")
    compute = classification_compute_metrics()
    with pytest.raises(ValueError, match="regression head"):
        compute(EvalPrediction(np.zeros((4, 1)), np.zeros(4)))
    with pytest.raises(ValueError, match="do not match labels"):
        compute(EvalPrediction(np.zeros((4, 3)), np.zeros(5)))
