"""Tests for hf_distill.metrics against slow hand computations (not against the code's own outputs)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_distill.glue.metrics import (
    GLUE_TASKS,
    glue_compute_metrics,
    glue_metrics,
    is_regression_task,
    majority_class_metrics,
)
from hf_distill.safety.collapse import single_predicted_class, warn_if_collapsed

EXPECTED_KEYS = {
    "cola": {"matthews_correlation"},
    "stsb": {"pearson", "spearmanr"},
    "mrpc": {"accuracy", "f1"},
    "qqp": {"accuracy", "f1"},
    "sst2": {"accuracy"},
    "mnli": {"accuracy"},
    "mnli_matched": {"accuracy"},
    "mnli_mismatched": {"accuracy"},
    "qnli": {"accuracy"},
    "rte": {"accuracy"},
    "wnli": {"accuracy"},
    "hans": {"accuracy"},
}


# --- hand computations -------------------------------------------------------------------------------


def counts(preds, refs):
    """TP, TN, FP, FN for label 1, by looping over the pairs."""
    tp = tn = fp = fn = 0
    for p, r in zip(preds, refs, strict=True):
        if p == 1 and r == 1:
            tp += 1
        elif p == 0 and r == 0:
            tn += 1
        elif p == 1 and r == 0:
            fp += 1
        else:
            fn += 1
    return tp, tn, fp, fn


def hand_accuracy(preds, refs):
    return sum(1 for p, r in zip(preds, refs, strict=True) if p == r) / len(refs)


def hand_f1(preds, refs):
    tp, _, fp, fn = counts(preds, refs)
    return 2 * tp / (2 * tp + fp + fn)


def hand_mcc(preds, refs):
    tp, tn, fp, fn = counts(preds, refs)
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def hand_pearson(x, y):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.sum(dx * dy) / math.sqrt(np.sum(dx**2) * np.sum(dy**2)))


def ranks(x):
    """Ranks 0..n-1; only valid without ties, which the tests guarantee."""
    x = list(x)
    assert len(set(x)) == len(x), "test data must not contain ties"
    return [sorted(x).index(v) for v in x]


def hand_spearman(x, y):
    return hand_pearson(ranks(x), ranks(y))


def random_binary(seed, n=60):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 2, size=n)
    # Agree with the reference 70% of the time so the metrics are neither trivial nor degenerate.
    preds = np.where(rng.random(n) < 0.7, refs, 1 - refs)
    return preds, refs


# --- task registry -----------------------------------------------------------------------------------


def test_glue_tasks_are_exactly_the_supported_tasks():
    assert isinstance(GLUE_TASKS, tuple)
    assert set(GLUE_TASKS) == set(EXPECTED_KEYS)
    assert len(GLUE_TASKS) == len(set(GLUE_TASKS))


@pytest.mark.parametrize("task", sorted(EXPECTED_KEYS))
def test_is_regression_task_only_for_stsb(task):
    assert is_regression_task(task) is (task == "stsb")


@pytest.mark.parametrize("task", sorted(EXPECTED_KEYS))
def test_key_sets_and_plain_floats(task):
    if task == "stsb":
        preds, refs = [0.1, 2.5, 1.7, 4.0], [0.0, 3.0, 1.0, 4.5]
    else:
        preds, refs = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    result = glue_metrics(task, preds, refs)
    assert set(result) == EXPECTED_KEYS[task]
    for value in result.values():
        # np.float64 subclasses float, so check the exact type.
        assert type(value) is float
        assert math.isfinite(value)


# --- values against hand computations ----------------------------------------------------------------


def test_accuracy_and_f1_small_list_by_hand():
    preds = [1, 1, 0, 1, 0, 0, 1, 0]
    refs = [1, 0, 0, 1, 1, 0, 1, 1]
    # TP=3 (idx 0, 3, 6), FP=1 (idx 1), FN=2 (idx 4, 7), TN=2 (idx 2, 5).
    assert counts(preds, refs) == (3, 2, 1, 2)
    result = glue_metrics("mrpc", preds, refs)
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_f1_random(task, seed):
    preds, refs = random_binary(seed)
    result = glue_metrics(task, preds, refs)
    assert result["accuracy"] == pytest.approx(hand_accuracy(preds, refs))
    assert result["f1"] == pytest.approx(hand_f1(preds, refs))


def test_f1_is_for_label_one_not_label_zero():
    preds = [1, 0, 0, 0, 0, 0]
    refs = [1, 1, 1, 0, 0, 0]
    # Label 1: TP=1, FP=0, FN=2 -> 0.5. Label 0 would give 2*3/(2*3+2+0) = 0.75.
    assert glue_metrics("mrpc", preds, refs)["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matthews_correlation_matches_hand_formula(seed):
    preds, refs = random_binary(seed)
    result = glue_metrics("cola", preds, refs)
    assert result["matthews_correlation"] == pytest.approx(hand_mcc(preds, refs))


def test_matthews_correlation_small_list_by_hand():
    preds = [1, 1, 0, 1, 0, 0, 1, 0]
    refs = [1, 0, 0, 1, 1, 0, 1, 1]
    # TP=3, TN=2, FP=1, FN=2: (6 - 2) / sqrt(4 * 5 * 3 * 4).
    expected = 4 / math.sqrt(240)
    assert glue_metrics("cola", preds, refs)["matthews_correlation"] == pytest.approx(expected)


def test_matthews_correlation_perfect_and_inverted():
    refs = [0, 1, 1, 0, 1]
    assert glue_metrics("cola", refs, refs)["matthews_correlation"] == pytest.approx(1.0)
    inverted = [1 - r for r in refs]
    assert glue_metrics("cola", inverted, refs)["matthews_correlation"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "task", ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"]
)
def test_accuracy_multiclass(task):
    preds = [0, 2, 1, 1, 2, 0, 2]
    refs = [0, 1, 1, 2, 2, 0, 0]
    assert glue_metrics(task, preds, refs)["accuracy"] == pytest.approx(4 / 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stsb_pearson_and_spearman_match_textbook(seed):
    rng = np.random.default_rng(seed)
    # Continuous draws: ties have probability zero, so ranks are well defined.
    refs = rng.uniform(0, 5, size=40)
    preds = refs + rng.normal(0, 1.5, size=40)
    result = glue_metrics("stsb", preds, refs)
    assert result["pearson"] == pytest.approx(hand_pearson(preds, refs))
    assert result["spearmanr"] == pytest.approx(hand_spearman(preds, refs))
    # Nonlinear but monotone predictions separate the two: spearman is exactly 1, pearson is not.
    cubed = glue_metrics("stsb", refs**3, refs)
    assert cubed["spearmanr"] == pytest.approx(1.0)
    assert cubed["pearson"] == pytest.approx(hand_pearson(refs**3, refs))
    assert cubed["pearson"] < 0.999


def test_stsb_perfect_and_anticorrelated():
    refs = [0.5, 1.0, 2.0, 3.5, 4.0]
    assert glue_metrics("stsb", [2 * r + 1 for r in refs], refs) == pytest.approx(
        {"pearson": 1.0, "spearmanr": 1.0}
    )
    assert glue_metrics("stsb", [-r for r in refs], refs) == pytest.approx(
        {"pearson": -1.0, "spearmanr": -1.0}
    )


# --- glue_compute_metrics ----------------------------------------------------------------------------


def test_compute_metrics_argmaxes_logits():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-3.0, 4.0], [1.0, 0.9], [0.0, 5.0]])
    labels = np.array([0, 0, 1, 1, 1])
    hand_preds = [0 if row[0] > row[1] else 1 for row in logits.tolist()]
    assert hand_preds == [0, 1, 1, 0, 1]
    result = glue_compute_metrics("mrpc")(EvalPrediction(predictions=logits, label_ids=labels))
    assert result["accuracy"] == pytest.approx(hand_accuracy(hand_preds, labels))
    assert result["f1"] == pytest.approx(hand_f1(hand_preds, labels))


def test_compute_metrics_takes_first_element_of_tuple():
    logits = np.array([[0.1, 0.2, 3.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 2.0]])
    labels = np.array([2, 0, 0, 2])
    # A second element (e.g. hidden states) that would give a different answer if it were used.
    hidden = np.zeros((4, 3, 8))
    result = glue_compute_metrics("mnli")(EvalPrediction(predictions=(logits, hidden), label_ids=labels))
    # argmax by hand: [2, 0, 1, 2] -> 3 of 4 correct.
    assert result == {"accuracy": pytest.approx(0.75)}


def test_compute_metrics_cola_logits():
    preds, refs = random_binary(3, n=30)
    # Logits whose argmax is preds: the chosen class gets the larger score.
    logits = np.stack([1.0 - preds, preds.astype(float)], axis=1) + 0.25
    result = glue_compute_metrics("cola")(EvalPrediction(predictions=logits, label_ids=refs))
    assert result["matthews_correlation"] == pytest.approx(hand_mcc(preds, refs))


@pytest.mark.parametrize("as_tuple", [False, True])
def test_compute_metrics_stsb_squeezes_n_by_1(as_tuple):
    refs = np.array([0.2, 1.1, 2.9, 3.3, 4.8, 2.0])
    preds = np.array([0.5, 1.0, 2.0, 3.9, 4.1, 2.6])
    predictions = preds.reshape(-1, 1).astype(np.float32)
    if as_tuple:
        predictions = (predictions,)
    result = glue_compute_metrics("stsb")(EvalPrediction(predictions=predictions, label_ids=refs))
    assert set(result) == {"pearson", "spearmanr"}
    assert result["pearson"] == pytest.approx(hand_pearson(preds, refs), rel=1e-6)
    assert result["spearmanr"] == pytest.approx(hand_spearman(preds, refs))


# --- errors ------------------------------------------------------------------------------------------


def test_unknown_task_lists_supported_names():
    for call in (
        lambda: glue_metrics("sst-2", [0], [0]),
        lambda: glue_compute_metrics("squad"),
        lambda: is_regression_task("STSB"),
    ):
        with pytest.raises(ValueError) as excinfo:
            call()
        message = str(excinfo.value)
        for name in EXPECTED_KEYS:
            assert name in message


def test_length_mismatch_reports_both_lengths():
    with pytest.raises(ValueError, match="same length") as excinfo:
        glue_metrics("sst2", [0, 1, 1], [0, 1, 1, 0, 1])
    assert "3" in str(excinfo.value)
    assert "5" in str(excinfo.value)


def test_length_mismatch_through_compute_metrics():
    logits = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"4 predictions and 7 references"):
        glue_compute_metrics("rte")(EvalPrediction(predictions=logits, label_ids=np.zeros(7, dtype=int)))


def test_logits_passed_to_glue_metrics_are_rejected():
    with pytest.raises(ValueError, match="one-dimensional"):
        glue_metrics("sst2", np.zeros((3, 2)), [0, 1, 0])


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        glue_metrics("sst2", [], [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_stsb_non_finite_is_an_error_not_nan(bad):
    with pytest.raises(ValueError, match="finite"):
        glue_metrics("stsb", [1.0, bad, 3.0], [1.0, 2.0, 3.0])


# --- degenerate inputs: 0.0, no NaN, no warning -------------------------------------------------------


@pytest.mark.parametrize(
    ("preds", "refs"),
    [
        ([2.5, 2.5, 2.5, 2.5], [0.0, 1.0, 3.0, 4.0]),  # constant predictions
        ([0.0, 1.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]),  # constant references
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # both constant
    ],
)
def test_stsb_constant_vector_is_zero_without_warning(preds, refs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = glue_metrics("stsb", preds, refs)
    assert result == {"pearson": 0.0, "spearmanr": 0.0}


def test_stsb_constant_through_compute_metrics_without_warning():
    predictions = np.full((5, 1), 3.0, dtype=np.float32)
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = glue_compute_metrics("stsb")(EvalPrediction(predictions=predictions, label_ids=labels))
    assert result == {"pearson": 0.0, "spearmanr": 0.0}


@pytest.mark.parametrize(
    ("preds", "refs"),
    [
        ([1, 1, 1, 1], [0, 1, 0, 1]),  # all predictions one class
        ([0, 1, 1, 0], [1, 1, 1, 1]),  # all labels one class
        ([1, 1, 1], [1, 1, 1]),  # a single shared label (sklearn warns here by default)
    ],
)
def test_matthews_correlation_degenerate_is_zero_without_warning(preds, refs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = glue_metrics("cola", preds, refs)
    assert result == {"matthews_correlation": 0.0}
    assert type(result["matthews_correlation"]) is float


def test_f1_without_any_positive_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = glue_metrics("qqp", [0, 0, 0], [0, 0, 0])
    assert result == {"accuracy": 1.0, "f1": 0.0}


# ----- collapse to one class ---------------------------------------------------------------------------------


def test_single_predicted_class_of_logits_ids_and_other_outputs():
    one = np.array([[0.1, 2.0], [0.3, 0.9], [-1.0, 0.0]])
    assert single_predicted_class(one) == 1 and single_predicted_class((one, "hidden")) == 1
    assert single_predicted_class(np.array([[2.0, 0.1], [0.3, 0.9]])) is None  # two classes
    assert single_predicted_class(np.array([2, 2, 2])) == 2  # class ids
    assert single_predicted_class(np.array([[0.5], [0.7]])) is None  # a regression head
    assert single_predicted_class(np.array([0.5, 0.5])) is None  # float scores, not ids
    assert single_predicted_class(np.array([[0.0, 1.0]])) is None  # one row says nothing
    assert single_predicted_class(None) is None


def test_majority_class_metrics_score_the_constant_majority_prediction():
    refs = [1, 1, 0, 1, -1]  # 3 of 4 labelled rows are 1; the unlabelled row is ignored
    assert majority_class_metrics("mrpc", refs) == {"accuracy": 0.75, "f1": pytest.approx(6 / 7)}
    assert majority_class_metrics("cola", [0, 0, 1]) == {"matthews_correlation": 0.0}
    assert majority_class_metrics("mnli", [2, 2, 0, 1]) == {"accuracy": 0.5}
    assert majority_class_metrics("stsb", [0.5, 4.0]) is None


def test_warn_if_collapsed_names_the_class_its_share_and_the_baseline(caplog):
    logits = np.array([[1.0, 0.0]] * 4)
    with caplog.at_level("WARNING", logger="hf_distill.safety.collapse"):
        assert warn_if_collapsed(logits, np.array([0, 0, 0, 1]), "The teacher") == 0
    assert "The teacher predicted class 0 on all 4 evaluation rows" in caplog.text
    assert "accuracy 0.7500; always predicting the majority class scores 0.7500" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_distill.safety.collapse"):
        assert warn_if_collapsed(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) is None
    assert caplog.text == ""
