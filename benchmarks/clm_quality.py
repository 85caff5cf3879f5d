"""Does distillation give a better causal LM student? Validation perplexity of ``sft``, ``kd`` and ``kd_topk``,
seed-paired, with 95% intervals.

    python benchmarks/clm_quality.py --out runs/clm_quality              # a worker: runs what is left
    python benchmarks/clm_quality.py --out runs/clm_quality --report_only

Every run is ``examples/run_clm_distill.py`` called in-process on its default corpus (the sentences of the
GLUE files, found through ``$HF_DISTILL_SHARED/data/glue``; validation files held out): a
byte-level BPE tokenizer (2,048 tokens) and a 4-layer × 128 Llama teacher
trained once on the training sentences for ``--teacher_epochs`` (cached in ``<out>/teacher`` and shared by
every run, with the top-k cache of ``kd_topk``), and a 2-layer × 64 Llama student trained per method and seed
(``MODELS``, smaller than the example's defaults so that 5 seeds fit a shared 2-core CPU), every method for
the same steps (``BUDGET``: one epoch). The student alone is also trained for each of ``--sft_epochs``
(runs ``sft@E``), which shows whether it had converged at the budget.

Resumable and parallel: each finished run leaves ``<out>/runs/<method>-seed<seed>/bench.json`` and is
skipped next time; a worker claims a run before starting it (``claimed``, with its process id: a claim of a
process that is gone is taken over), so several workers can share one ``--out``. The first run that needs
the teacher (or the top-k cache) trains it under a lock while the other workers train the students alone.
The report (``<out>/report.md``) is written from whatever has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "kd", "kd_topk")
# Variants: a method of the example with other arguments (not run unless named in --methods).
VARIANTS = {"kd_topk_bucket": ("kd_topk", ["--topk_tail", "bucket"])}
# The budget (docs/benchmarks.md, "Causal-LM distillation quality"): one rule per lever, equal for every method.
BUDGET = {
    "num_train_epochs": "1",
    "learning_rate": "2e-3",
    "per_device_train_batch_size": "32",
    "max_seq_length": "64",
    "alpha": "0.5",
    "temperature": "1.0",
}
# The models, smaller than the example's defaults so that 5 seeds of 3 methods fit a shared 2-core CPU.
MODELS = {
    "tokenizer_vocab_size": "2048",
    "teacher_num_layers": "4",
    "teacher_hidden_size": "128",
    "teacher_learning_rate": "2e-3",
    "student_num_layers": "2",
    "student_hidden_size": "64",
}


def load_example() -> Any:
    sys.path.insert(0, str(REPO / "examples"))
    import run_clm_distill

    return run_clm_distill


def run_name(method: str, epochs: float | None) -> str:
    """``sft``, ``kd``, ``kd_topk`` at the budget; ``sft@2`` for the student alone trained 2 epochs."""
    return method if epochs is None else f"{method}@{epochs:g}"


def run_argv(
    args: argparse.Namespace, method: str, seed: int, output_dir: Path, epochs: float | None = None
) -> list[str]:
    method, extra = VARIANTS.get(method, (method, []))
    argv = ["--method", method, "--output_dir", str(output_dir), "--seed", str(seed), *extra]
    argv += ["--teacher_cache_dir", str(args.out / "teacher"), "--disable_tqdm", "true"]
    budget = {**BUDGET, "num_train_epochs": f"{epochs:g}"} if epochs is not None else BUDGET
    models = {**MODELS, "teacher_train_epochs": f"{args.teacher_epochs:g}"}
    for key, value in {**models, **budget}.items():
        if method != "sft" or key not in ("alpha", "temperature"):
            argv += [f"--{key}", value]
    if method == "kd_topk":
        argv += ["--top_k", str(args.top_k)]
    return argv


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: Path) -> bool:
    """Claim a run for this process; False when another live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claimed"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            holder = int(path.read_text() or "0")
        except (OSError, ValueError):
            return False
        if holder and _alive(holder):
            return False
        path.write_text(str(os.getpid()))  # a stale claim: its process is gone
        return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


@contextlib.contextmanager
def teacher_lock(args: argparse.Namespace, method: str) -> Iterator[None]:
    """Hold ``<out>/teacher.lock`` while a run may train the teacher or build the top-k cache, so that
    two workers never build them twice."""
    teachers = list((args.out / "teacher").glob("clm-llama-*/hf_distill_clm_teacher.json"))
    ready = bool(teachers) and (
        not method.startswith("kd_topk") or any(teachers[0].parent.glob(f"topk{args.top_k}-*"))
    )
    if method == "sft" or ready:
        yield
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_one(
    args: argparse.Namespace, example: Any, method: str, seed: int, epochs: float | None = None
) -> None:
    name = run_name(method, epochs)
    folder = args.out / "runs" / f"{name}-seed{seed}"
    if (folder / "bench.json").is_file() or not claim(folder):
        return
    print(f"== {name} seed {seed}", flush=True)
    start = time.perf_counter()
    argv = run_argv(args, method, seed, folder / "model", epochs)
    with teacher_lock(args, method):
        results = example.main(argv)
    record = {
        "method": name,
        "seed": seed,
        "perplexity": results["eval"]["eval_perplexity"],
        "teacher_perplexity": results["eval"].get("eval_teacher_perplexity"),
        "steps": results["train"].get("train_steps") or None,
        "train_runtime": results["train"]["train_runtime"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "teacher": {k: v for k, v in results["teacher"].items() if k != "settings"},
        "argv": argv,
    }
    state = (
        json.loads((folder / "model" / "trainer_state.json").read_text())
        if (folder / "model" / "trainer_state.json").is_file()
        else {}
    )
    record["steps"] = state.get("global_step", record["steps"])
    (folder / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    for name in ("model.safetensors", "optimizer.pt"):  # the figures are what the benchmark keeps
        (folder / "model" / name).unlink(missing_ok=True)


def work_order(
    seeds: list[int], methods: list[str], sft_epochs: list[float] = ()
) -> list[tuple[str, int, float | None]]:
    """kd on the first seed first (it trains the teacher), then the students alone (which need no teacher,
    so a second worker has work meanwhile), then the other runs seed by seed, then the longer students
    alone (``--sft_epochs``)."""
    order: list[tuple[str, int, float | None]] = [("kd", seeds[0], None)] if "kd" in methods else []
    order += [("sft", s, None) for s in seeds if "sft" in methods]
    order += [(m, s, None) for s in seeds for m in methods if m != "sft" and (m, s, None) not in order]
    order += [("sft", s, e) for e in sft_epochs for s in seeds]
    return order


def records(args: argparse.Namespace) -> dict[tuple[str, int], dict[str, Any]]:
    found = {}
    for path in sorted((args.out / "runs").glob("*/bench.json")):
        record = json.loads(path.read_text())
        found[record["method"], record["seed"]] = record
    return found


def paired(found: dict, a: str, b: str, seeds: list[int], relative: bool = False) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from paired_stats import paired_difference_interval

    pairs = [
        (found[a, s]["perplexity"], found[b, s]["perplexity"])
        for s in seeds
        if (a, s) in found and (b, s) in found
    ]
    label = f"{a} − {b}" + (" (relative)" if relative else "")
    if len(pairs) < 2:
        return f"| {label} | {len(pairs)} | — | needs 2 seeds |"
    if relative:  # percent of b's perplexity, per seed
        xs = [100 * (x / y - 1) for x, y in pairs]
        interval = paired_difference_interval(xs, [0.0] * len(xs))
        unit = "%"
    else:
        interval = paired_difference_interval([x for x, _ in pairs], [y for _, y in pairs])
        unit = ""
    mark = " *" if interval.excludes_zero else ""
    return (f"| {label} | {interval.n} | {interval.mean:+.3f}{unit} | "
            f"[{interval.low:+.3f}, {interval.high:+.3f}]{unit}{mark} |")  # fmt: skip


def report(args: argparse.Namespace) -> str:
    found = records(args)
    lines = ["# Causal-LM distillation quality (validation perplexity, lower is better)", ""]
    teacher = next((r["teacher_perplexity"] for r in found.values() if r.get("teacher_perplexity")), None)
    if teacher is not None:
        lines += [f"Teacher: perplexity {teacher:.3f}", ""]
    lines += ["| method | seeds | perplexity (mean ± sd) | steps | train s (mean) |", "|---|---|---|---|---|"]
    controls = [run_name("sft", e) for e in args.sft_epochs]
    for method in [*args.methods, *controls]:
        rows = [found[method, s] for s in args.seeds if (method, s) in found]
        if not rows:
            lines.append(f"| {method} | 0 | — | — | — |")
            continue
        values = [r["perplexity"] for r in rows]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        seconds = statistics.mean(r["train_runtime"] for r in rows)
        steps = rows[0]["steps"]
        lines.append(
            f"| {method} | {len(rows)} | {statistics.mean(values):.3f}{spread} | {steps} | {seconds:.0f} |"
        )
    lines += ["", "Seed-paired differences, 95% t interval (* excludes 0):", "",
              "| difference | pairs | mean | 95% interval |", "|---|---|---|---|"]  # fmt: skip
    lines += [paired(found, "kd", "sft", args.seeds), paired(found, "kd_topk", "sft", args.seeds)]
    for variant in ["kd_topk", *[m for m in args.methods if m in VARIANTS]]:
        lines += [
            paired(found, variant, "kd", args.seeds),
            paired(found, variant, "kd", args.seeds, relative=True),
        ]
    # Has the student alone converged at the budget? And is kd still ahead of the longer students alone?
    for control in controls:
        lines += [
            paired(found, control, "sft", args.seeds),
            paired(found, control, "sft", args.seeds, relative=True),
            paired(found, "kd", control, args.seeds),
        ]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="Run folder (resumable).")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--top_k", type=int, default=64)
    p.add_argument(
        "--teacher_epochs",
        type=float,
        default=3.0,
        help="Epochs of the teacher's training (as the GLUE teacher's).",
    )
    p.add_argument(
        "--sft_epochs",
        nargs="*",
        type=float,
        default=[2.0],
        help="The student alone also trained for these epochs (runs 'sft@E'): has it converged at the budget?",
    )
    p.add_argument("--report_only", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        example = load_example()
        for method, seed, epochs in work_order(args.seeds, args.methods, args.sft_epochs):
            run_one(args, example, method, seed, epochs)
    print(report(args))


if __name__ == "__main__":
    main()
