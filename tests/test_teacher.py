"""hf_distill.teacher: loading, freezing, compatibility checks, and a learning teacher's optimizer, gradient
helpers and checkpoints."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, get_peft_model
from testing_utils import tiny_classifier

from hf_distill.distributed import all_reduce_mean, zeros_for_missing
from hf_distill.teacher.checkpoint import (
    TEACHER_CHECKPOINT_DIR,
    TEACHER_OPTIMIZER_NAME,
    gather_teacher_state,
    load_teacher_optimizer_state,
    load_teacher_weights,
    save_teacher_state,
)
from hf_distill.teacher.loading import (
    SEQUENCE_CLASSIFICATION,
    check_teacher_student_compatible,
    count_parameters,
    freeze,
    load_teacher,
    task_type,
)
from hf_distill.teacher.optimizer import create_teacher_optimizer, trainable_parameters


def test_freeze_and_task_type():
    model = freeze(tiny_classifier(1).train())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert task_type(model) == SEQUENCE_CLASSIFICATION
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_load_teacher_from_a_folder_and_refuse_pickles(tmp_path):
    student = tiny_classifier(1)
    tiny_classifier(2, seed=5).save_pretrained(tmp_path / "teacher")
    loaded = load_teacher(str(tmp_path / "teacher"), student)
    assert loaded.config.num_hidden_layers == 2 and task_type(loaded) == SEQUENCE_CLASSIFICATION
    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights.*pytorch_model.bin"):
        load_teacher(str(tmp_path / "pickled"), student)
    with pytest.raises(TypeError, match="teacher_model must be"):
        load_teacher(3, student)


def test_compatibility_checks_name_the_problem():
    student = tiny_classifier(1)
    with pytest.raises(ValueError, match="predicts 3 outputs but the student predicts 2"):
        check_teacher_student_compatible(tiny_classifier(1, num_labels=3), student)
    with pytest.raises(ValueError, match="share parameters"):
        check_teacher_student_compatible(student, student)


def test_zeros_for_missing_and_single_process_mean():
    params = [torch.ones(2), torch.ones(3)]
    filled = zeros_for_missing([torch.full((2,), 5.0), None], params)
    assert filled[0].tolist() == [5.0, 5.0] and filled[1].tolist() == [0.0, 0.0, 0.0]
    tensors = [torch.arange(3.0)]
    assert all_reduce_mean(tensors) is tensors  # nothing to average in one process


def test_unwrapping_keeps_the_peft_wrapper_whose_save_writes_the_adapter():
    lora = get_peft_model(tiny_classifier(1), LoraConfig(r=2, target_modules=["query", "value"]))
    wrapped = torch.nn.DataParallel(lora)  # on CPU: a plain container, unwrapped like DDP
    unwrapped = extract_model_from_parallel(wrapped)
    assert unwrapped is lora and hasattr(unwrapped, "peft_config")


def test_teacher_optimizer_has_no_weight_decay_on_biases_and_norms():
    teacher = tiny_classifier(1)
    decay = {n for n, _ in teacher.named_parameters() if "bias" not in n and "LayerNorm" not in n}
    optimizer = create_teacher_optimizer(teacher, 1e-3, 0.1, decay, eps=1e-6)
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {0.1, 0.0} and all(group["eps"] == 1e-6 for group in optimizer.param_groups)
    counted = sum(len(group["params"]) for group in optimizer.param_groups)
    assert counted == len(trainable_parameters(teacher))


def test_teacher_state_round_trips_through_a_checkpoint(tmp_path):
    teacher = tiny_classifier(1, seed=3)
    optimizer = create_teacher_optimizer(teacher, 1e-2, 0.0, set())
    teacher(input_ids=torch.tensor([[2, 9, 7]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    save_teacher_state(tmp_path, gather_teacher_state(teacher, optimizer, None))
    assert (tmp_path / TEACHER_CHECKPOINT_DIR).is_dir()
    fresh = tiny_classifier(1, seed=4)
    fresh_optimizer = create_teacher_optimizer(fresh, 1e-2, 0.0, set())
    load_teacher_weights(tmp_path, fresh)
    load_teacher_optimizer_state(tmp_path, fresh_optimizer, None)
    for a, b in zip(teacher.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    state = next(iter(fresh_optimizer.state.values()))
    assert int(state["step"]) == 1
    with pytest.raises(FileNotFoundError, match="holds no teacher state"):
        load_teacher_weights(tmp_path / "elsewhere", fresh)


def test_optimizer_state_keyed_by_name_restores_an_unsharded_teacher(tmp_path):
    """A sharded teacher's checkpoint keys its optimizer state by parameter name (torch's full state-dict
    API); it restores the same AdamW state into a teacher that is not sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    teacher = tiny_classifier(1, seed=3)
    optimizer = create_teacher_optimizer(teacher, 1e-2, 0.0, set())
    teacher(input_ids=torch.tensor([[2, 9, 7]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    save_teacher_state(tmp_path, gather_teacher_state(teacher, optimizer, None))
    by_name = get_optimizer_state_dict(teacher, optimizer, options=StateDictOptions(full_state_dict=True))
    assert all(isinstance(key, str) for key in by_name["state"])
    torch.save(by_name, tmp_path / TEACHER_CHECKPOINT_DIR / TEACHER_OPTIMIZER_NAME)
    fresh = tiny_classifier(1, seed=3)
    fresh_optimizer = create_teacher_optimizer(fresh, 1e-2, 0.0, set())
    with pytest.raises(ValueError, match="keyed by parameter name: pass the teacher"):
        load_teacher_optimizer_state(tmp_path, fresh_optimizer, None)
    load_teacher_optimizer_state(tmp_path, fresh_optimizer, None, fresh)
    names = {id(p): n for n, p in fresh.named_parameters()}
    original = {n: optimizer.state[p] for n, p in teacher.named_parameters()}
    for param, state in fresh_optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], original[names[id(param)]][key])
    assert len(fresh_optimizer.state) == len(original)


def test_half_precision_master_weights_are_refused_for_a_sharded_teacher(monkeypatch):
    import hf_distill.teacher.optimizer as teacher_optimizer

    teacher = tiny_classifier(1).to(torch.bfloat16)
    monkeypatch.setattr(teacher_optimizer, "is_sharded", lambda model: True)
    with pytest.raises(ValueError, match="FSDP2 shards them, where teacher_fp32_master_weights=True"):
        create_teacher_optimizer(teacher, 1e-3, 0.0, set(), fp32_master_weights=True)
    create_teacher_optimizer(teacher, 1e-3, 0.0, set(), fp32_master_weights=False)  # stepped directly


def test_a_numbered_optimizer_state_resumes_a_sharded_teacher_by_name(tmp_path, monkeypatch):
    """An unsharded run's checkpoint (numbered parameters) resumed under FSDP2: its state is keyed by name
    and goes through torch's full state-dict API (here into an unsharded teacher posing as a sharded one)."""
    import hf_distill.teacher.checkpoint as teacher_checkpoint

    teacher = tiny_classifier(1, seed=3)
    decay = {n for n, _ in teacher.named_parameters() if "bias" not in n}  # two groups, as in a real run
    optimizer = create_teacher_optimizer(teacher, 1e-2, 0.01, decay)
    teacher(input_ids=torch.tensor([[2, 9, 7]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    save_teacher_state(tmp_path, gather_teacher_state(teacher, optimizer, None))
    fresh = tiny_classifier(1, seed=3)
    fresh_optimizer = create_teacher_optimizer(fresh, 1e-2, 0.01, decay)
    monkeypatch.setattr(teacher_checkpoint, "is_sharded", lambda model: True)
    load_teacher_optimizer_state(tmp_path, fresh_optimizer, None, fresh)
    original = {n: optimizer.state[p] for n, p in teacher.named_parameters()}
    for name, param in fresh.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_optimizer.state[param][key], original[name][key]), name
    assert [len(g["params"]) for g in fresh_optimizer.param_groups] == [
        len(g["params"]) for g in optimizer.param_groups
    ]

    other_optimizer = create_teacher_optimizer(fresh, 1e-2, 0.01, set())  # one group: not this run's
    with pytest.raises(ValueError, match="covers 25 parameters in 2 groups; this run's teacher optimizer"):
        load_teacher_optimizer_state(tmp_path, other_optimizer, None, fresh)
