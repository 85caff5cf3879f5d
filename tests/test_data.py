"""hf_distill.data: the batch split (DistillationBatch) and the distillation collator."""

from __future__ import annotations

import datasets
import pytest
import torch
from testing_utils import VOCAB, tiny_tokenizer
from transformers import DataCollatorWithPadding

from hf_distill import DistillationBatch, DistillationDataCollator
from hf_distill.data.batch import dataset_columns, has_columns


def collated() -> dict:
    return {
        "input_ids": torch.tensor([[2, 9, 7], [2, 8, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([1, 0]),
        "teacher_input_ids": torch.tensor([[2, 30, 31, 32], [2, 33, 0, 0]]),
        "teacher_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "teacher_logits": torch.tensor([[0.5, -0.5], [1.0, 2.0]]),
        "idx": torch.tensor([10, 11]),
    }


def test_the_batch_is_split_into_what_each_model_reads():
    raw = collated()
    batch = DistillationBatch.from_collated(raw)
    assert set(batch.student) == {"input_ids", "attention_mask", "labels"}
    assert set(batch.teacher) == {"input_ids", "attention_mask"}  # the prefix removed
    assert batch.teacher["input_ids"] is raw["teacher_input_ids"]
    assert batch.cached_teacher_logits is raw["teacher_logits"] and batch.row_ids is raw["idx"]
    assert batch.labels is raw["labels"] and set(batch.features) == {"input_ids", "attention_mask"}
    assert not batch.starts_step and batch.after_backward == []
    assert DistillationBatch.from_collated(batch) is batch  # split once: a split batch passes through


def test_teacher_inputs_prefer_the_teachers_own_columns_and_filter_by_its_forward():
    batch = DistillationBatch.from_collated(collated())
    accepted = {"input_ids", "attention_mask"}
    assert batch.teacher_inputs(accepted)["input_ids"].shape == (2, 4)
    with_labels = batch.teacher_inputs(accepted, with_labels=True)
    assert set(with_labels) == {"input_ids", "attention_mask", "labels"}  # the student's labels
    assert with_labels["labels"] is batch.labels
    plain = DistillationBatch.from_collated(
        {k: v for k, v in collated().items() if not k.startswith("teacher_")}
    )
    assert plain.teacher == {} and plain.cached_teacher_logits is None
    assert plain.teacher_inputs({"input_ids"}) == {"input_ids": plain.student["input_ids"]}


def test_step_batches_mark_the_first_micro_batch_of_a_step():
    micro = [collated(), collated()]
    first = DistillationBatch.from_collated(micro[0], step_batches=micro)
    assert first.starts_step and first.step_batches is micro
    assert not DistillationBatch.from_collated(micro[1]).starts_step


def test_collator_pads_teacher_columns_with_the_teacher_tokenizer(tmp_path):
    student_tok = tiny_tokenizer(tmp_path / "s")
    teacher_tok = tiny_tokenizer(tmp_path / "t", vocab_size=VOCAB + 16, prefix="u")
    assert teacher_tok.pad_token_id == 0
    collator = DistillationDataCollator(DataCollatorWithPadding(student_tok), teacher_tok)
    features = [
        {
            "input_ids": [2, 9, 3],
            "label": 1,
            "teacher_input_ids": [2, 70, 71, 72, 3],
            "idx": 4,
            "teacher_logits": [0.1, 0.9],
        },
        {
            "input_ids": [2, 3],
            "label": 0,
            "teacher_input_ids": [2, 3],
            "idx": 7,
            "teacher_logits": [0.8, 0.2],
        },
    ]
    batch = collator(features)
    assert batch["input_ids"].tolist() == [[2, 9, 3], [2, 3, 0]]
    assert batch["teacher_input_ids"].tolist() == [[2, 70, 71, 72, 3], [2, 3, 0, 0, 0]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["idx"].tolist() == [4, 7] and batch["idx"].dtype == torch.long
    torch.testing.assert_close(batch["teacher_logits"], torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    assert batch["labels"].tolist() == [1, 0]


def test_collator_zero_pads_ragged_token_level_cached_logits_and_needs_a_teacher_tokenizer():
    collator = DistillationDataCollator()
    rows = [
        {"input_ids": [1, 2, 3], "teacher_logits": [[1.0, 2.0]] * 3},
        {"input_ids": [1, 2, 3], "teacher_logits": [[3.0, 4.0]]},
    ]
    logits = collator(rows)["teacher_logits"]
    assert (
        logits.shape == (2, 3, 2) and logits[1, 1:].abs().sum() == 0 and logits[1, 0].tolist() == [3.0, 4.0]
    )
    with pytest.raises(ValueError, match="teacher_processing_class"):
        collator([{"input_ids": [1, 2], "teacher_input_ids": [1, 2]}])


def test_dataset_columns_of_datasets_and_plain_lists():
    data = datasets.Dataset.from_dict({"input_ids": [[1]], "teacher_logits": [[0.0]]})
    assert dataset_columns(data) == {"input_ids", "teacher_logits"}
    assert dataset_columns([{"input_ids": [1], "label": 0}]) == {"input_ids", "label"}
    assert dataset_columns(None) == set()
    assert has_columns(data, ["teacher_logits", "idx"]) and not has_columns(data, ["idx"])


# ----- a top-k teacher cache --------------------------------------------------------------------------------


def test_top_k_columns_are_padded_by_position_and_split_off_the_teachers_inputs():
    rows = [
        {"input_ids": [1, 2, 3], "teacher_topk_ids": [[4, 5]] * 3, "teacher_topk_logprobs": [[-0.1, -2.0]] * 3,
         "teacher_tail_logprob": [-3.0] * 3},
        {"input_ids": [1, 2, 3], "teacher_topk_ids": [[6, 7]], "teacher_topk_logprobs": [[-0.5, -1.0]],
         "teacher_tail_logprob": [-4.0]},
    ]  # fmt: skip
    raw = DistillationDataCollator()(rows)
    assert raw["teacher_topk_ids"].dtype == torch.long and raw["teacher_topk_ids"].shape == (2, 3, 2)
    assert raw["teacher_topk_logprobs"].dtype == torch.float32 and raw["teacher_tail_logprob"].shape == (2, 3)
    assert (
        raw["teacher_topk_ids"][1, 0].tolist() == [6, 7] and raw["teacher_topk_ids"][1, 1:].abs().sum() == 0
    )
    assert raw["teacher_tail_logprob"][1].tolist() == [-4.0, 0.0, 0.0]
    batch = DistillationBatch.from_collated(raw)
    assert batch.teacher == {} and set(batch.student) == {"input_ids"}
    assert batch.cached_teacher_topk.ids is raw["teacher_topk_ids"]
    assert batch.cached_teacher_topk.tail_logprob is raw["teacher_tail_logprob"]


def test_a_top_k_cache_of_ragged_rows_keeps_each_rows_positions_and_its_record_through_disk(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_distill import cache_teacher_logits, topk_cache_metadata

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    data = datasets.Dataset.from_dict({"input_ids": [[2, 9, 7, 3], [2, 8, 3], [2, 3]]})
    data.info.description = "my data"
    cached = cache_teacher_logits(
        data, teacher, tokenizer=tokenizer, top_k=5, batch_size=2, teacher_name="me/t"
    )
    cached.save_to_disk(tmp_path / "cache")
    loaded = datasets.load_from_disk(str(tmp_path / "cache"))
    assert [len(r) for r in loaded["teacher_tail_logprob"]] == [4, 3, 2]
    assert loaded.info.description.startswith("my data\n")
    record = topk_cache_metadata(loaded.remove_columns("input_ids").shuffle(seed=0))
    assert (
        record["teacher"] == "me/t" and record["top_k"] == 5 and record["tokenizer"] == str(tmp_path / "tok")
    )
    with torch.no_grad():
        expected = torch.log_softmax(teacher.eval()(torch.tensor([[2, 8, 3]])).logits[0], -1).topk(5, -1)
    torch.testing.assert_close(
        torch.tensor(loaded[1]["teacher_topk_logprobs"]), expected.values, atol=3e-3, rtol=0
    )
    assert record["max_token_id"] == max(max(max(r) for r in row) for row in loaded["teacher_topk_ids"])
    with pytest.raises(ValueError, match="caches one teacher; got 2"):
        cache_teacher_logits(data, [teacher, teacher], tokenizer=tokenizer, top_k=5)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        cache_teacher_logits(data, teacher, tokenizer=tokenizer, top_k=0)
