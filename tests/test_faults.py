"""Fault injection: every fault and bad input of docs/reliability.md, each with the outcome it must get."""

from __future__ import annotations

import math
import re

import pytest
from conftest import tiny_run_args

from hf_distill import (
    DistillationTrainingArguments,
    LGTMTrainingArguments,
    MetaDistillTrainingArguments,
    OnlineDistillTrainingArguments,
)

# ----- arguments that would pass a plain `x > 0` test and still give non-finite models ----------------------


@pytest.mark.parametrize(
    ("args_class", "name", "value", "valid"),
    [
        (DistillationTrainingArguments, "temperature", math.inf, "> 0"),
        (DistillationTrainingArguments, "temperature", math.nan, "> 0"),
        (DistillationTrainingArguments, "alpha", math.nan, "in [0, 1]"),
        (DistillationTrainingArguments, "jsd_beta", math.nan, "in [0, 1]"),
        (DistillationTrainingArguments, "dist_intra_weight", math.inf, ">= 0"),
        (DistillationTrainingArguments, "crd_temperature", math.inf, "> 0"),
        (DistillationTrainingArguments, "hidden_distill_weight", math.nan, ">= 0"),
        (DistillationTrainingArguments, "learning_rate", math.inf, ">= 0"),
        (DistillationTrainingArguments, "max_grad_norm", math.nan, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_learning_rate", math.inf, "> 0"),
        (OnlineDistillTrainingArguments, "teacher_max_grad_norm", math.nan, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_weight_decay", math.inf, ">= 0"),
        (OnlineDistillTrainingArguments, "teacher_warmup_ratio", math.nan, "in [0, 1)"),
        (OnlineDistillTrainingArguments, "teacher_alpha", math.nan, "in [0, 1]"),
        (MetaDistillTrainingArguments, "pilot_learning_rate", math.inf, "> 0"),
        (MetaDistillTrainingArguments, "teacher_task_weight", math.inf, ">= 0"),
        (MetaDistillTrainingArguments, "quiz_split", math.nan, "in (0, 1)"),
        (LGTMTrainingArguments, "fd_radius", math.inf, "> 0"),
        (LGTMTrainingArguments, "influence_scale", math.nan, ">= 0"),
        (LGTMTrainingArguments, "influence_scale", math.inf, ">= 0"),
    ],
)
def test_non_finite_arguments_are_refused_with_their_range(tmp_path, args_class, name, value, valid):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite number {valid}, got")):
        tiny_run_args(args_class, tmp_path, **{name: value})


def test_teacher_weights_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_weights\[1\] must be a finite number >= 0, got inf"):
        tiny_run_args(DistillationTrainingArguments, tmp_path, teacher_weights=[1.0, math.inf])
