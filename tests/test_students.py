"""hf_distill.students: a student of the teacher's architecture made of some of its layers."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import tiny_bert_config, tiny_classifier
from transformers import BertForSequenceClassification

from hf_distill import student_from_teacher
from hf_distill.students import teacher_layer_indices


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def by_hand(teacher: BertForSequenceClassification, kept: list[int]) -> BertForSequenceClassification:
    """The reference: a deep copy of the teacher whose layer list holds only the layers ``kept``."""
    model = copy.deepcopy(teacher)
    model.bert.encoder.layer = torch.nn.ModuleList(model.bert.encoder.layer[i] for i in kept)
    model.config.num_hidden_layers = len(kept)
    return model


@pytest.mark.parametrize(("layers", "kept"), [("first", [0, 1]), ("spread", [0, 3]), ([3, 1], [3, 1])])
def test_the_student_computes_what_the_kept_teacher_layers_compute(layers, kept):
    teacher = tiny_classifier(layers=4, seed=1).eval()
    student = student_from_teacher(teacher, 2, layers=layers).eval()
    assert isinstance(student, BertForSequenceClassification) and student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not changed
    with torch.no_grad():
        expected = by_hand(teacher, kept)(**inputs()).logits
        torch.testing.assert_close(student(**inputs()).logits, expected, rtol=0, atol=0)
        assert not torch.allclose(expected, teacher(**inputs()).logits)  # fewer layers: another model


def test_the_students_parameters_are_copies():
    teacher = tiny_classifier(layers=3, seed=1)
    before = copy.deepcopy(teacher.state_dict())
    student = student_from_teacher(teacher, 2)
    teacher_pointers = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_pointers & {p.data_ptr() for p in student.parameters()}
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_student_keeps_the_teachers_dtype_and_mode_and_leaves_the_random_stream():
    teacher = tiny_classifier(layers=2, seed=1).to(torch.float64).eval()
    torch.manual_seed(7)
    student = student_from_teacher(teacher, 1)
    after = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(2))
    assert {p.dtype for p in student.parameters()} == {torch.float64} and not student.training


@pytest.mark.parametrize(
    ("num_layers", "layers", "message"),
    [
        (0, "first", "num_layers must be an integer from 1 to the teacher's 3 layers, got 0"),
        (4, "first", "num_layers must be an integer from 1 to the teacher's 3 layers, got 4"),
        (2, "last", "layers='last' is unknown"),
        (2, [0], "layers names 1 teacher layers for a student of num_layers=2"),
        (2, [0, 3], "distinct indices from 0 to 2"),
        (2, [1, 1], "distinct indices from 0 to 2"),
    ],
)
def test_bad_layer_choices_are_refused(num_layers, layers, message):
    with pytest.raises(ValueError, match=message):
        student_from_teacher(tiny_classifier(layers=3), num_layers, layers=layers)


def test_a_model_without_a_findable_layer_list_is_refused_naming_what_was_looked_for():
    class Renamed(BertForSequenceClassification):
        def __init__(self, config):
            super().__init__(config)
            self.bert.encoder.stack = self.bert.encoder.layer
            del self.bert.encoder.layer

    with pytest.raises(ValueError, match="named layer / layers / h / block / blocks .* found none"):
        student_from_teacher(Renamed(tiny_bert_config(layers=2)), 1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        student_from_teacher(torch.nn.Linear(2, 2), 1)


def test_spread_reaches_from_the_first_to_the_last_layer():
    assert teacher_layer_indices(12, 6, "spread") == [0, 2, 4, 7, 9, 11]
    assert teacher_layer_indices(12, 1, "spread") == [0]
    assert teacher_layer_indices(12, 12, "spread") == list(range(12))
