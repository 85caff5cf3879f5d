"""Defaults that depend on the hardware the run finds."""

from __future__ import annotations

from typing import Any

import torch


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, ROCm, MPS, XPU, ...) that pinned memory would serve."""
    return bool(torch.accelerator.is_available())  # what torch's DataLoader asks before pinning


def no_pin_memory_without_accelerator(args: Any) -> Any:
    """Turn ``args.dataloader_pin_memory`` off when there is no accelerator (or ``use_cpu``); returns ``args``.

    Pinned memory only speeds up copies to an accelerator; without one, torch's DataLoader warns at every
    loader that pinning was asked for and does nothing. `TrainingArguments` turns it off for ``use_cpu``
    only; our argument classes do it whenever no accelerator is present, and the examples apply this to
    their plain `TrainingArguments`.
    """
    if getattr(args, "dataloader_pin_memory", False) and (args.use_cpu or not accelerator_available()):
        args.dataloader_pin_memory = False
    return args
