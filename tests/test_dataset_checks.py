"""hf_distill.data.dataset_checks: a dataset checked against the heads and position limits of the models."""

from __future__ import annotations

import datasets
import pytest
from testing_utils import tiny_bert_config, tiny_classifier
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_distill.data.dataset_checks import (
    check_input_lengths_for,
    check_labels_for,
    evaluation_sets,
    expected_label_kind,
)


def test_each_head_expects_its_kind_of_label():
    assert expected_label_kind(tiny_classifier(1)) == "integer"
    assert expected_label_kind(BertForSequenceClassification(tiny_bert_config(1, num_labels=1))) == "float"
    multi = BertForSequenceClassification(tiny_bert_config(1, problem_type="multi_label_classification"))
    assert expected_label_kind(multi) is None  # a float vector per row: left to the head
    assert expected_label_kind(BertForTokenClassification(tiny_bert_config(1))) == "list of integer"
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert expected_label_kind(lm) is None  # language-model labels are often made by the collator


def test_labels_are_checked_for_kind_then_range():
    model = tiny_classifier(1)
    with pytest.raises(ValueError, match="holds string values"):
        check_labels_for(model, datasets.Dataset.from_dict({"label": ["a", "b"]}), "training")
    with pytest.raises(ValueError, match="holds 7 at row 1"):
        check_labels_for(model, datasets.Dataset.from_dict({"label": [0, 7]}), "training")
    multi = BertForSequenceClassification(tiny_bert_config(1, problem_type="multi_label_classification"))
    check_labels_for(multi, datasets.Dataset.from_dict({"labels": [[1.0, 0.0], [0.0, 1.0]]}), "training")


def test_a_teacher_with_its_own_tokenizer_is_checked_on_its_own_column():
    student, teacher = tiny_classifier(1), tiny_classifier(2)  # both allow 64 positions
    rows = {"input_ids": [[1] * 10], "teacher_input_ids": [[1] * 70]}
    with pytest.raises(ValueError, match="'teacher_input_ids', but the teacher accepts at most 64"):
        check_input_lengths_for(student, [teacher], datasets.Dataset.from_dict(rows), "training")


def test_evaluation_sets_name_each_set_of_a_dict():
    a, b = datasets.Dataset.from_dict({"x": [1]}), datasets.Dataset.from_dict({"x": [2]})
    assert evaluation_sets(None) == []
    assert evaluation_sets(a) == [(a, "evaluation")]
    assert evaluation_sets({"dev": a, "test": b}) == [(a, "evaluation ('dev')"), (b, "evaluation ('test')")]
