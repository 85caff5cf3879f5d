"""hf_distill.distributed (devices): pinned memory only where an accelerator can use it."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from hf_distill import DistillationTrainingArguments, distributed


@pytest.mark.parametrize("accelerator", [False, True])
def test_pin_memory_is_off_without_an_accelerator(tmp_path, monkeypatch, accelerator):
    monkeypatch.setattr(distributed, "accelerator_available", lambda: accelerator)
    args = DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_pin_memory is accelerator
    # use_cpu turns it off even beside an accelerator; an explicit False is never turned on.
    plain = distributed.no_pin_memory_without_accelerator(TrainingArguments(str(tmp_path), report_to=[]))
    assert plain.dataloader_pin_memory is accelerator
    off = TrainingArguments(str(tmp_path), report_to=[], dataloader_pin_memory=False)
    assert distributed.no_pin_memory_without_accelerator(off).dataloader_pin_memory is False


def test_accelerator_available_agrees_with_torch():
    import torch

    assert distributed.accelerator_available() == torch.accelerator.is_available()
