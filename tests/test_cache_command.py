"""The hf-distill-cache-logits command, end to end on a tiny teacher and dataset saved here."""

from __future__ import annotations

import datasets
import pytest
import torch
from testing_utils import VOCAB, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from hf_distill import topk_cache_metadata
from hf_distill.data.cache_command import main
from hf_distill.data.teacher_logits import tokenizer_vocab_hash


@pytest.fixture
def teacher_folder(tmp_path):
    """A tiny causal LM saved with its tokenizer, as a teacher on disk is."""
    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=2, eos_token_id=3
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer(tmp_path / "vocab").save_pretrained(folder)
    return folder


def test_text_is_tokenised_cached_and_saved_with_its_record(tmp_path, teacher_folder):
    texts = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15 w16", "w20"]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    main(["--dataset", str(tmp_path / "data"), "--teacher", str(teacher_folder), "--top_k", "4",
          "--output_dir", str(out), "--batch_size", "3", "--logprob_dtype", "float32"])  # fmt: skip
    cached = datasets.load_from_disk(str(out))
    record = topk_cache_metadata(cached)
    tokenizer = tiny_tokenizer(tmp_path / "again")
    assert record["teacher"] == str(teacher_folder) and record["top_k"] == 4 and record["vocab_size"] == VOCAB
    assert record["temperature"] == 1.0
    assert record["tokenizer_vocab_sha256"] == tokenizer_vocab_hash(tokenizer)
    teacher = GPT2LMHeadModel.from_pretrained(teacher_folder).eval()
    for text, row in zip(texts, cached, strict=True):
        encoded = tokenizer(text, return_tensors="pt")
        assert row["input_ids"] == encoded["input_ids"][0].tolist()
        with torch.no_grad():
            log_q = torch.log_softmax(teacher(**encoded).logits[0].double(), -1)
        values, ids = log_q.topk(4, -1)
        assert torch.equal(torch.tensor(row["teacher_topk_ids"]), ids)
        torch.testing.assert_close(
            torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64), values, rtol=0, atol=1e-5
        )
        tail = torch.log1p(-values.exp().sum(-1))
        torch.testing.assert_close(
            torch.tensor(row["teacher_tail_logprob"], dtype=torch.float64), tail, rtol=0, atol=1e-5
        )


def test_tokenised_rows_of_a_split_are_cached_compactly(tmp_path, teacher_folder):
    rows = {"input_ids": [[2, 5, 6, 3], [2, 7, 3]], "attention_mask": [[1, 1, 1, 1], [1, 1, 1]]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    main(["--dataset", str(tmp_path / "data"), "--split", "validation", "--teacher", str(teacher_folder),
          "--top_k", "8", "--output_dir", str(out)])  # fmt: skip
    cached = datasets.load_from_disk(str(out))
    assert [len(r) for r in cached["teacher_topk_ids"]] == [4, 3]
    assert cached.features["teacher_topk_ids"].feature.feature.dtype == "int32"
    assert cached.features["teacher_topk_logprobs"].feature.feature.dtype == "float16"
    assert cached.features["teacher_topk_ids"].feature.length == 8
    with pytest.raises(ValueError, match="has no split 'train'"):
        main(
            ["--dataset", str(tmp_path / "data"), "--teacher", str(teacher_folder), "--output_dir", str(out)]
        )


def test_rows_without_text_or_ids_are_refused(tmp_path, teacher_folder):
    datasets.Dataset.from_dict({"sentence": ["w5 w6"]}).save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError, match="neither input_ids nor a 'text' column.*--text_column"):
        main(
            [
                "--dataset",
                str(tmp_path / "data"),
                "--teacher",
                str(teacher_folder),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
