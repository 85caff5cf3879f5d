"""hf_distill.plotting: reading the influence log, the mean trend's numbers, the figures and the command line."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_distill import InfluenceLoggerCallback, plotting
from hf_distill.plotting import (
    MEAN_TREND_PNG,
    TRAJECTORIES_PNG,
    load_influence_log,
    main,
    mean_trend,
    plot_mean_trend,
    plot_sample_trajectories,
    random_sample_ids,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 120  # the figures' resolution: a figure of (w, h) inches is a (w·120) × (h·120) pixel image


def synthetic_records(num_ids=40, num_steps=30, batch=8, step_every=1, seed=0) -> list[dict]:
    """A log as InfluenceLoggerCallback writes it: each step a random batch of row ids, some nulls."""
    rng = np.random.default_rng(seed)
    records = []
    for n in range(num_steps):
        step = n * step_every
        for idx in rng.choice(num_ids, size=batch, replace=False):
            weight = math.sin(step / 5) + float(rng.normal(0, 0.3))
            records.append(
                {
                    "step": step,
                    "idx": int(idx),
                    "influence": None if rng.random() < 0.05 else round(weight, 6),
                    "teacher_gold_prob": round(float(rng.random()), 6),
                    "student_gold_prob": None if rng.random() < 0.05 else round(float(rng.random()), 6),
                }
            )
    return records


def write_log(path, records, tail: str = "") -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


def assert_png(path, width_in: float, height_in: float) -> None:
    with open(path, "rb") as file:
        assert file.read(8) == PNG_MAGIC
    image = imread(path)
    assert image.shape[:2] == (round(height_in * DPI), round(width_in * DPI))
    assert image[..., :3].std() > 0  # something was drawn


# ----- loading ------------------------------------------------------------------------------------------------


def test_load_round_trip_with_nulls_and_an_interrupted_last_line(tmp_path, caplog):
    records = synthetic_records(num_steps=4)
    records[3] = {**records[3], "idx": None, "influence": None, "teacher_gold_prob": None}
    path = write_log(tmp_path / "influence.jsonl", records, tail='{"step":4,"idx":17,"influen')
    with caplog.at_level(logging.WARNING, logger="hf_distill.plotting"):
        columns = load_influence_log(path)
    assert "incomplete last line" in caplog.text

    assert set(columns) == {"step", "idx", "influence", "teacher_gold_prob", "student_gold_prob"}
    assert columns["step"].dtype == np.int64 and columns["idx"].dtype == np.int64
    np.testing.assert_array_equal(columns["step"], [r["step"] for r in records])
    np.testing.assert_array_equal(columns["idx"], [-1 if r["idx"] is None else r["idx"] for r in records])
    for name in ("influence", "teacher_gold_prob", "student_gold_prob"):
        assert columns[name].dtype == np.float64
        expected = [math.nan if r[name] is None else r[name] for r in records]
        np.testing.assert_array_equal(columns[name], expected)  # NaN where the record has null


def test_a_malformed_line_before_the_last_is_an_error(tmp_path):
    records = synthetic_records(num_steps=1)
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2][:20]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3 is not an influence record"):
        load_influence_log(tmp_path / "bad.jsonl")
    (tmp_path / "no_step.jsonl").write_text('{"idx": 1, "influence": 0.5}\n' + "\n".join(lines[3:]) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_influence_log(tmp_path / "no_step.jsonl")


def test_load_reads_what_the_callback_writes(tmp_path):
    """The file written by InfluenceLoggerCallback (driven by hand) reads back at float32 precision."""
    path = tmp_path / "influence.jsonl"
    callback = InfluenceLoggerCallback(output_file=path)
    trainer = SimpleNamespace(latest_influence=None)
    callback.bind_trainer(trainer)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    weights = torch.tensor([[1 / 3, -2e-7, float("nan")], [0.1, 1e6, -0.5]])
    for step in range(2):
        trainer.latest_influence = {
            "step": step,
            "idx": torch.tensor([5, 9, 2]) + step,
            "influence": weights[step],
            "teacher_gold_prob": torch.tensor([0.9, 0.1, 0.5]),
            "student_gold_prob": None,
        }
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)

    columns = load_influence_log(path)
    np.testing.assert_array_equal(columns["step"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(columns["idx"], [5, 9, 2, 6, 10, 3])
    np.testing.assert_array_equal(columns["influence"].astype(np.float32), weights.reshape(-1).numpy())
    np.testing.assert_array_equal(
        columns["teacher_gold_prob"].astype(np.float32), np.float32([0.9, 0.1, 0.5] * 2)
    )
    assert np.isnan(columns["student_gold_prob"]).all()


# ----- the mean trend's numbers -------------------------------------------------------------------------------


def slow_trend(records: list[dict], chosen, bin_of) -> dict[str, list]:
    """Per bin (in order): the mean step, the mean and population std of the finite weights, and the count."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        if r["idx"] in chosen and r["influence"] is not None:
            groups.setdefault(bin_of(r["step"]), []).append(r)
    out: dict[str, list] = {"step": [], "mean": [], "std": [], "count": []}
    for b in sorted(groups):
        weights = [r["influence"] for r in groups[b]]
        out["step"].append(statistics.fmean(r["step"] for r in groups[b]))
        out["mean"].append(statistics.fmean(weights))
        out["std"].append(statistics.pstdev(weights))
        out["count"].append(len(weights))
    return out


def assert_trend(trend, expected) -> None:
    for name in ("step", "mean", "std"):
        np.testing.assert_allclose(trend[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(trend["count"], expected["count"])


@pytest.mark.parametrize("as_columns", [True, False])
def test_mean_trend_matches_a_slow_computation(tmp_path, as_columns):
    records = synthetic_records(num_ids=40, num_steps=30)
    source = load_influence_log(write_log(tmp_path / "log.jsonl", records)) if as_columns else records

    trend = mean_trend(source, num_samples=10, seed=3, num_bins=5)
    chosen = set(trend["sample_ids"].tolist())
    assert len(chosen) == 10 and chosen <= {r["idx"] for r in records}
    assert list(trend["sample_ids"]) == sorted(chosen)
    # 5 equal-width bins over steps 0..29: edges 0, 6, 12, 18, 24, 30.
    assert_trend(trend, slow_trend(records, chosen, lambda step: step // 6))
    # The individual weights behind the mean are exactly the chosen samples' finite ones.
    finite = [r for r in records if r["idx"] in chosen and r["influence"] is not None]
    assert sorted(zip(trend["raw_step"].tolist(), trend["raw_influence"].tolist(), strict=True)) == sorted(
        (r["step"], r["influence"]) for r in finite
    )

    # More bins than logged steps: one bin per logged step.
    per_step = mean_trend(source, num_samples=10, seed=3, num_bins=1000)
    assert_trend(per_step, slow_trend(records, chosen, lambda step: step))


def test_mean_trend_bins_and_sample_choice(tmp_path):
    records = synthetic_records(num_ids=40, num_steps=60, step_every=3, seed=1)
    # Steps logged every 3rd step, one bin per logged step (steps 0, 3, ..., 177).
    trend = mean_trend(records, num_samples=8, seed=0, num_bins=60)
    chosen = set(trend["sample_ids"].tolist())
    assert_trend(trend, slow_trend(records, chosen, lambda step: step))

    # Default bins: about √records of them, never more than the logged steps, together holding every record.
    auto = mean_trend(records, num_samples=8, seed=0)
    count = int(auto["count"].sum())
    assert count == len(auto["raw_influence"]) == sum(slow_trend(records, chosen, lambda s: s)["count"])
    assert len(auto["mean"]) <= min(60, round(math.sqrt(count)))
    assert len(auto["mean"]) >= 0.8 * round(math.sqrt(count))  # few bins are empty
    np.testing.assert_allclose((auto["mean"] * auto["count"]).sum() / count, auto["raw_influence"].mean())
    assert np.all(np.diff(auto["step"]) > 0)

    # The random choice: reproducible with a seed, another seed another choice, capped at what exists.
    again = mean_trend(records, num_samples=8, seed=0)["sample_ids"]
    np.testing.assert_array_equal(again, auto["sample_ids"])
    assert set(mean_trend(records, num_samples=8, seed=1)["sample_ids"].tolist()) != chosen
    np.testing.assert_array_equal(mean_trend(records, num_samples=500)["sample_ids"], np.arange(40))
    np.testing.assert_array_equal(random_sample_ids(records, 500), np.arange(40))


def test_mean_trend_errors():
    without_ids = [{**r, "idx": None} for r in synthetic_records(num_steps=2)]
    with pytest.raises(ValueError, match="no records with row ids"):
        mean_trend(without_ids)
    no_weights = [{**r, "influence": None} for r in synthetic_records(num_steps=2)]
    with pytest.raises(ValueError, match="no finite influence weights"):
        mean_trend(no_weights)
    with pytest.raises(ValueError, match="lack the columns"):
        mean_trend({"step": np.arange(3), "idx": np.arange(3)})


# ----- figures ------------------------------------------------------------------------------------------------


def test_figures_are_png_files_of_the_expected_size(tmp_path):
    records = synthetic_records()
    columns = load_influence_log(write_log(tmp_path / "log.jsonl", records))
    ids = [records[0]["idx"], records[1]["idx"], 777]  # 777 is not in the log: an empty panel, no error
    path = plot_sample_trajectories(columns, ids, tmp_path / "figs" / "trajectories.png")
    assert path == str(tmp_path / "figs" / "trajectories.png")
    assert_png(path, 8.0, 1.0 + 2.0 * len(ids))

    path = plot_mean_trend(records, tmp_path / "trend.png", num_samples=16, seed=2)
    assert path == str(tmp_path / "trend.png")
    assert_png(path, 8.0, 4.5)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_trajectories_legend_title_and_panels_do_not_overlap(tmp_path, monkeypatch, num_samples):
    figures = []
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    records = synthetic_records()
    plot_sample_trajectories(records, [r["idx"] for r in records[:num_samples]], tmp_path / "t.png")
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    boxes = {
        "title": figure._suptitle.get_window_extent(renderer),  # no public getter for the Text itself
        "legend": legend.get_window_extent(renderer),
        **{f"panel {n}": ax.get_tightbbox(renderer) for n, ax in enumerate(figure.axes)},
    }
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not boxes[a].overlaps(boxes[b]), f"{a} overlaps {b}"


@pytest.mark.parametrize("num_steps", [3, 40])
def test_both_figures_have_whole_step_ticks_and_say_what_a_step_is(tmp_path, monkeypatch, num_steps):
    figures = []
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    records = synthetic_records(num_steps=num_steps)  # 3 steps: the default locator would tick 0.25, 0.5, ...
    plot_sample_trajectories(records, [records[0]["idx"]], tmp_path / "t.png")
    plot_mean_trend(records, tmp_path / "m.png", num_samples=8)
    for figure in figures:
        figure.canvas.draw()
        ax = figure.axes[-1]
        left, right = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if left <= t <= right]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        # The log's `step`: global_step before the step, from 0 (the trainer's own logs count from 1).
        assert ax.get_xlabel() == "optimisation step (counted from 0, as in the influence log)"


def test_figures_refuse_samples_not_in_the_log(tmp_path):
    records = synthetic_records(num_steps=3)
    with pytest.raises(ValueError, match=r"none of the samples \[1000, 1001\] is in the influence log"):
        plot_sample_trajectories(records, [1000, 1001], tmp_path / "t.png")
    with pytest.raises(ValueError, match="sample_ids is empty"):
        plot_sample_trajectories(records, [], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


# ----- command line -------------------------------------------------------------------------------------------


def test_cli_writes_both_figures(tmp_path, capsys):
    records = synthetic_records()
    (tmp_path / "run").mkdir()
    log = write_log(tmp_path / "run" / "influence.jsonl", records)
    out_dir = tmp_path / "figs"
    code = main(
        [log, "--output_dir", str(out_dir), "--samples", "3", "17", "--num_random", "12", "--num_bins", "7"]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out_dir / TRAJECTORIES_PNG), str(out_dir / MEAN_TREND_PNG)]
    assert_png(out_dir / TRAJECTORIES_PNG, 8.0, 5.0)
    assert_png(out_dir / MEAN_TREND_PNG, 8.0, 4.5)

    # --out_dir, the option's first name, still works.
    assert main([log, "--out_dir", str(tmp_path / "old"), "--num_random", "12"]) == 0
    assert (tmp_path / "old" / MEAN_TREND_PNG).is_file()

    # Defaults: three random samples, the figures beside the log.
    assert main([log]) == 0
    assert_png(tmp_path / "run" / TRAJECTORIES_PNG, 8.0, 7.0)
    assert_png(tmp_path / "run" / MEAN_TREND_PNG, 8.0, 4.5)


def test_cli_errors_are_usage_errors(tmp_path, capsys):
    log = write_log(tmp_path / "influence.jsonl", synthetic_records(num_steps=2))
    with pytest.raises(SystemExit) as exit_info:
        main([log, "--samples", "1000"])
    assert exit_info.value.code == 2 and "none of the samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2 and "missing.jsonl" in capsys.readouterr().err


def test_console_script_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-distill-plot-influence"]
    assert script.value == "hf_distill.plotting:main"
    executable = shutil.which("hf-distill-plot-influence")
    assert executable, "the console script is not on PATH: reinstall with pip install -e ."
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: hf-distill-plot-influence" in result.stdout and "--num_random" in result.stdout


def test_the_command_does_not_load_torch_or_transformers():
    """The command (its --help included) imports the plotting module only: no torch, no transformers."""
    code = (
        "import sys, hf_distill.plotting, hf_distill;"
        "heavy = sorted({'torch', 'transformers', 'matplotlib'} & set(sys.modules)); print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
