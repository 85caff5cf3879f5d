"""hf_distill.nonfinite: the monitor's records, decisions and messages, without trainers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_distill.safety.nonfinite import (
    NonFiniteError,
    NonFiniteMonitor,
    check_finite_weights,
    describe_value,
    first_nonfinite_parameter,
)


def _model_with(value: float | None) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    if value is not None:
        with torch.no_grad():
            model[1].weight[0, 1] = value
    return model


def test_describe_value():
    assert describe_value(math.nan) == "NaN" and describe_value(-math.inf) == "infinite"


@pytest.mark.parametrize(("value", "kind"), [(math.nan, "NaN"), (math.inf, "infinite")])
def test_first_nonfinite_parameter_names_it(value, kind):
    assert first_nonfinite_parameter(_model_with(value)) == ("1.weight", kind)
    assert first_nonfinite_parameter(_model_with(None)) is None


def test_check_finite_weights_refuses_with_name_and_action():
    check_finite_weights(_model_with(None), "teacher", "save")
    with pytest.raises(
        NonFiniteError, match=r"Refusing to save the teacher: the teacher's weights hold NaN .*1\.weight"
    ):
        check_finite_weights(_model_with(math.nan), "teacher", "save the teacher")


def test_finite_records_never_skip_and_nan_or_inf_anywhere_is_found():
    monitor = NonFiniteMonitor("skip")
    monitor.watch("student's loss", torch.tensor(1.0), "student")
    monitor.watch("teacher's logits", torch.ones(4, 3), "teacher")
    assert monitor.bad_quantities() == [] and not monitor.should_skip(1)
    # Accumulated over micro-batches: one bad micro-batch among good ones is found.
    monitor.watch("teacher's logits", torch.tensor([[1.0, math.inf, 0.0]]), "teacher")
    monitor.watch("teacher's logits", torch.ones(4, 3), "teacher")
    monitor.watch_all("quiz gradient", [torch.ones(2), torch.tensor([0.0, math.nan])], "student")
    assert monitor.bad_quantities() == [
        ("teacher's logits", "infinite", "teacher"),
        ("quiz gradient", "NaN", "student"),
    ]


def test_error_policy_names_step_quantity_and_first_bad_weight():
    monitor = NonFiniteMonitor("error")
    monitor.models = {"teacher": [_model_with(math.nan)], "student": [_model_with(None)]}
    monitor.watch("teacher's logits", torch.tensor([math.nan]), "teacher")
    with pytest.raises(
        NonFiniteError,
        match=r"The teacher's logits are NaN at optimisation step 3; the teacher's weights hold NaN values, "
        r"first in 1\.weight\. Nothing was updated.*nonfinite='skip'",
    ):
        monitor.should_skip(3)
    monitor.end_step()
    monitor.watch("student's loss", torch.tensor(math.inf), "student")
    with pytest.raises(
        NonFiniteError, match=r"student's loss is infinite .*weights are all finite, so this step overflowed"
    ):
        monitor.should_skip(4)


def test_skip_policy_counts_each_step_once_and_stops_after_too_many_in_a_row():
    monitor = NonFiniteMonitor("skip", max_consecutive_skips=2)
    for step in (1, 2):
        monitor.watch("teacher's loss", torch.tensor(math.nan), "teacher")
        assert monitor.should_skip(step)  # the teacher's decision
        assert monitor.should_skip(step)  # the student's, same step: not counted twice
        monitor.end_step()
    assert monitor.skipped_steps == 2 and monitor.log_values() == {"nonfinite_skipped_steps": 2}
    monitor.watch("teacher's loss", torch.tensor(1.0), "teacher")
    assert not monitor.should_skip(3)
    monitor.end_step()
    assert monitor.consecutive_skips == 0  # a good step resets the run of skips
    for step in (4, 5):
        monitor.watch("teacher's loss", torch.tensor(math.nan), "teacher")
        monitor.should_skip(step)
        monitor.end_step()
    monitor.watch("teacher's loss", torch.tensor(math.nan), "teacher")
    with pytest.raises(
        NonFiniteError, match=r"3 optimisation steps in a row .*max_consecutive_nonfinite_skips=2"
    ):
        monitor.should_skip(6)


def test_the_decision_uses_the_reduced_totals():
    monitor = NonFiniteMonitor("skip")
    monitor.watch("student's loss", torch.tensor(1.0), "student")
    assert monitor.should_skip(1, reduce=lambda t: t * math.nan)  # another process saw a NaN


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite='warn' is unknown"):
        NonFiniteMonitor("warn")
    assert NonFiniteMonitor("error").log_values() == {}


def test_check_finite_tensors_names_the_first_bad_entry_of_a_state_dict():
    from hf_distill.safety.nonfinite import check_finite_tensors

    state = {"a": torch.ones(2), "ids": torch.tensor([1, 2]), "b": torch.tensor([1.0, float("-inf")])}
    with pytest.raises(
        NonFiniteError, match=r"Refusing to write it: the teacher's weights hold infinite .*first in b"
    ):
        check_finite_tensors(state.items(), "teacher", "write it")
    check_finite_tensors({"a": torch.ones(2)}.items(), "teacher", "write it")
