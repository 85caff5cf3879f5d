"""Saving and pushing the student (and a trained teacher) with every trainer, with no HTTP.

`huggingface_hub.HfApi.create_repo` and `HfApi.upload_folder` (what `Trainer`'s Hub code calls) are
replaced by fakes that copy the folder being uploaded; `HF_HUB_OFFLINE=1` (conftest) makes any other
Hub request fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import save_file
from testing_utils import keyword_dataset, tiny_classifier, tiny_run_args
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    InfluenceLoggerCallback,
    LGTMTrainer,
    LGTMTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
    glue_compute_metrics,
)
from hf_distill.publishing.hub import HUB_STAGING_DIR, teacher_source
from hf_distill.publishing.model_card import usage_lines
from hf_distill.publishing.model_sources import LOCAL, TeacherInfo
from hf_distill.teacher.loading import load_teacher

STUDENT_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_args.bin",  # Trainer writes it beside every saved model: the arguments, no weights or states
}
HUB_ID = "user/tiny-student"


class FakeHub:
    """Stands in for the Hub: records every upload with a copy of the uploaded folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'user/' + repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, run_as_future=False, **kwargs):
        # The files the real upload_folder would send: everything under folder_path, filtered by the patterns.
        everything = [
            p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()
        ]
        files = set(
            filter_repo_objects(
                everything,
                allow_patterns=kwargs.get("allow_patterns"),
                ignore_patterns=kwargs.get("ignore_patterns"),
            )
        )
        copy = self.root / f"upload-{len(self.uploads)}"
        for name in files:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / name, copy / name)
        self.uploads.append(
            {"repo_id": repo_id, "folder_path": str(folder_path), "copy": copy, "files": files}
        )
        self.uploads[-1].update(kwargs)
        if run_as_future:
            future = Future()
            future.set_result("commit")
            return future
        return "commit"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


ARGS = {
    "kd": DistillationTrainingArguments,
    "online": OnlineDistillTrainingArguments,
    "lgtm": LGTMTrainingArguments,
}
TRAINERS = {"kd": DistillationTrainer, "online": OnlineDistillTrainer, "lgtm": LGTMTrainer}
if importlib.util.find_spec("hf_distill.trainers.meta_trainer") is not None:
    try:
        from hf_distill import MetaDistillTrainer, MetaDistillTrainingArguments

        ARGS["meta"], TRAINERS["meta"] = MetaDistillTrainingArguments, MetaDistillTrainer
    except ImportError:  # the meta trainer is not ready in this checkout
        pass


def make_trainer(method: str, tmp_path: Path, tokenizer, teacher=None, callbacks=None, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        hub_model_id=HUB_ID,
    )
    if method != "kd":
        defaults["teacher_learning_rate"] = 1e-3
    if method in ("lgtm", "meta"):
        defaults["quiz_split"] = 0.25
    student = tiny_classifier(1, seed=2)
    student.config._name_or_path = "org/tiny-base"  # as if loaded from the Hub
    return TRAINERS[method](
        model=student,
        teacher_model=teacher if teacher is not None else tiny_classifier(2, seed=1),
        args=ARGS[method](**{**defaults, **overrides}),
        train_dataset=keyword_dataset(40),
        eval_dataset=keyword_dataset(16, seed=3),
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics("sst2"),
        callbacks=callbacks,
    )


def batch_logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["w9 w7 w12", "w30 w31"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def card_data(folder: Path) -> dict:
    return ModelCard.load(folder / "README.md").data.to_dict()


def write_run_leftovers(output_dir: Path) -> None:
    """What else a run leaves in output_dir: an influence log, TensorBoard runs, a saved teacher."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "influence.jsonl").write_text('{"step": 0}\n')
    (output_dir / "runs" / "Jan01").mkdir(parents=True)
    (output_dir / "runs" / "Jan01" / "events.out.tfevents.1").write_bytes(b"x")
    tiny_classifier(2, seed=1).save_pretrained(output_dir / "teacher")


@pytest.mark.parametrize("method", list(TRAINERS))
def test_push_to_hub_uploads_the_student_alone_with_its_card(method, tmp_path, tokenizer, hub):
    trainer = make_trainer(method, tmp_path, tokenizer)
    trainer.train()
    output_dir = Path(trainer.args.output_dir)
    write_run_leftovers(output_dir)

    trainer.push_to_hub()

    assert hub.repos == [HUB_ID] and len(hub.uploads) == 1
    upload = hub.uploads[0]
    assert upload["repo_id"] == HUB_ID
    assert upload["files"] == STUDENT_FILES  # no teacher, influence log, runs/, optimizer or checkpoint
    data = card_data(upload["copy"])
    assert data["base_model"] == "org/tiny-base"
    assert data["tags"][:3] == ["knowledge-distillation", method, "hf-distill"]
    assert data["library_name"] == "transformers"
    distillation = data["distillation"]
    assert distillation["method"] == method
    assert distillation["teachers"] == [{"id": "local", "revision": None, "parameters": 22434}]
    assert distillation["student_parameters"] == 13890 and distillation["compression_ratio"] == 1.62
    assert (
        distillation["temperature"] == trainer.args.temperature
        and distillation["alpha"] == trainer.args.alpha
    )
    text = ModelCard.load(upload["copy"] / "README.md").text
    assert "| accuracy |" in text and "```bibtex" in text
    if method == "kd":
        assert "teacher_metrics" not in distillation and "teacher_learning_rate" not in distillation
    else:
        assert set(distillation["teacher_metrics"]) == {"loss", "accuracy"}
        assert distillation["teacher_learning_rate"] == 1e-3
    if method in ("online", "lgtm"):  # the meta trainer's teacher loss has no alpha_t
        assert distillation["teacher_alpha"] == trainer.args.teacher_alpha
    if method in ("lgtm", "meta"):
        assert distillation["quiz_split"] == 0.25
    if method == "lgtm":
        assert distillation["influence_mode"] == "finite_difference"
        assert distillation["influence"]["logged_steps"] == 3
        assert "## Influence weights" in text and "were negative" in text

    # The uploaded student reloads as a plain transformers model with the same outputs.
    reloaded = AutoModelForSequenceClassification.from_pretrained(upload["copy"])
    torch.testing.assert_close(batch_logits(reloaded, tokenizer), batch_logits(trainer.model, tokenizer))
    # As after Trainer.push_to_hub, output_dir holds the pushed student; the staging folder is gone.
    assert (output_dir / "README.md").read_text() == (upload["copy"] / "README.md").read_text()
    assert (output_dir / "model.safetensors").is_file()
    assert not (output_dir / HUB_STAGING_DIR).exists()


def test_save_model_writes_the_student_and_its_card(tmp_path, tokenizer, hub):
    trainer = make_trainer("online", tmp_path, tokenizer)
    trainer.train()
    folder = tmp_path / "my-student"
    trainer.save_model(str(folder))

    files = {p.name for p in folder.iterdir()}
    assert files == STUDENT_FILES
    data = card_data(folder)
    assert data["model_name"] == "my-student" and data["distillation"]["method"] == "online"
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(batch_logits(reloaded, tokenizer), batch_logits(trainer.model, tokenizer))
    assert not hub.uploads  # args.push_to_hub is off: nothing is uploaded


def test_card_never_names_a_changed_in_memory_teacher_after_its_checkpoint(tmp_path, tokenizer, hub):
    teacher = tiny_classifier(2, seed=1)
    teacher.config._name_or_path = "org/tiny-teacher"  # loaded from the Hub, then changed (not in the cache)
    trainer = make_trainer("kd", tmp_path, tokenizer, teacher=teacher, max_steps=1, eval_strategy="no")
    trainer.push_to_hub(dataset="keyword task", tags=["my-tag"], license="apache-2.0")
    data = card_data(hub.uploads[0]["copy"])
    entry = data["distillation"]["teachers"][0]
    assert entry["id"] == LOCAL and entry["based_on"] == {"id": "org/tiny-teacher", "revision": None}
    assert data["license"] == "apache-2.0" and "my-tag" in data["tags"] and "kd" in data["tags"]
    text = ModelCard.load(hub.uploads[0]["copy"] / "README.md").text
    assert "keyword task" in text and "initialised from [org/tiny-teacher](https://huggingface.co/org" in text
    assert "the teacher [org/tiny-teacher]" not in text


def _cached_hub_model(cache, repo_id: str, model) -> str:
    """``model``'s weights as the local Hub cache holds ``repo_id`` at its main revision; returns the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    return commit


def test_an_in_memory_teacher_is_named_after_its_checkpoint_only_while_it_holds_its_weights(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    commit = _cached_hub_model(tmp_path / "cache", "org/tiny-teacher", tiny_classifier(2, seed=1))
    tiny_classifier(2, seed=1).save_pretrained(tmp_path / "mrpc-teacher")
    for name_or_path, named in (
        ("org/tiny-teacher", TeacherInfo("org/tiny-teacher", commit)),
        (str(tmp_path / "mrpc-teacher"), TeacherInfo("mrpc-teacher", local=True)),
    ):
        teacher = BertForSequenceClassification.from_pretrained(
            name_or_path if name_or_path != "org/tiny-teacher" else tmp_path / "mrpc-teacher"
        )
        teacher.config._name_or_path = name_or_path
        assert teacher_source(teacher, None) == named  # the checkpoint's own weights
        with torch.no_grad():
            teacher.classifier.bias[0] += 1e-3  # fine-tuned in memory
        assert teacher_source(teacher, None) == TeacherInfo(
            LOCAL, based_on=named if named.local else TeacherInfo(named.id)
        )
    # A checkpoint without the module's task head (initialised at random when loaded) is not the teacher.
    head = tiny_classifier(2, seed=1)
    save_file(
        {k: v for k, v in head.state_dict().items() if not k.startswith("classifier")},
        tmp_path / "mrpc-teacher" / "model.safetensors",
    )
    head.config._name_or_path = str(tmp_path / "mrpc-teacher")
    assert teacher_source(head, None).based_on == TeacherInfo("mrpc-teacher", local=True)
    # Sharded checkpoints are compared shard by shard.
    sharded = tmp_path / "sharded"
    tiny_classifier(2, seed=1).save_pretrained(sharded, max_shard_size="30KB")
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    head.config._name_or_path = str(sharded)
    assert teacher_source(head, None) == TeacherInfo("sharded", local=True)


def test_teacher_name_names_the_teacher_in_the_card(tmp_path, tokenizer, hub):
    teacher = tiny_classifier(2, seed=1)
    teacher.config._name_or_path = "org/tiny-teacher"
    trainer = make_trainer(
        "online", tmp_path, tokenizer, teacher=teacher, eval_strategy="no", teacher_name="me/sst2-teacher"
    )
    trainer.create_model_card(output_dir=tmp_path / "card")
    data = card_data(tmp_path / "card")
    assert data["distillation"]["teachers"] == [
        {
            "id": "me/sst2-teacher",
            "revision": None,
            "parameters": 22434,
            "based_on": {"id": "org/tiny-teacher", "revision": None},
        }
    ]
    text = ModelCard.load(tmp_path / "card" / "README.md").text
    assert "the teacher [me/sst2-teacher](https://huggingface.co/me/sst2-teacher)" in text
    assert "`teacher_name`" not in text  # not a hyperparameter
    trainer.push_teacher_to_hub("me/trained-teacher")
    assert card_data(hub.uploads[-1]["copy"])["base_model"] == "me/sst2-teacher"


def test_teacher_name_gives_one_name_per_teacher_of_an_ensemble(tmp_path, tokenizer, hub):
    ensemble = [tiny_classifier(2, seed=1), tiny_classifier(2, seed=3)]
    trainer = make_trainer(
        "kd", tmp_path, tokenizer, teacher=ensemble, eval_strategy="no", teacher_name="me/a, me/b"
    )
    trainer.create_model_card(output_dir=tmp_path / "card")
    assert [t["id"] for t in card_data(tmp_path / "card")["distillation"]["teachers"]] == ["me/a", "me/b"]
    trainer.args.teacher_name = "me/a"
    with pytest.raises(
        ValueError, match=r"teacher_name gives 1 name \('me/a'\) for 2 teachers; give one name per teacher"
    ):
        trainer.create_model_card(output_dir=tmp_path / "card")
    for bad in ("me/a,", " ", ["me/a"]):
        with pytest.raises(
            ValueError, match=r"teacher_name=.* is not a list of names: give one name per teacher"
        ):
            DistillationTrainingArguments(output_dir=str(tmp_path), teacher_name=bad)


def test_a_collapsed_students_card_says_so(tmp_path, tokenizer, hub):
    trainer = make_trainer("kd", tmp_path, tokenizer, eval_strategy="no")
    # What the trainer's evaluation logs when every prediction was one class.
    trainer.state.log_history += [
        {"eval_loss": 0.69, "eval_accuracy": 0.5, "eval_collapsed_to_class": 0, "step": 3},
    ]
    trainer.create_model_card(output_dir=tmp_path / "card")
    text = ModelCard.load(tmp_path / "card" / "README.md").text
    assert (
        "**Warning: the student has collapsed to one class.** At this final evaluation it predicted class 0"
        in text
    )
    assert "| collapsed_to_class |" not in text and "| accuracy | 0.5 |" in text
    assert card_data(tmp_path / "card")["distillation"]["collapsed_to_class"] == 0


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_the_cards_influence_steps_are_those_of_the_influence_log(tmp_path, tokenizer, hub, logging_steps):
    trainer = make_trainer(
        "lgtm",
        tmp_path,
        tokenizer,
        callbacks=[InfluenceLoggerCallback()],
        max_steps=4,
        logging_steps=logging_steps,
        eval_strategy="no",
    )
    trainer.train()
    with open(Path(trainer.args.output_dir) / "influence.jsonl") as log:
        steps = sorted({json.loads(line)["step"] for line in log})
    assert steps == [0, 1, 2, 3]
    trainer.create_model_card(output_dir=tmp_path / "card")
    influence = card_data(tmp_path / "card")["distillation"]["influence"]
    assert (influence["first_step"], influence["last_step"]) == (steps[0], steps[-1])
    assert (
        "Over optimisation steps 0–3 (counted from 0, as in the influence log"
        in ModelCard.load(tmp_path / "card" / "README.md").text
    )


def test_teacher_given_as_a_path_and_revision(tmp_path, tokenizer, hub):
    from hf_distill.publishing.hub import teacher_source as _teacher_source

    folder = tmp_path / "teacher"
    tiny_classifier(2, seed=1).save_pretrained(folder)
    trainer = make_trainer("kd", tmp_path, tokenizer, teacher=str(folder), max_steps=1, eval_strategy="no")
    trainer.push_to_hub()
    # A local folder is named by its folder name (flagged local), never by its path on this machine.
    teacher_entry = card_data(hub.uploads[0]["copy"])["distillation"]["teachers"][0]
    assert teacher_entry == {"id": "teacher", "revision": None, "parameters": 22434, "local": True}
    text = ModelCard.load(hub.uploads[0]["copy"] / "README.md").text
    assert "the local teacher checkpoint `teacher`" in text and str(tmp_path) not in text
    assert _teacher_source("org/teacher", {"revision": "v2"}) == TeacherInfo("org/teacher", "v2")


def test_checkpoint_pushes_upload_the_student_alone(tmp_path, tokenizer, hub):
    """With push_to_hub=True, Trainer pushes at every save; those uploads hold the student alone too."""
    trainer = make_trainer(
        "lgtm",
        tmp_path,
        tokenizer,
        callbacks=[InfluenceLoggerCallback()],
        push_to_hub=True,
        hub_strategy="every_save",
        save_strategy="steps",
        save_steps=2,
        max_steps=4,
        eval_strategy="no",
    )
    output_dir = trainer.args.output_dir
    trainer.train()
    assert trainer.args.output_dir == output_dir
    assert (Path(output_dir) / "influence.jsonl").is_file()
    assert len(hub.uploads) == 2
    for upload in hub.uploads:
        assert upload["files"] == STUDENT_FILES
        assert card_data(upload["copy"])["distillation"]["method"] == "lgtm"
    # The final push, as every save_model() call with push_to_hub=True.
    trainer.save_model()
    assert len(hub.uploads) == 3 and hub.uploads[-1]["files"] == STUDENT_FILES
    assert hub.uploads[-1]["commit_message"] == "Model save"


def test_push_teacher_to_hub(tmp_path, tokenizer, hub):
    trainer = make_trainer("online", tmp_path, tokenizer)
    trainer.train()
    trainer.push_teacher_to_hub("user/tiny-teacher", private=True)
    assert hub.repos[-1] == "user/tiny-teacher"
    upload = hub.uploads[-1]
    assert upload["repo_id"] == "user/tiny-teacher"
    assert upload["files"] == {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    data = card_data(upload["copy"])
    assert "distillation-teacher" in data["tags"] and "online" in data["tags"]
    assert data["distillation"]["role"] == "teacher" and data["distillation"]["student"] == HUB_ID
    reloaded = AutoModelForSequenceClassification.from_pretrained(upload["copy"])
    torch.testing.assert_close(
        batch_logits(reloaded, tokenizer), batch_logits(trainer.teacher_model, tokenizer)
    )


# ----- loading: safetensors only, no remote code unless asked ----------------------------------------------


def test_teacher_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "pickled-teacher"
    teacher = tiny_classifier(2, seed=1)
    teacher.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(teacher.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights \(only pytorch_model.bin\)"):
        load_teacher(str(folder), tiny_classifier(1))
    with pytest.raises(ValueError, match="safetensors only"):
        load_teacher(str(folder), tiny_classifier(1), {"use_safetensors": False})


def test_teacher_loading_never_turns_on_remote_code(tmp_path, monkeypatch):
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        model = tiny_classifier(2, seed=1)
        return (
            (model, {"missing_keys": set(), "mismatched_keys": set()})
            if kwargs["output_loading_info"]
            else model
        )

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", fake_from_pretrained)
    load_teacher("org/teacher", tiny_classifier(1), {"revision": "v1"})
    assert calls[-1] == {"revision": "v1", "use_safetensors": True, "output_loading_info": True}
    load_teacher("org/teacher", tiny_classifier(1), {"trust_remote_code": True})  # only when asked
    assert calls[-1]["trust_remote_code"] is True


def test_a_lora_students_card_loads_it_with_peft_on_the_named_base(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny_classifier(1, seed=2).save_pretrained(base_dir)
    base = BertForSequenceClassification.from_pretrained(base_dir)
    student = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_classifier(2, seed=1),
        args=tiny_run_args(DistillationTrainingArguments, tmp_path, max_steps=1),
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    card = (adapter_dir / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "standard `transformers` model" not in card
    # The snippet, pointed at the local base and adapter folders, gives the trained student.
    run = dataclasses.replace(
        trainer._distillation_run(model_name="adapter"), base_model=str(base_dir), repo_id=str(adapter_dir)
    )
    code = "\n".join(usage_lines(run)).split("```python\n")[1].split("```")[0]
    assert f'from_pretrained("{base_dir}")' in code
    namespace: dict = {}
    exec(code, namespace)
    batch = tokenizer(["w7 w9 w11"], return_tensors="pt")
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](**batch).logits, student(**batch).logits)


def test_peft_student_is_pushed_as_its_adapter(tmp_path, tokenizer, hub):
    from peft import LoraConfig, get_peft_model

    base = tiny_classifier(1, seed=2)
    base.config._name_or_path = "org/tiny-base"
    student = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        hub_model_id=HUB_ID,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_classifier(2, seed=1),
        args=args,
        train_dataset=keyword_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.push_to_hub()
    upload = hub.uploads[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= upload["files"]
    assert "model.safetensors" not in upload["files"]
    data = card_data(upload["copy"])
    assert data["library_name"] == "peft" and data["base_model"] == "org/tiny-base"
    assert data["distillation"]["method"] == "kd"
