"""Figures from the influence log that `InfluenceLoggerCallback` writes (see https://hf-distill.readthedocs.io/callbacks/).

- `plot_sample_trajectories`: the weight of a few chosen samples over training, each point marked with
  whether the teacher and the student got the sample right at that step;
- `plot_mean_trend`: the mean weight of random samples over training with a ±1 std band, as in the LGTM
  paper's analysis figures;
- `main`: the ``hf-distill-plot-influence`` command line, which writes both.

matplotlib is an optional dependency, imported only when a figure is drawn; figures are rendered with the
Agg backend directly (no pyplot), so nothing here changes the backend of an interactive session.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# The fields of one influence record, as InfluenceLoggerCallback writes them. Defined here, in a module
# that imports no torch or transformers, so that the plotting command stays light; callbacks imports it.
RECORD_FIELDS = ("step", "idx", "influence", "teacher_gold_prob", "student_gold_prob")
# What the figures' x axis is: the log's `step`, trainer.state.global_step before the step.
STEP_AXIS_LABEL = "optimisation step (counted from 0, as in the influence log)"

MISSING_IDX = -1  # the `idx` column's value for records written without row ids
TRAJECTORIES_PNG = "influence_trajectories.png"
MEAN_TREND_PNG = "influence_mean_trend.png"

# (label, teacher correct, student correct, marker, colour): colour-blind-safe pairs of hue and shape.
CORRECTNESS_STYLES = (
    ("teacher and student correct", True, True, "o", "#009E73"),
    ("only teacher correct", True, False, "v", "#E69F00"),
    ("only student correct", False, True, "s", "#0072B2"),
    ("both wrong", False, False, "X", "#D55E00"),
)

Columns = dict[str, np.ndarray]


# ----- loading ------------------------------------------------------------------------------------------------


def load_influence_log(path: str | os.PathLike[str]) -> Columns:
    """Read an influence JSONL file into columns: a dict of equal-length numpy arrays, in file order.

    ``step`` and ``idx`` are int64 (``idx`` is -1 where the record has none); ``influence``,
    ``teacher_gold_prob`` and ``student_gold_prob`` are float64 with NaN where the record has ``null``.
    Columns rather than a list of dicts: a full 64 MiB log holds about half a million records, which as
    Python dicts would take gigabytes. A last line cut short by a crash is skipped with a warning; any
    other malformed line is an error.
    """
    steps: list[int] = []
    ids: list[int] = []
    values: dict[str, list[float]] = {name: [] for name in RECORD_FIELDS[2:]}
    bad: list[int] = []
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
            idx = MISSING_IDX if record.get("idx") is None else int(record["idx"])
            row = {name: _float(record.get(name)) for name in RECORD_FIELDS[2:]}
        except (ValueError, KeyError, TypeError):
            bad.append(n)
            continue
        steps.append(step)
        ids.append(idx)
        for name in RECORD_FIELDS[2:]:
            values[name].append(row[name])
    if bad and bad != [last]:
        raise ValueError(f"{os.fspath(path)}: line {bad[0] + 1} is not an influence record")
    if bad:
        logger.warning("%s: skipped an incomplete last line (a run interrupted mid-write)", os.fspath(path))
    columns: Columns = {"step": np.asarray(steps, dtype=np.int64), "idx": np.asarray(ids, dtype=np.int64)}
    for name in RECORD_FIELDS[2:]:
        columns[name] = np.asarray(values[name], dtype=np.float64)
    return columns


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _as_columns(records: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Columns:
    """Accept `load_influence_log`'s columns or a list of record dicts (as read line by line)."""
    if isinstance(records, Mapping):
        missing = [name for name in RECORD_FIELDS if name not in records]
        if missing:
            raise ValueError(f"influence records lack the columns {missing}")
        columns = {name: np.asarray(records[name]) for name in RECORD_FIELDS}
    else:
        columns = {
            "step": np.asarray([int(r["step"]) for r in records], dtype=np.int64),
            "idx": np.asarray(
                [MISSING_IDX if r.get("idx") is None else int(r["idx"]) for r in records], dtype=np.int64
            ),
        }
        for name in RECORD_FIELDS[2:]:
            columns[name] = np.asarray([_float(r.get(name)) for r in records], dtype=np.float64)
    columns["step"] = columns["step"].astype(np.int64)
    columns["idx"] = columns["idx"].astype(np.int64)
    for name in RECORD_FIELDS[2:]:
        columns[name] = columns[name].astype(np.float64)
    return columns


def logged_sample_ids(records: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The distinct row ids in the log, sorted (records without a row id are left out)."""
    ids = _as_columns(records)["idx"]
    return np.unique(ids[ids != MISSING_IDX])


def random_sample_ids(
    records: Mapping[str, Any] | Sequence[Mapping[str, Any]], num_samples: int, seed: int = 0
) -> np.ndarray:
    """`num_samples` distinct row ids drawn uniformly from those in the log (all of them if fewer), sorted."""
    ids = logged_sample_ids(records)
    if ids.size == 0:
        raise ValueError(
            "the influence log has no records with row ids ('idx'), so no sample can be followed"
        )
    size = min(int(num_samples), ids.size)
    return np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))


# ----- figures ------------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plotting the influence log needs matplotlib: pip install matplotlib "
            "(or pip install 'hf-distill[plot]')."
        ) from None
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: works headless and leaves pyplot's global backend alone
    return figure


def _label_step_axis(ax: Any) -> None:
    """Label the x axis as the log's steps, with ticks on whole steps only (a step 2.5 does not exist)."""
    from matplotlib.ticker import MaxNLocator

    left, right = ax.get_xlim()
    if right - left < 2:  # one logged step: widen the axis to show the whole steps around it
        middle = round((left + right) / 2)
        ax.set_xlim(middle - 1, middle + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(STEP_AXIS_LABEL)


def _save(figure: Any, output_png: str | os.PathLike[str]) -> str:
    path = os.fspath(output_png)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_sample_trajectories(
    records: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    sample_ids: Iterable[int],
    output_png: str | os.PathLike[str],
    *,
    correct_threshold: float = 0.5,
) -> str:
    """One subplot per sample: its influence weight at each step it was trained on, marked by correctness.

    A model counts as *correct* on a sample at a step when its probability of the gold label is
    > `correct_threshold` (0.5). With two classes that is exactly "the arg-max prediction is the gold
    label"; with more classes it is "confidently correct" (sufficient for an arg-max hit, not necessary).
    The teacher's probability is taken after its update at that step, the student's before its update.
    Points without probabilities are drawn as grey dots. Returns the path written.
    """
    columns = _as_columns(records)
    chosen = [int(i) for i in sample_ids]
    if not chosen:
        raise ValueError("sample_ids is empty: name at least one dataset row id to plot")
    present = [i for i in chosen if np.any(columns["idx"] == i)]
    if not present:
        known = logged_sample_ids(columns)
        raise ValueError(
            f"none of the samples {chosen} is in the influence log, which has {known.size} samples "
            f"(for example {known[:10].tolist()})"
        )

    figure = _new_figure((8.0, 1.0 + 2.0 * len(chosen)))
    axes = figure.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
    for ax, sample in zip(axes, chosen, strict=True):
        mask = columns["idx"] == sample
        order = np.argsort(columns["step"][mask], kind="stable")
        steps = columns["step"][mask][order]
        weights = columns["influence"][mask][order]
        teacher = columns["teacher_gold_prob"][mask][order]
        student = columns["student_gold_prob"][mask][order]
        ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"sample {sample}\nweight")
        if steps.size == 0:
            ax.text(0.5, 0.5, f"sample {sample} is not in the log", transform=ax.transAxes, ha="center")
            continue
        ax.plot(steps, weights, color="0.45", linewidth=1.0, zorder=1)
        known = np.isfinite(teacher) & np.isfinite(student)
        teacher_ok = teacher > correct_threshold
        student_ok = student > correct_threshold
        for label, t_ok, s_ok, marker, colour in CORRECTNESS_STYLES:
            hit = known & (teacher_ok == t_ok) & (student_ok == s_ok)
            ax.scatter(steps[hit], weights[hit], marker=marker, color=colour, s=42, label=label, zorder=2)
        ax.scatter(
            steps[~known], weights[~known], marker=".", color="0.5", s=30, label="no probability", zorder=2
        )
        ax.set_title(f"sample {sample}: {steps.size} steps", fontsize=9, loc="left")
    _label_step_axis(axes[-1])
    handles, labels = axes[chosen.index(present[0])].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    figure.suptitle(
        f"Influence weight per sample (correct = gold-label probability > {correct_threshold:g})", fontsize=10
    )
    return _save(figure, output_png)


def _auto_bins(num_records: int, num_steps: int) -> int:
    # A sample is weighted only when it is in a training batch (about once an epoch), so a few random
    # samples give a sparse, noisy per-step mean; √n bins balance records per bin against resolution.
    return max(1, min(num_steps, round(math.sqrt(num_records))))


def mean_trend(
    records: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    num_samples: int = 64,
    seed: int = 0,
    num_bins: int | None = None,
) -> dict[str, np.ndarray]:
    """The numbers behind `plot_mean_trend`: per step bin, ``step`` (mean step of its records), ``mean``,
    ``std`` (population) and ``count`` of the weights of `num_samples` random samples, and ``sample_ids``."""
    columns = _as_columns(records)
    sample_ids = random_sample_ids(columns, num_samples, seed)
    mask = np.isin(columns["idx"], sample_ids) & np.isfinite(columns["influence"])
    steps = columns["step"][mask]
    weights = columns["influence"][mask]
    if steps.size == 0:
        raise ValueError("the chosen samples have no finite influence weights in the log")
    distinct = np.unique(steps)
    bins = _auto_bins(steps.size, distinct.size) if num_bins is None else max(1, int(num_bins))
    if bins >= distinct.size:
        bin_of = np.searchsorted(distinct, steps)  # one bin per logged step
        bins = distinct.size
    else:
        edges = np.linspace(distinct[0], distinct[-1] + 1, bins + 1)
        bin_of = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, bins - 1)
    count = np.bincount(bin_of, minlength=bins)
    used = count > 0
    total = np.bincount(bin_of, weights=weights, minlength=bins)
    mean = total / np.maximum(count, 1)
    square = np.bincount(bin_of, weights=(weights - mean[bin_of]) ** 2, minlength=bins)
    return {
        "step": (
            np.bincount(bin_of, weights=steps.astype(np.float64), minlength=bins) / np.maximum(count, 1)
        )[used],
        "mean": mean[used],
        "std": np.sqrt(square / np.maximum(count, 1))[used],
        "count": count[used],
        "sample_ids": sample_ids,
        "raw_step": steps,
        "raw_influence": weights,
    }


def plot_mean_trend(
    records: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    output_png: str | os.PathLike[str],
    num_samples: int = 64,
    seed: int = 0,
    *,
    num_bins: int | None = None,
) -> str:
    """The mean influence weight of `num_samples` random samples over training, with a ±1 std band.

    The samples are drawn (with `seed`) from those in the log. Their records are grouped into `num_bins`
    equal-width bins of training steps (default ≈ √records, at most one per logged step), because each
    sample is weighted only at the steps where it is in the batch. The individual weights are drawn
    faintly behind the mean. Returns the path written.
    """
    trend = mean_trend(records, num_samples=num_samples, seed=seed, num_bins=num_bins)
    figure = _new_figure((8.0, 4.5))
    ax = figure.subplots()
    ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle="--")
    ax.scatter(
        trend["raw_step"], trend["raw_influence"], s=6, color="0.55", alpha=0.3, label="single weights"
    )
    ax.fill_between(
        trend["step"],
        trend["mean"] - trend["std"],
        trend["mean"] + trend["std"],
        color="#0072B2",
        alpha=0.2,
        linewidth=0,
        label="±1 std",
    )
    ax.plot(trend["step"], trend["mean"], color="#0072B2", marker="o", markersize=3, label="mean")
    _label_step_axis(ax)
    ax.set_ylabel("influence weight")
    ax.set_title(
        f"Mean influence weight of {trend['sample_ids'].size} random samples (seed {seed}), "
        f"{trend['step'].size} step bins",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    return _save(figure, output_png)


# ----- command line ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``hf-distill-plot-influence influence.jsonl --output_dir figs --samples 3 17 42 --num_random 64``."""
    parser = argparse.ArgumentParser(
        prog="hf-distill-plot-influence",
        description="Plot the per-sample influence weights logged by InfluenceLoggerCallback.",
    )
    parser.add_argument("log", help="the influence JSONL file (default name: <output_dir>/influence.jsonl)")
    parser.add_argument(
        "--output_dir",
        "--out_dir",  # the name this option had first
        dest="output_dir",
        default=None,
        help="folder for the PNGs (default: the log's folder); --out_dir is accepted too",
    )
    parser.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=None,
        help="dataset row ids whose trajectories to plot (default: 3 random logged samples)",
    )
    parser.add_argument("--num_random", type=int, default=64, help="random samples in the mean-trend figure")
    parser.add_argument(
        "--num_bins", type=int, default=None, help="step bins of the mean trend (default: auto)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample choices")
    parser.add_argument(
        "--correct_threshold",
        type=float,
        default=0.5,
        help="gold-label probability above which a model counts as correct (default 0.5)",
    )
    args = parser.parse_args(argv)
    out_dir = args.output_dir if args.output_dir is not None else os.path.dirname(os.path.abspath(args.log))
    try:
        records = load_influence_log(args.log)
        samples = args.samples
        if samples is None:
            samples = random_sample_ids(records, 3, args.seed).tolist()
        trajectories = plot_sample_trajectories(
            records,
            samples,
            os.path.join(out_dir, TRAJECTORIES_PNG),
            correct_threshold=args.correct_threshold,
        )
        trend = plot_mean_trend(
            records,
            os.path.join(out_dir, MEAN_TREND_PNG),
            num_samples=args.num_random,
            seed=args.seed,
            num_bins=args.num_bins,
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(trajectories)
    print(trend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
