"""hf_distill.redaction: credentials stay in memory, never in what is pickled, serialised or printed."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from hf_distill import DistillationTrainingArguments, LGTMTrainingArguments
from hf_distill.safety.redaction import REDACTED, is_secret_key, redact_secrets

SECRET = "hf_abcdefSECRET123"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True),
        ("hub_token", True),
        ("use_auth_token", True),
        ("api_key", True),
        ("client_secret", True),
        ("password", True),
        ("Authorization", True),
        ("revision", False),
        ("pad_token_id", False),
        ("tokenizer", False),
        (3, False),
    ],
)
def test_is_secret_key(key, secret):
    assert is_secret_key(key) is secret


def test_redact_secrets_reaches_nested_strings_only():
    value = {"token": SECRET, "revision": "main", "nested": [{"api_key": SECRET, "n": 1}], "hub_token": None}
    redacted = redact_secrets(value)
    assert redacted == {
        "token": REDACTED,
        "revision": "main",
        "nested": [{"api_key": REDACTED, "n": 1}],
        "hub_token": None,
    }
    assert value["token"] == SECRET  # the original is untouched


@pytest.mark.parametrize("args_class", [DistillationTrainingArguments, LGTMTrainingArguments])
def test_arguments_keep_the_token_in_memory_and_nowhere_else(tmp_path, args_class):
    args = args_class(
        output_dir=str(tmp_path),
        report_to=[],
        hub_token=SECRET,
        teacher_model_init_kwargs={"token": SECRET, "revision": "main"},
    )
    assert args.teacher_model_init_kwargs["token"] == SECRET  # the teacher is loaded with it
    assert copy.deepcopy(args).teacher_model_init_kwargs["token"] == SECRET
    assert copy.copy(args).hub_token == SECRET
    buffer = io.BytesIO()
    torch.save(args, buffer)  # as Trainer writes training_args.bin
    for text in (
        buffer.getvalue().decode("latin-1"),
        args.to_json_string(),
        str(args),
        repr(args),
        str([args]),
    ):
        assert SECRET not in text
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    assert reloaded.teacher_model_init_kwargs == {"token": REDACTED, "revision": "main"}
    assert pickle.loads(pickle.dumps(args)).output_dir == str(tmp_path)
