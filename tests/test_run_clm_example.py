"""examples/run_clm_distill.py: its command line, the chat prompt masking, and tiny runs of every method."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from hf_distill import topk_cache_metadata

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat slept .",
    "students learn from their teachers .",
    "the teacher knows more words than the student .",
    "rain fell on the quiet town all night .",
]


def load_example():
    if str(REPO / "examples") not in sys.path:  # the script imports its helpers as python would run it
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location("run_clm_distill", REPO / "examples" / "run_clm_distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = load_example()
import run_clm_models  # noqa: E402  (on sys.path once the example is loaded)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_teacher_cache(tmp_path, monkeypatch):
    """Trained teachers and tokenizers go to $HF_HOME/hf_distill/teachers: a fresh one per test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(tmp_path / "hf_home"))


def chat_tokenizer(folder: Path):
    tokenizer = run_clm_models.train_tokenizer(SENTENCES * 4 + ["<|user|><|assistant|><|system|>"], 300)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_files(tmp_path: Path) -> list[str]:
    train = [{"text": f"{s} {i}"} for i in range(8) for s in SENTENCES]
    valid = [{"text": s} for s in SENTENCES]
    return ["--train_file", write_jsonl(tmp_path / "train.jsonl", train),
            "--validation_file", write_jsonl(tmp_path / "valid.jsonl", valid)]  # fmt: skip


TINY = ["--teacher_num_layers", "1", "--teacher_hidden_size", "32", "--student_num_layers", "1",
        "--student_hidden_size", "32", "--tokenizer_vocab_size", "300", "--teacher_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--max_steps", "3", "--max_seq_length", "32",
        "--disable_tqdm", "true"]  # fmt: skip


# ----- the command line --------------------------------------------------------------------------------------


def test_method_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--output_dir", "out"])
    assert exit_info.value.code == 2
    assert "--method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["sft", "kd", "kd_topk"])
def test_a_methods_help_lists_its_own_options(method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--method", method, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert f"--method {method}:" in shown and "--glue_dir" in shown and "--max_seq_length" in shown
    for option in ("--distill_loss", "--jsd_beta", "--loss_chunk_size", "--topk_tail"):
        assert (option in shown) == (method != "sft"), option


def test_distillation_defaults_and_refusals(capsys):
    _, _, args = example.parse_args(["--method", "kd", "--output_dir", "out", "--distill_loss", "jsd"])
    assert (args.alpha, args.temperature, args.distill_loss, args.learning_rate) == (0.5, 1.0, "jsd", 1e-3)
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "kd_topk", "--output_dir", "out", "--distill_loss", "jsd"])
    assert "only the kl objective" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "sft", "--output_dir", "out", "--alpha", "0.5"])


# ----- data ----------------------------------------------------------------------------------------------------


def test_only_the_assistant_turns_are_labelled(tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok")
    messages = [
        {"role": "system", "content": "the teacher knows ."},
        {"role": "user", "content": "the cat sat ?"},
        {"role": "assistant", "content": "on the mat ."},
        {"role": "user", "content": "and the dog ?"},
        {"role": "assistant", "content": "it ran in the park ."},
    ]
    row = example.tokenize_chat(messages, tokenizer, max_length=200)
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    kept = [label for label in row["labels"] if label != -100]
    assert tokenizer.decode(kept) == "on the mat .</s>it ran in the park .</s>"
    first_kept = row["labels"].index(kept[0])
    assert tokenizer.decode(row["input_ids"][:first_kept]).endswith("<|assistant|>")
    assert all(label in (-100, token) for label, token in zip(row["labels"], row["input_ids"], strict=True))


def test_a_chat_without_a_template_is_refused(tmp_path):
    tokenizer = run_clm_models.train_tokenizer(SENTENCES, 300)
    with pytest.raises(ValueError, match="chat template"):
        example.tokenize_chat([{"role": "user", "content": "hi"}], tokenizer, 32)


def test_perplexity_counts_every_scored_token_once(tmp_path):
    tokenizer = run_clm_models.train_tokenizer(SENTENCES, 300)
    model = run_clm_models.new_causal_lm("qwen2", tokenizer, 1, 32, 32)
    rows = datasets.Dataset.from_dict({"text": SENTENCES}).map(
        lambda r: {**tokenizer(r["text"]), "labels": tokenizer(r["text"])["input_ids"]},
        remove_columns=["text"],
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    batched = run_clm_models.perplexity(model, rows, collator, batch_size=2)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding; the model's loss is the mean over its tokens
            ids = torch.tensor([row["input_ids"]])
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert batched["tokens"] == tokens
    assert batched["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


# ----- end to end ----------------------------------------------------------------------------------------------


def card_and_results(out: Path) -> tuple[str, dict]:
    assert (out / "model.safetensors").is_file()
    return (out / "README.md").read_text(), json.loads((out / "eval_results.json").read_text())


def test_every_method_trains_a_student_and_names_the_teacher_and_method(tmp_path):
    cache = tmp_path / "hf_home" / "hf_distill" / "teachers"
    found = {}
    for method in ("kd", "kd_topk", "sft"):
        extra = ["--top_k", "8"] if method == "kd_topk" else []
        result = example.main(
            ["--method", method, "--output_dir", str(tmp_path / method), *TINY, *text_files(tmp_path), *extra]
        )
        card, evaluation = card_and_results(tmp_path / method)
        assert f"- Method: `{method}`" in card
        assert math.isfinite(evaluation["eval_perplexity"]) and evaluation["eval_perplexity"] > 1
        assert result["train"]["train_loss"] > 0
        found[method] = result
    teachers = sorted(cache.glob("clm-llama-*"))
    assert len(teachers) == 1  # trained once, reused by kd_topk
    assert found["kd"]["teacher"]["cached"] is False and found["kd_topk"]["teacher"]["cached"] is True
    for method in ("kd", "kd_topk"):
        card = (tmp_path / method / "README.md").read_text()
        assert f"- Teacher: `{teachers[0]}`" in card
        assert "eval_teacher_perplexity" in json.loads((tmp_path / method / "eval_results.json").read_text())
    assert "Teacher" not in card_and_results(tmp_path / "sft")[0].split("## Distillation run")[1]
    (topk,) = teachers[0].glob("topk8-*")
    assert topk_cache_metadata(datasets.load_from_disk(str(topk)))["top_k"] == 8


def test_a_chat_dataset_trains_on_the_assistant_turns(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    chat_tokenizer(tokenizer_dir)
    chats = [
        {
            "messages": [
                {"role": "user", "content": s},
                {"role": "assistant", "content": SENTENCES[(i + 1) % 5]},
            ]
        }
        for i, s in enumerate(SENTENCES * 4)
    ]
    files = ["--train_file", write_jsonl(tmp_path / "train.jsonl", chats),
             "--validation_file", write_jsonl(tmp_path / "valid.jsonl", chats[:5])]  # fmt: skip
    result = example.main(
        [
            "--method",
            "kd",
            "--output_dir",
            str(tmp_path / "kd"),
            "--tokenizer_name",
            str(tokenizer_dir),
            *TINY,
            *files,
            "--max_seq_length",
            "128",
        ]
    )
    # Scored tokens: the assistant's answers and their end marker, nothing of the prompts.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = sum(len(tokenizer(c["messages"][1]["content"] + "</s>", add_special_tokens=False)["input_ids"])
                   for c in chats[:5])  # fmt: skip
    assert result["eval"]["eval_tokens"] == expected
