"""hf_distill.distributed: pinned memory only where an accelerator can use it; whole-weight passes over a model
FSDP2 shards (their 2-rank checks are in tests/test_fsdp_learning.py)."""

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


def test_unsharded_skeleton_holds_no_trainable_weights_and_runs_given_ones():
    import torch
    from testing_utils import tiny_classifier

    model = tiny_classifier(layers=1, seed=3)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a frozen weight stays real
    skeleton = distributed.unsharded_skeleton(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in skeleton.named_parameters():
        assert (param.device.type == "meta") == (name in trainable), name
    assert all(b.device.type != "meta" for b in skeleton.buffers())
    assert all(p.device.type != "meta" for p in model.parameters())  # the model itself is untouched

    values = {n: v.requires_grad_(True) for n, v in distributed.whole_trainable_parameters(model).items()}
    assert set(values) == trainable
    inputs = {"input_ids": torch.tensor([[2, 9, 7, 4]]), "labels": torch.tensor([1])}
    model.eval(), skeleton.eval()
    outputs = distributed.WholeWeightsModel(skeleton, values)(**inputs)
    torch.testing.assert_close(outputs.logits, model(**inputs).logits, rtol=0, atol=0)
    outputs.loss.backward()
    assert all(v.grad is not None for v in values.values())  # differentiable in the given weights


def test_unsharded_skeleton_keeps_tied_weights_tied():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    skeleton = distributed.unsharded_skeleton(model).eval()
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    values = distributed.whole_trainable_parameters(model)
    assert "lm_head.weight" not in values  # named once, under the embedding's name
    ids = torch.tensor([[1, 5, 7, 3]])
    torch.testing.assert_close(
        distributed.WholeWeightsModel(skeleton, values)(input_ids=ids).logits, model(input_ids=ids).logits
    )
