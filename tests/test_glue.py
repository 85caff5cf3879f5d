"""hf_distill.glue: task tables, split names, tokenisation, predictions and scores (the file readers are
exercised with the GLUE example in test_run_glue_example.py)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from hf_distill.glue.data import (
    eval_split_names,
    glue_label_names,
    glue_num_labels,
    metric_task,
    predictions_from_logits,
    score_predictions,
    tokenize_glue,
)
from hf_distill.glue.data import test_split_names as glue_test_split_names


def test_label_names_and_head_sizes():
    assert glue_label_names("mnli") == ["entailment", "neutral", "contradiction"]
    assert glue_num_labels("mnli") == 3 and glue_num_labels("mrpc") == 2
    assert glue_label_names("stsb") is None and glue_num_labels("stsb") == 1  # regression: one output
    with pytest.raises(ValueError, match="Unknown GLUE task 'mrcp'"):
        glue_num_labels("mrcp")


def test_mnli_has_matched_and_mismatched_splits():
    assert eval_split_names("mnli") == ["validation_matched", "validation_mismatched"]
    assert glue_test_split_names("mnli") == ["test_matched", "test_mismatched"]
    assert eval_split_names("rte") == ["validation"] and glue_test_split_names("rte") == ["test"]
    assert metric_task("mnli", "validation_mismatched") == "mnli_mismatched"
    assert metric_task("mnli", "validation_matched") == "mnli_matched"
    assert metric_task("qnli", "validation") == "qnli"


def test_predictions_are_argmax_or_the_regression_score():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert predictions_from_logits("mrpc", logits).tolist() == [1, 0, 1]
    assert predictions_from_logits("mrpc", (logits, "extra outputs")).tolist() == [1, 0, 1]
    assert predictions_from_logits("stsb", np.array([[1.5], [4.25]])).tolist() == [1.5, 4.25]


def test_score_predictions_uses_the_split_metric():
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # predicts 1, 0, 1, 1
    scores = score_predictions("mrpc", "validation", logits, np.array([1, 0, 0, 1]))
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(0.8)  # precision 2/3, recall 1


def test_tokenize_glue_keeps_label_and_idx_and_drops_the_text(tokenizer):
    rows = datasets.Dataset.from_dict(
        {"sentence1": ["w5 w6", "w7"], "sentence2": ["w8", "w9 w10 w11"], "label": [1, 0], "idx": [3, 4]}
    )
    tokenized = tokenize_glue(rows, tokenizer, "mrpc", max_seq_length=6)
    assert set(tokenized.column_names) == {"label", "idx", "input_ids", "token_type_ids", "attention_mask"}
    assert tokenized["label"] == [1, 0] and tokenized["idx"] == [3, 4]
    # The pair is encoded as [CLS] s1 [SEP] s2 [SEP], cut to max_seq_length, and not padded.
    first = tokenized[0]["input_ids"]
    assert first == tokenizer("w5 w6", "w8")["input_ids"] and len(first) == 6
    assert len(tokenized[1]["input_ids"]) == 6  # 7 tokens, truncated
    both = tokenize_glue(datasets.DatasetDict({"train": rows, "test": rows}), tokenizer, "mrpc")
    assert set(both) == {"train", "test"} and both["test"]["idx"] == [3, 4]
