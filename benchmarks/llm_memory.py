"""Peak memory and step time of one distillation step of a causal LM at an LLM vocabulary (151,936 tokens):
the live teacher with full logits, the chunked loss (``loss_chunk_size``), a top-k teacher cache, and plain
`Trainer` fine-tuning of the student alone as the floor.

    python benchmarks/llm_memory.py --out llm_memory.json    # 1 × 2,048 tokens, then the chunked path at 8,192

Models: Qwen2 architecture from a config, random weights (memory and time do not depend on them), both
with tied input and output embeddings as Qwen2.5's small checkpoints have them. Student: hidden 64, 1 layer,
4 heads, 2 key-value heads, MLP 128; teacher: hidden 128, 2 layers, 4/2 heads, MLP 256.

Every configuration runs in its own fresh Python process, so that its peak resident set size (RSS) is its
own: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read after training, next to the process's RSS when
training begins (models, data and trainer built; the optimizer's state is created by the first step). The
step's increment is the difference. Each process runs the real trainer (`trainer.train()`, AdamW) for one
warm-up step and ``--steps`` timed ones, each on a new batch; a callback times each optimisation step
(on_step_begin → on_step_end: forward, loss, backward, optimizer step; the batch is loaded and collated
before) and the report gives the median. The top-k cache is built once beforehand by `cache_teacher_logits`
in a process of its own (its time is reported apart) and loaded from disk by the run that trains on it.

Guards: a run is skipped, and reported as such, when its estimated peak (the unchunked path's increment
measured at the first length, scaled by the token count, for the unchunked path at the second) exceeds
the memory the machine has available; every run also aborts itself if the machine's available memory falls
below ``--min_free_gb`` while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1024**3  # memory is reported in GiB
VOCAB = 151_936


def build_models(vocab_size: int, max_positions: int) -> tuple[Any, Any]:
    """(student, teacher): Qwen2 causal LMs from configs, tied embeddings, seeded random weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shared = dict(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True)
    shared.update(num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    student = Qwen2ForCausalLM(
        Qwen2Config(hidden_size=64, num_hidden_layers=1, intermediate_size=128, **shared)
    )
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(hidden_size=128, num_hidden_layers=2, intermediate_size=256, **shared)
    )
    return student, teacher.eval()


def token_rows(count: int, batch_size: int, length: int, vocab_size: int) -> Any:
    """``count × batch_size`` rows of random token ids, labels equal to them (the trainer shifts them)."""
    import datasets
    import torch

    ids = torch.randint(
        0, vocab_size, (count * batch_size, length), generator=torch.Generator().manual_seed(0)
    )
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def memory_watchdog(min_free_gb: float) -> None:
    """Abort this process if the machine runs short of memory (other processes share it)."""
    import psutil

    def watch() -> None:
        while True:
            if psutil.virtual_memory().available < min_free_gb * GIB:
                print(f"aborted: less than {min_free_gb} GiB of memory left on the machine", file=sys.stderr)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def build_cache(spec: dict[str, Any]) -> dict[str, Any]:
    """Cache the teacher's top k over the run's rows and save it to ``spec["cache_dir"]``."""
    from hf_distill import cache_teacher_logits

    _, teacher = build_models(spec["vocab_size"], spec["seq_len"])
    rows = token_rows(spec["rows"], spec["batch_size"], spec["seq_len"], spec["vocab_size"])
    start = time.perf_counter()
    cached = cache_teacher_logits(rows, teacher, top_k=spec["top_k"], batch_size=spec["batch_size"])
    cached.save_to_disk(spec["cache_dir"])
    seconds = time.perf_counter() - start
    tokens = spec["rows"] * spec["batch_size"] * spec["seq_len"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration's training run: step times and memory (run in a fresh process)."""
    import datasets
    import psutil
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    steps = spec["warmup"] + spec["steps"]
    student, teacher = build_models(spec["vocab_size"], spec["seq_len"])
    if spec["method"] == "topk_cache":
        data = datasets.load_from_disk(spec["cache_dir"])
    else:
        data = token_rows(steps, spec["batch_size"], spec["seq_len"], spec["vocab_size"])
    common = dict(
        output_dir=spec["output_dir"], max_steps=steps, per_device_train_batch_size=spec["batch_size"],
        learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    if spec["method"] == "trainer":
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=data)
    else:
        chunk = spec.get("chunk_size")
        kd = dict(distill_loss="kl", alpha=0.5, temperature=1.0, loss_chunk_size=chunk)
        args = DistillationTrainingArguments(**common, **kd)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)

    record: dict[str, Any] = {"begin": [], "end": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, *_args: Any, **_kwargs: Any) -> None:
            record["rss_at_start_gb"] = psutil.Process().memory_info().rss / GIB
            record["maxrss_before_train_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

        def on_step_begin(self, *_args: Any, **_kwargs: Any) -> None:
            record["begin"].append(time.perf_counter())

        def on_step_end(self, *_args: Any, **_kwargs: Any) -> None:
            record["end"].append(time.perf_counter())

    trainer.add_callback(Timer())
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in kB on Linux
    times = [e - b for b, e in zip(record["begin"], record["end"], strict=True)][spec["warmup"] :]
    return {
        "step_s": statistics.median(times),
        "step_times_s": times,
        "peak_rss_gb": peak,
        "rss_at_start_gb": record["rss_at_start_gb"],
        "maxrss_before_train_gb": record["maxrss_before_train_gb"],
        "step_increment_gb": peak - record["rss_at_start_gb"],
    }


def worker_main(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    memory_watchdog(spec["min_free_gb"])
    result = build_cache(spec) if spec["method"] == "build_cache" else measure(spec)
    print("RESULT " + json.dumps(result))


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its result, or its failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run(
        [sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"failed": f"exit code {done.returncode}: {done.stderr.strip()[-600:]}"}


def available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations, in order: at ``--seq_len``, then at ``--long_seq_len``."""
    short = [{"label": "Trainer, student alone", "method": "trainer"}]
    short.append({"label": "KD, live teacher, unchunked", "method": "unchunked"})
    short += [
        {"label": f"KD, live teacher, chunked {c}", "method": "chunked", "chunk_size": c}
        for c in args.chunk_sizes
    ]
    short.append({"label": f"KD, top-{args.top_k} cache", "method": "topk_cache"})
    long = [
        {"label": f"KD, live teacher, chunked {args.long_chunk_size}", "method": "chunked", "chunk_size": args.long_chunk_size},
        {"label": "KD, live teacher, unchunked", "method": "unchunked"},
    ]  # fmt: skip
    return [{**r, "seq_len": args.seq_len} for r in short] + [
        {**r, "seq_len": args.long_seq_len} for r in long
    ]


def estimate_gb(run: dict[str, Any], done: list[dict[str, Any]]) -> float | None:
    """Peak RSS expected for ``run`` from a run of the same method at another length (memory that grows with
    the tokens scales linearly with them here: the logits and the per-token activations)."""
    for other in done:
        same = other["method"] == run["method"] and other.get("chunk_size") == run.get("chunk_size")
        if same and "peak_rss_gb" in other:
            scale = run["seq_len"] / other["seq_len"]
            return other["rss_at_start_gb"] + other["step_increment_gb"] * scale
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--long_seq_len", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--long_chunk_size", type=int, default=512)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=VOCAB)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min_free_gb", type=float, default=1.5)
    args = parser.parse_args()
    base = {
        "batch_size": args.batch_size, "vocab_size": args.vocab_size, "warmup": args.warmup, "steps": args.steps,
        "threads": args.threads, "min_free_gb": args.min_free_gb, "top_k": args.top_k,
    }  # fmt: skip
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "cache")
        cache_spec = {**base, "method": "build_cache", "seq_len": args.seq_len, "cache_dir": cache_dir}
        cache = run_worker({**cache_spec, "rows": args.warmup + args.steps})
        print(f"top-{args.top_k} cache: {cache}", flush=True)
        for i, run in enumerate(runs(args)):
            estimate = estimate_gb(run, results)
            free = available_gb()
            if estimate is not None and estimate > free - args.min_free_gb:
                run["skipped"] = f"estimated peak {estimate:.1f} GiB, {free:.1f} GiB available"
            else:
                spec = {**base, **run, "cache_dir": cache_dir, "output_dir": str(Path(tmp) / f"run{i}")}
                run.update(run_worker(spec))
            results.append(run)
            print(json.dumps(run), flush=True)
    report = summary(results, args)
    print(report)
    environment = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
        "python": platform.python_version(), **versions(),
    }  # fmt: skip
    payload = {"settings": vars(args), "environment": environment, "cache_build": cache, "runs": results}
    Path(args.out).write_text(json.dumps(payload, indent=2))


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def summary(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """A markdown table of the runs and the ratios the targets are set on."""
    lines = [
        "| tokens | configuration | peak RSS GiB | at start GiB | step increment GiB | step s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['seq_len'] * args.batch_size:,} | {r['label']} |"
        if "peak_rss_gb" in r:
            lines.append(
                f"{head} {r['peak_rss_gb']:.2f} | {r['rss_at_start_gb']:.2f} | {r['step_increment_gb']:.2f} "
                f"| {r['step_s']:.2f} |"
            )
        else:
            lines.append(f"{head} not run: {r.get('skipped') or r.get('failed')} | | | |")
    short = {r["label"]: r for r in results if r["seq_len"] == args.seq_len and "peak_rss_gb" in r}
    unchunked = short.get("KD, live teacher, unchunked")
    if unchunked:
        lines.append("")
        for label, r in short.items():
            if label == "KD, live teacher, unchunked":
                continue
            lines.append(
                f"- {label} / unchunked: peak {r['peak_rss_gb'] / unchunked['peak_rss_gb']:.2f}x, increment "
                f"{r['step_increment_gb'] / unchunked['step_increment_gb']:.2f}x, step time "
                f"{r['step_s'] / unchunked['step_s']:.2f}x"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
