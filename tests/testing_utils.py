"""Shared test helpers: tiny models, tokenizers and data built in the tests themselves, so the suite stays
fast and offline (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SHARED = Path(os.environ.get("HF_DISTILL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VOCAB = 64


def tiny_bert_config(
    layers: int = 2, num_labels: int = 2, vocab_size: int = VOCAB, **overrides
) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        # No dropout unless a test asks for it, so that two forwards of the same batch agree.
        **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides},
    )


def tiny_classifier(
    layers: int = 2, num_labels: int = 2, seed: int = 0, **overrides
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(layers, num_labels, **overrides))


def tiny_classifier_with_dropout(layers: int, seed: int) -> BertForSequenceClassification:
    """A tiny classifier with dropout 0.1 on hidden states and attention, for tests where masks matter."""
    return tiny_classifier(layers, seed=seed, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def assert_same_parameters(expected: torch.nn.Module, actual: torch.nn.Module, label: str = "") -> None:
    """Every parameter of ``actual`` equals ``expected``'s to float32 rounding, named in the failure."""
    for (name, a), b in zip(expected.named_parameters(), actual.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{label}{name}")


def keyword_dataset(
    n: int = 64, length: int = 10, seed: int = 0, vocab_size: int = VOCAB
) -> datasets.Dataset:
    """A learnable task: label 1 when token 7 occurs in the sequence. Rows have ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "label": [], "idx": []}
    for i in range(n):
        size = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        ids = torch.randint(8, vocab_size, (size,), generator=g)
        label = i % 2
        if label:
            ids[int(torch.randint(0, size, (1,), generator=g))] = 7
        rows["input_ids"].append([2, *ids.tolist()])
        rows["attention_mask"].append([1] * (size + 1))
        rows["label"].append(label)
        rows["idx"].append(i)
    return datasets.Dataset.from_dict(rows)


# Arguments every tiny trainer test shares: CPU, one epoch, a log line per step, nothing saved or reported.
TINY_RUN = dict(
    per_device_train_batch_size=8,
    num_train_epochs=1,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)


def tiny_run_args(args_class, tmp_path: Path, **overrides):
    """``args_class`` with `TINY_RUN` defaults and ``output_dir`` under ``tmp_path``; ``overrides`` win."""
    return args_class(**{"output_dir": str(tmp_path / "out"), **TINY_RUN, **overrides})


def write_vocab(folder: Path, vocab_size: int = VOCAB, prefix: str = "w") -> Path:
    """A WordPiece vocabulary: the five BERT specials, then words ``<prefix>5`` … ``<prefix>{vocab_size-1}``."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"{prefix}{i}" for i in range(5, vocab_size)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def tiny_tokenizer(folder: Path, vocab_size: int = VOCAB, prefix: str = "w") -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(write_vocab(folder, vocab_size, prefix)))


# ----- training runs in their own process (kill-and-resume tests) ------------------------------------------

WORKER_TIMEOUT_S = 180


def worker_env() -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def start_worker(
    worker: Path, output_dir: Path, result: Path, *extra: str, log: Path
) -> tuple[subprocess.Popen, object]:
    stream = open(log, "w")  # closed by the fixture
    command = [sys.executable, str(worker), str(output_dir), str(result), *extra]
    proc = subprocess.Popen(
        command,
        env=worker_env(),
        cwd=Path(__file__).resolve().parents[1],
        stdout=stream,
        stderr=subprocess.STDOUT,
    )
    return proc, stream


def finish_worker(proc: subprocess.Popen, stream, log: Path, what: str) -> None:
    try:
        proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} did not finish in {WORKER_TIMEOUT_S} s:\n{log.read_text()[-8000:]}")
    stream.close()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{log.read_text()[-8000:]}"


def assert_state_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str
):
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        diff = (actual[name].float() - value.float()).abs().max().item()
        assert diff <= atol, f"{what}: {name} differs by {diff}"


# ----- runs on several processes (torch.distributed.run, gloo on CPU) ------------------------------------------

LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(worker: Path, ranks: int, *worker_args: str) -> None:
    """``worker`` on ``ranks`` processes with ``torch.distributed.run``; fails the test with its output when a
    rank fails or the run outlives `LAUNCH_TIMEOUT_S`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    for attempt in range(2):  # a second try only if another process took the free port meanwhile
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), *worker_args,
        ]  # fmt: skip
        # A session of its own, so that a timeout ends the launcher and every rank together.
        proc = subprocess.Popen(
            command,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"the {ranks}-process run did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-8000:]}")
        if proc.returncode == 0:
            return
        if attempt == 0 and "address already in use" in output.lower():
            continue
        pytest.fail(f"the {ranks}-process run failed ({proc.returncode}):\n{output[-10000:]}")


def load_result(path: Path) -> dict:
    assert path.is_file(), f"the worker wrote no {path.name}"
    return torch.load(path, weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between two state dicts, and where."""
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    return (a[worst].float() - b[worst].float()).abs().max().item(), worst
