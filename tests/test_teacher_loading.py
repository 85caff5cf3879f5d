"""hf_distill.teacher.loading: a misspelled local teacher folder, and the position limit of a model."""

from __future__ import annotations

import pytest
from testing_utils import tiny_classifier
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill.teacher.loading import load_teacher, looks_like_local_path, max_input_positions


@pytest.mark.parametrize("name", ["./my-teachr", "/no/such/folder", "~/no-such-teacher", "a/b/c"])
def test_a_missing_local_folder_is_named_before_any_hub_request(name):
    with pytest.raises(FileNotFoundError, match="looks like a local folder, but .* does not exist"):
        load_teacher(name, tiny_classifier(layers=1, seed=0))


def test_a_name_inside_an_existing_folder_counts_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_local_path("models/my-teacher")
    assert not looks_like_local_path("bert-base-uncased")
    assert not looks_like_local_path("google-bert/bert-base-uncased")  # owner/name: a Hub id
    with pytest.raises(FileNotFoundError, match="models/my-teacher"):
        load_teacher("models/my-teacher", tiny_classifier(layers=1, seed=0))


def test_position_limits_of_learned_and_rotary_position_embeddings():
    assert max_input_positions(tiny_classifier(layers=1, seed=0)) == 64  # BERT: max_position_embeddings
    roberta = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=20,
            pad_token_id=1,
        )
    )
    assert max_input_positions(roberta) == 18  # positions start after padding_idx (1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=24))
    assert max_input_positions(gpt2) == 24
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=8,
        )
    )
    assert max_input_positions(llama) is None  # rotary: longer inputs do not fail
