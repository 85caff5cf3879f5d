"""InfluenceLoggerCallback: real tiny LGTM runs, and the callback driven by hand for the edge cases."""

from __future__ import annotations

import gc
import json
import logging
import logging.handlers
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from testing_utils import keyword_dataset, tiny_classifier, tiny_run_args
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_distill import InfluenceLoggerCallback, LGTMTrainer, LGTMTrainingArguments

FIELDS = ("step", "idx", "influence", "teacher_gold_prob", "student_gold_prob")
LOGGER = "hf_distill.callbacks"


# ----- helpers --------------------------------------------------------------------------------------------------


def make_args(tmp_path, **overrides) -> LGTMTrainingArguments:
    defaults = dict(
        learning_rate=1e-3,
        teacher_learning_rate=1e-3,
        quiz_split=0.25,
        temperature=1.0,
        max_grad_norm=0,
    )
    return tiny_run_args(LGTMTrainingArguments, tmp_path, **{**defaults, **overrides})


def make_trainer(tmp_path, tokenizer, callbacks, n=48, **overrides) -> LGTMTrainer:
    """48 rows, a quarter held out as quiz: 36 training rows, batches 8, 8, 8, 8, 4 (five steps an epoch)."""
    return LGTMTrainer(
        model=tiny_classifier(1, seed=2),
        teacher_model=tiny_classifier(2, seed=1),
        args=make_args(tmp_path, **overrides),
        train_dataset=keyword_dataset(n),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class Capture(TrainerCallback):
    """Copies ``trainer.latest_influence`` at the end of every step (``trainer`` is set once it is built)."""

    def __init__(self) -> None:
        self.trainer = None
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        latest = self.trainer.latest_influence
        self.steps.append({k: v.clone() if torch.is_tensor(v) else v for k, v in latest.items()})


def read_records(path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def by_step(records: list[dict]) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for record in records:
        steps.setdefault(record["step"], []).append(record)
    return steps


def hand_args(tmp_path, report_to=()) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=list(report_to), use_cpu=True, disable_tqdm=True
    )


class Driver:
    """Runs the callback's events by hand against a stand-in trainer that only has ``latest_influence``."""

    def __init__(self, callback, args, global_step=0, process_zero=True, trainer=None) -> None:
        self.callback = callback
        self.args = args
        self.trainer = SimpleNamespace(latest_influence=None) if trainer is None else trainer
        callback.bind_trainer(self.trainer)
        self.state = TrainerState(global_step=global_step, is_world_process_zero=process_zero)
        self.control = TrainerControl()

    def begin(self) -> Driver:
        self.callback.on_train_begin(self.args, self.state, self.control)
        return self

    def step(self, record: dict) -> None:
        self.trainer.latest_influence = record
        self.state.global_step = record["step"] + 1
        self.callback.on_step_end(self.args, self.state, self.control)

    def end(self) -> None:
        self.callback.on_train_end(self.args, self.state, self.control)


def fake_influence(step: int, ids, values=None) -> dict:
    """A ``latest_influence`` record: weights that differ per step and per sample, fixed probabilities."""
    n = len(ids)
    if values is None:
        values = torch.linspace(-1.0, 1.0, n) * (step + 1) / 7
    return {
        "step": step,
        "idx": torch.tensor(ids),
        "influence": torch.as_tensor(values, dtype=torch.float32),
        "teacher_gold_prob": torch.full((n,), 0.25),
        "student_gold_prob": torch.full((n,), 0.75),
    }


def histograms(log_dir) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.HISTOGRAMS: 0, event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    return accumulator


# ----- one real LGTM run, with several loggers attached ---------------------------------------------------------

BOUND = 2000  # bytes: about two steps of 8 records of ~105 bytes


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """One epoch (5 steps) of a tiny LGTMTrainer with TensorBoard on and four influence loggers:

    the default one (every sample, <output_dir>/influence.jsonl), one with sample_ids and every_n_steps=2,
    one with a size bound, and one added after construction; plus a checkpoint at step 3 to resume from.
    """
    tmp_path = tmp_path_factory.mktemp("lgtm")
    capture = Capture()
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        [InfluenceLoggerCallback(), capture],
        report_to=["tensorboard"],
        save_strategy="steps",
        save_steps=3,
    )
    capture.trainer = trainer
    # A file left by an earlier run in the same output_dir: a fresh run starts it anew.
    default_file = Path(trainer.args.output_dir) / "influence.jsonl"
    default_file.parent.mkdir(parents=True, exist_ok=True)
    default_file.write_text(
        '{"step":0,"idx":999,"influence":1,"teacher_gold_prob":null,"student_gold_prob":null}\n'
    )

    train_ids, quiz_ids = trainer.train_dataset["idx"], trainer.quiz_dataset["idx"]
    chosen = [train_ids[0], train_ids[5], train_ids[11], train_ids[20], quiz_ids[0], 10_000]
    late = {
        "chosen": InfluenceLoggerCallback(
            output_file=tmp_path / "logs" / "chosen.jsonl",
            sample_ids=chosen,
            every_n_steps=2,
            tensorboard_histograms=False,
        ),
        "bounded": InfluenceLoggerCallback(
            output_file=tmp_path / "bounded.jsonl", max_file_bytes=BOUND, tensorboard_histograms=False
        ),
    }
    for callback in late.values():  # a callback added after construction is bound by hand
        trainer.add_callback(callback)
        callback.bind_trainer(trainer)
    handler = logging.handlers.BufferingHandler(1000)
    logging.getLogger(LOGGER).addHandler(handler)
    try:
        trainer.train()
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)
    return SimpleNamespace(
        trainer=trainer,
        capture=capture,
        tmp_path=tmp_path,
        default_file=default_file,
        chosen=chosen,
        warnings=[r.getMessage() for r in handler.buffer if r.levelno >= logging.WARNING],
    )


def test_run_records_every_trained_sample_of_every_step(run):
    trainer, capture = run.trainer, run.capture
    assert trainer.state.global_step == 5 and len(capture.steps) == 5
    records = read_records(run.default_file)
    assert all(tuple(r) == FIELDS for r in records)
    steps = by_step(records)
    assert sorted(steps) == [0, 1, 2, 3, 4]
    train_ids = set(trainer.train_dataset["idx"])
    quiz_ids = set(trainer.quiz_dataset["idx"])
    assert len(train_ids) == 36 and len(quiz_ids) == 12
    seen = []
    for step, expected in enumerate(capture.steps):
        rows = steps[step]
        assert expected["step"] == step
        # One record per trained sample, in batch order; the last batch of the epoch has 4 rows.
        assert [r["idx"] for r in rows] == expected["idx"].tolist()
        assert len(rows) == (8 if step < 4 else 4)
        # The weights are the trainer's, at float32 precision (the file's shortest float32 reprs).
        np.testing.assert_array_equal(
            np.array([r["influence"] for r in rows], dtype=np.float32), expected["influence"].numpy()
        )
        for name in ("teacher_gold_prob", "student_gold_prob"):
            probs = np.array([r[name] for r in rows], dtype=np.float32)
            np.testing.assert_array_equal(probs, expected[name].numpy())
            assert np.all((probs >= 0) & (probs <= 1))
        seen += [r["idx"] for r in rows]
    # One epoch: every training row exactly once, no quiz row, and not the stale record of row 999.
    assert sorted(seen) == sorted(train_ids) and not set(seen) & quiz_ids


def test_run_logs_the_influence_summary_and_the_gradient_split(run):
    logs = [log for log in run.trainer.state.log_history if "loss" in log]
    assert len(logs) == 5  # logging_steps=1
    for log, expected in zip(logs, run.capture.steps, strict=True):
        w = expected["influence"].double()
        for key in (
            "influence_mean",
            "influence_std",
            "influence_min",
            "influence_max",
            "influence_frac_negative",
            "influence_scale",
            "quiz_loss",
            "teacher_grad_norm_aux",
            "teacher_grad_norm_influence",
        ):
            assert key in log, key
        # Logged values are rounded to 6 decimals.
        assert log["influence_mean"] == pytest.approx(w.mean().item(), abs=1e-6)
        assert log["influence_std"] == pytest.approx(w.std().item(), abs=1e-6)
        assert log["influence_min"] == pytest.approx(w.min().item(), abs=1e-6)
        assert log["influence_max"] == pytest.approx(w.max().item(), abs=1e-6)
        assert log["influence_frac_negative"] == pytest.approx((w < 0).double().mean().item(), abs=1e-6)
        assert log["influence_scale"] == pytest.approx(log["teacher_learning_rate"])  # λ defaults to it
        assert log["quiz_loss"] > 0
        assert log["teacher_grad_norm_aux"] > 0 and log["teacher_grad_norm_influence"] >= 0


def test_sample_ids_and_every_n_steps_select_the_records(run):
    records = read_records(run.tmp_path / "logs" / "chosen.jsonl")
    expected = [
        (step["step"], i)
        for step in run.capture.steps
        if step["step"] % 2 == 0
        for i in step["idx"].tolist()
        if i in run.chosen
    ]
    assert expected and [(r["step"], r["idx"]) for r in records] == expected
    assert {r["step"] for r in records} <= {0, 2, 4}
    assert {r["idx"] for r in records} <= set(run.chosen[:4])  # never the quiz row or the unknown id


def test_file_size_bound_keeps_whole_steps_and_training_finishes(run):
    assert run.trainer.state.global_step == 5
    everything = run.default_file.read_bytes().splitlines(keepends=True)
    step_sizes: dict[int, int] = {}
    for line in everything:
        step = json.loads(line)["step"]
        step_sizes[step] = step_sizes.get(step, 0) + len(line)
    # The bounded file is the longest prefix of whole steps that fits.
    kept, total = 0, 0
    while kept in step_sizes and total + step_sizes[kept] <= BOUND:
        total += step_sizes[kept]
        kept += 1
    assert 1 <= kept < 5
    bounded = (run.tmp_path / "bounded.jsonl").read_bytes()
    assert len(bounded) == total <= BOUND
    assert bounded == b"".join(everything[: 8 * kept])
    assert sum("reached its size bound" in w for w in run.warnings) == 1  # one warning, not one per step


def test_tensorboard_histograms_beside_the_trainer_scalars(run):
    tb_dirs = {os.path.dirname(p) for p in map(str, Path(run.trainer.args.output_dir).rglob("events.out.*"))}
    assert len(tb_dirs) == 1  # one TensorBoard run: the histograms sit with the trainer's scalars
    accumulator = histograms(tb_dirs.pop())
    assert "influence/weights" in accumulator.Tags()["histograms"]
    assert "train/influence_mean" in accumulator.Tags()["scalars"]
    events = accumulator.Histograms("influence/weights")
    assert [e.step for e in events] == [0, 1, 2, 3, 4]  # only the default logger writes histograms here
    for event, expected in zip(events, run.capture.steps, strict=True):
        w = expected["influence"].numpy()
        assert event.histogram_value.num == w.size
        assert event.histogram_value.min == pytest.approx(float(w.min()), rel=1e-6)
        assert event.histogram_value.max == pytest.approx(float(w.max()), rel=1e-6)
        assert event.histogram_value.sum == pytest.approx(float(w.sum()), rel=1e-4, abs=1e-9)


def test_resumed_run_replaces_the_redone_steps(run, tokenizer, tmp_path):
    first = read_records(run.default_file)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "influence.jsonl").write_bytes(run.default_file.read_bytes())
    capture = Capture()
    trainer = make_trainer(
        tmp_path, tokenizer, [InfluenceLoggerCallback(), capture], output_dir=str(resumed_dir)
    )
    capture.trainer = trainer
    trainer.train(resume_from_checkpoint=str(Path(run.trainer.args.output_dir) / "checkpoint-3"))
    assert [s["step"] for s in capture.steps] == [3, 4]
    records = read_records(resumed_dir / "influence.jsonl")
    steps = by_step(records)
    assert sorted(steps) == [0, 1, 2, 3, 4]
    assert records[:24] == first[:24]  # steps 0, 1 and 2 kept from the first run
    for expected in capture.steps:  # steps 3 and 4 once each, from the resumed run
        assert [r["idx"] for r in steps[expected["step"]]] == expected["idx"].tolist()
        np.testing.assert_array_equal(
            np.array([r["influence"] for r in steps[expected["step"]]], dtype=np.float32),
            expected["influence"].numpy(),
        )


# ----- the callback driven by hand ------------------------------------------------------------------------------


def test_histograms_follow_report_to_and_the_switch(tmp_path):
    for report_to, switch, written in (
        (["tensorboard"], True, True),
        (["tensorboard"], False, False),
        ([], True, False),
    ):
        log_dir = tmp_path / f"tb-{report_to}-{switch}"
        callback = InfluenceLoggerCallback(
            output_file=tmp_path / "influence.jsonl",
            tensorboard_histograms=switch,
            tensorboard_log_dir=log_dir,
        )
        driver = Driver(callback, hand_args(tmp_path, report_to)).begin()
        for step in range(4):
            # A non-finite weight is left out of the histogram (and written as null to the file).
            driver.step(fake_influence(step, [1, 2, 3], [0.5, float("nan"), -0.25 * step]))
        driver.end()
        assert log_dir.exists() == written
        if written:
            events = histograms(log_dir).Histograms("influence/weights")
            assert [e.step for e in events] == [0, 1, 2, 3]
            assert [e.histogram_value.num for e in events] == [2, 2, 2, 2]
            assert events[3].histogram_value.min == pytest.approx(-0.75)
        assert [r["influence"] for r in read_records(tmp_path / "influence.jsonl")[-3:]] == [0.5, None, -0.75]


def test_resume_keeps_only_the_steps_before_the_checkpoint(tmp_path):
    path = tmp_path / "influence.jsonl"
    lines = [
        json.dumps(
            {"step": s, "idx": i, "influence": s / 10, "teacher_gold_prob": 0.5, "student_gold_prob": None}
        )
        + "\n"
        for s in range(10)
        for i in (s, s + 100)
    ]
    path.write_text("".join(lines) + '{"step":10,"idx":3,"influe')  # a crash mid-write
    driver = Driver(InfluenceLoggerCallback(output_file=path), hand_args(tmp_path), global_step=5).begin()
    assert path.read_text() == "".join(lines[:10])  # steps 0..4, byte for byte
    assert not Path(f"{path}.tmp").exists()
    driver.step(fake_influence(5, [7, 8]))
    driver.end()
    records = read_records(path)
    assert [r["step"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [r["idx"] for r in records[-2:]] == [7, 8]

    # Resuming where the file already ends changes nothing; a fresh run (step 0) empties it.
    before = path.read_bytes()
    Driver(InfluenceLoggerCallback(output_file=path), hand_args(tmp_path), global_step=6).begin().end()
    assert path.read_bytes() == before
    Driver(InfluenceLoggerCallback(output_file=path), hand_args(tmp_path), global_step=0).begin().end()
    assert path.read_bytes() == b""


def test_size_bound_stops_for_the_rest_of_the_run_and_resets_next_run(tmp_path, caplog):
    path = tmp_path / "out" / "influence.jsonl"  # the default file name, in args.output_dir
    args = hand_args(tmp_path)
    one_step = len(
        json.dumps(
            {
                "step": 0,
                "idx": 1,
                "influence": -0.14285715,
                "teacher_gold_prob": 0.25,
                "student_gold_prob": 0.75,
            },
            separators=(",", ":"),
        )
    )
    callback = InfluenceLoggerCallback(max_file_bytes=3 * (one_step + 1) + 10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        driver = Driver(callback, args).begin()
        driver.step(fake_influence(0, [1, 2]))  # 2 records: fits
        driver.step(fake_influence(1, [3, 4]))  # 2 more would pass the bound: the whole step is dropped
        driver.step(fake_influence(2, [5]))  # would fit, but the file is closed for this run
        driver.end()
    assert [(r["step"], r["idx"]) for r in read_records(path)] == [(0, 1), (0, 2)]
    assert caplog.text.count("reached its size bound") == 1

    # The next train() call (here: resumed at step 1) writes again.
    driver = Driver(callback, args, global_step=1).begin()
    driver.step(fake_influence(1, [5]))
    driver.end()
    assert [(r["step"], r["idx"]) for r in read_records(path)] == [(0, 1), (0, 2), (1, 5)]


def test_a_step_whose_teacher_update_was_skipped_is_not_recorded_twice(tmp_path):
    callback = InfluenceLoggerCallback(output_file=tmp_path / "influence.jsonl")
    driver = Driver(callback, hand_args(tmp_path)).begin()
    record = fake_influence(0, [1, 2])
    driver.step(record)
    driver.state.global_step += 1
    callback.on_step_end(driver.args, driver.state, driver.control)  # latest_influence still step 0
    driver.step(fake_influence(2, [3]))
    driver.end()
    assert [(r["step"], r["idx"]) for r in read_records(tmp_path / "influence.jsonl")] == [
        (0, 1),
        (0, 2),
        (2, 3),
    ]


def test_only_world_process_zero_writes(tmp_path):
    path = tmp_path / "influence.jsonl"
    path.write_text('{"step":0,"idx":1,"influence":0.5,"teacher_gold_prob":null,"student_gold_prob":null}\n')
    before = path.read_bytes()
    log_dir = tmp_path / "tb"
    callback = InfluenceLoggerCallback(output_file=path, tensorboard_log_dir=log_dir)
    driver = Driver(callback, hand_args(tmp_path, ["tensorboard"]), process_zero=False).begin()
    for step in range(3):
        driver.step(fake_influence(step, [1, 2]))
    driver.end()
    assert path.read_bytes() == before  # not even emptied as a fresh run's file would be
    assert not log_dir.exists()


def test_records_without_row_ids_or_probabilities(tmp_path, caplog):
    path = tmp_path / "influence.jsonl"
    driver = Driver(InfluenceLoggerCallback(output_file=path), hand_args(tmp_path)).begin()
    record = fake_influence(0, [0, 0], [float("inf"), 1e-3])
    record.update(idx=None, teacher_gold_prob=None)
    driver.step(record)
    driver.end()
    assert read_records(path) == [
        {"step": 0, "idx": None, "influence": None, "teacher_gold_prob": None, "student_gold_prob": 0.75},
        {"step": 0, "idx": None, "influence": 0.001, "teacher_gold_prob": None, "student_gold_prob": 0.75},
    ]

    # sample_ids cannot select anything without row ids: a warning, and no records.
    path.unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        driver = Driver(
            InfluenceLoggerCallback(output_file=path, sample_ids=[0]), hand_args(tmp_path)
        ).begin()
        for step in range(2):
            driver.step({**fake_influence(step, [0, 1]), "idx": None})
        driver.end()
    assert caplog.text.count("carry no row ids") == 1
    assert not path.exists() or path.read_bytes() == b""


def test_mismatched_lengths_are_errors(tmp_path):
    driver = Driver(InfluenceLoggerCallback(output_file=tmp_path / "i.jsonl"), hand_args(tmp_path)).begin()
    with pytest.raises(ValueError, match="row ids"):
        driver.step({**fake_influence(0, [1, 2, 3]), "idx": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match="teacher_gold_prob"):
        driver.step({**fake_influence(1, [1, 2, 3]), "teacher_gold_prob": torch.ones(2)})


def test_unbound_or_influence_free_trainers_record_nothing(tmp_path, caplog):
    path = tmp_path / "influence.jsonl"
    args = hand_args(tmp_path)
    state, control = TrainerState(), TrainerControl()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        callback = InfluenceLoggerCallback(output_file=path)
        callback.on_train_begin(args, state, control)
        for _ in range(2):
            callback.on_step_end(args, state, control)
        driver = Driver(InfluenceLoggerCallback(output_file=path), args, trainer=SimpleNamespace()).begin()
        for _ in range(2):
            driver.callback.on_step_end(args, driver.state, control)
    assert caplog.text.count("not bound to a trainer") == 1
    assert caplog.text.count("exposes no latest_influence") == 1
    assert not path.exists()


def test_the_callback_does_not_keep_its_trainer_alive(tmp_path):
    class Trainer:
        latest_influence = None

    trainer = Trainer()
    callback = InfluenceLoggerCallback(output_file=tmp_path / "i.jsonl")
    callback.bind_trainer(trainer)
    assert callback.trainer is trainer
    del trainer
    gc.collect()
    assert callback.trainer is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
        ({"every_n_steps": -3}, "every_n_steps must be >= 1"),
        ({"max_file_bytes": 0}, "max_file_bytes must be positive"),
        ({"max_file_bytes": -1}, "max_file_bytes must be positive"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfluenceLoggerCallback(**kwargs)


def test_a_callback_given_its_trainer_records_its_influence(tmp_path):
    trainer = SimpleNamespace(latest_influence=None)
    path = tmp_path / "influence.jsonl"
    callback = InfluenceLoggerCallback(output_file=path, tensorboard_histograms=False, trainer=trainer)
    args, state, control = hand_args(tmp_path), TrainerState(is_world_process_zero=True), TrainerControl()
    callback.on_train_begin(args, state, control)
    trainer.latest_influence = fake_influence(0, [3, 4])
    callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    assert [(r["step"], r["idx"]) for r in read_records(path)] == [(0, 3), (0, 4)]
