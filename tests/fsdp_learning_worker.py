"""One run of a learning teacher (online or meta) for tests/test_fsdp_learning.py, the teacher sharded by FSDP2.

Launched once per rank by ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_learning_worker.py
OUTDIR --phase P --method M [--device cuda]`` (each rank takes 8 / world size rows per step), or called
in-process through `train_learning` with ``mode="single"`` for the single-process reference (8 rows per step,
no sharding). As in tests/fsdp_worker.py the data order is sequential and the FSDP2 plugin that accelerate
drops on the CPU is put back.

``--phase full`` trains `STEPS` steps with a checkpoint every `SAVE_EVERY`; ``--phase resume`` starts a new
trainer from that run's first checkpoint and trains to the same end; ``--phase accumulate`` trains as ``full``
with each rank's rows in 2 micro-batches per step. Each writes ``OUTDIR/<tag>_rank<r>.pt``:
the losses, the full (gathered) student and teacher weights at the end, and how the teacher is held. The
student's checkpoints are sharded (``SHARDED_STATE_DICT``, written with torch's DCP); the teacher's are
gathered. (With a gathered student, ``FULL_STATE_DICT``, the resume hangs on this CPU inside accelerate's
``load_fsdp_model``: rank 0 broadcasts the student's state, which rank 1, holding an empty one, skips.)

``--phase obstacle`` measures why a plain pass over a sharded student cannot serve meta or LGTM (`measure_obstacle`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from fsdp_worker import (  # noqa: E402
    FSDP_CONFIG,
    CPUFSDP2Mixin,
    full_state,
    how_teacher_is_held,
    probe_inputs,
)
from testing_utils import keyword_dataset, tiny_classifier, tiny_tokenizer  # noqa: E402

from hf_distill import (  # noqa: E402
    LGTMTrainer,
    LGTMTrainingArguments,
    MetaDistillTrainer,
    MetaDistillTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
)

GLOBAL_BATCH = 8
STEPS = 4
SAVE_EVERY = 2
ROWS = GLOBAL_BATCH * STEPS


class CPUFSDP2OnlineDistillTrainer(CPUFSDP2Mixin, OnlineDistillTrainer):
    """OnlineDistillTrainer with the FSDP2 plugin that accelerate drops on the CPU put back."""


class CPUFSDP2MetaDistillTrainer(CPUFSDP2Mixin, MetaDistillTrainer):
    """MetaDistillTrainer with the FSDP2 plugin that accelerate drops on the CPU put back."""


class CPUFSDP2LGTMTrainer(CPUFSDP2Mixin, LGTMTrainer):
    """LGTMTrainer with the FSDP2 plugin that accelerate drops on the CPU put back."""


# Per method: the trainer, its CPU-FSDP2 twin, its arguments, what they add to the common ones, and the rows.
# The quiz of meta and LGTM is a third of the rows (so as many training rows as online's); a large pilot step
# makes meta's gradient stand far above rounding; LGTM replays the student's AdamW in its lookahead.
METHODS = {
    "online": (OnlineDistillTrainer, CPUFSDP2OnlineDistillTrainer, OnlineDistillTrainingArguments, {}, ROWS),
    "meta": (
        MetaDistillTrainer,
        CPUFSDP2MetaDistillTrainer,
        MetaDistillTrainingArguments,
        {"quiz_split": 1 / 3, "pilot_learning_rate": 0.5},
        ROWS * 3 // 2,
    ),
    "lgtm": (
        LGTMTrainer,
        CPUFSDP2LGTMTrainer,
        LGTMTrainingArguments,
        {"quiz_split": 1 / 3, "influence_scale": 10.0},
        ROWS * 3 // 2,
    ),
}


def push_teacher_to_fake_hub(trainer: OnlineDistillTrainer, copy_to: Path) -> None:
    """`push_teacher_to_hub` on every rank, the Hub replaced by a copy of the uploaded folder into ``copy_to``."""
    import shutil

    from huggingface_hub import HfApi, RepoUrl

    def upload_folder(api: HfApi, *, folder_path: str, **kwargs: object) -> str:
        shutil.copytree(folder_path, copy_to)
        return "commit"

    HfApi.create_repo = lambda api, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
    HfApi.upload_folder = upload_folder
    trainer.push_teacher_to_hub("user/learned-teacher")


def train_learning(
    outdir: Path,
    tag: str,
    mode: str,
    method: str = "online",
    resume_from: Path | None = None,
    device: str = "cpu",
    accumulation: int = 1,
) -> Path:
    """``method``: ``online`` or ``meta``; ``mode``: ``single`` (one process, 8 rows per step) or ``fsdp2``
    (each rank 8 / world size rows); ``device``: ``cpu`` (gloo) or ``cuda`` (one rank per GPU, NCCL, the
    plain trainer); ``accumulation``: micro-batches per step (each rank's rows split among them)."""
    trainer_base, cpu_fsdp2_trainer, args_class, extra_args, rows = METHODS[method]
    on_cpu = device == "cpu"
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The student sharded in its checkpoints (DCP), the teacher gathered; see the module docstring.
    fsdp_config = {**FSDP_CONFIG, "state_dict_type": "SHARDED_STATE_DICT"}
    sharding = {"fsdp": True, "fsdp_config": fsdp_config} if mode == "fsdp2" else {}
    args = args_class(
        output_dir=str(outdir / f"{tag}_trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // world // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        learning_rate=5e-3,
        teacher_learning_rate=3e-3,
        alpha=0.5,
        temperature=2.0,
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        # An evaluation (student and teacher) before each checkpoint: forwards without backward in between.
        eval_strategy="steps",
        eval_steps=SAVE_EVERY,
        per_device_eval_batch_size=4 // world,
        logging_steps=1,
        report_to=[],
        use_cpu=on_cpu,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if on_cpu and mode == "fsdp2" else None,
        **sharding,
        **extra_args,
    )
    trainer_class = cpu_fsdp2_trainer if on_cpu and mode == "fsdp2" else trainer_base
    trainer = trainer_class(
        model=tiny_classifier(layers=1, seed=2),
        teacher_model=tiny_classifier(layers=2, seed=1),
        args=args,
        train_dataset=keyword_dataset(rows),
        eval_dataset=keyword_dataset(4, seed=5),
        processing_class=tiny_tokenizer(outdir / f"tok_{tag}_rank{rank}"),
    )
    held = how_teacher_is_held(trainer.teacher_model)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_teacher(outdir / f"{tag}_saved_teacher")
    push_teacher_to_fake_hub(trainer, outdir / f"{tag}_pushed_teacher")
    path = outdir / f"{tag}_rank{rank}.pt"
    torch.save(
        {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "teacher_grad_norms": [
                h["teacher_grad_norm"] for h in trainer.state.log_history if "teacher_grad_norm" in h
            ],
            "eval_losses": [
                h[key]
                for h in trainer.state.log_history
                for key in ("eval_loss", "eval_teacher_loss")
                if key in h
            ],
            "student": full_state(trainer.model),
            "teacher": full_state(trainer.teacher_model),
            "teacher_held": held,
            "global_step": trainer.state.global_step,
        },
        path,
    )
    return path


def measure_obstacle(outdir: Path, device: str = "cpu") -> Path:
    """What FSDP2 does to the two things meta's pilot step and LGTM's lookahead need of the student: the
    gradient of its loss with respect to its parameters, taken with ``torch.autograd.grad``, and a forward
    at other weight values through ``torch.func.functional_call``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.func import functional_call

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if device == "cpu" else "nccl")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    student = tiny_classifier(layers=1, seed=0).to(device)
    for layer in student.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    features = {k: v.to(device) for k, v in {**probe_inputs(), "labels": torch.tensor([0, 1, 0, 1])}.items()}
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(student(**features).loss, list(params.values()), allow_unused=True)
    # Whole values for every weight (as an unsharded pilot update would give), as leaves to differentiate.
    values = {n: p.full_tensor().detach().requires_grad_() for n, p in params.items()}
    reached = torch.autograd.grad(
        functional_call(student, values, kwargs=features).loss, list(values.values()), allow_unused=True
    )
    layer_names = {n for n in params if n.startswith("bert.encoder.layer.")}
    path = outdir / f"obstacle_rank{torch.distributed.get_rank()}.pt"
    torch.save(
        {
            "parameters": len(params),
            "no_gradient": sum(g is None for g in grads),
            "layer_parameters": len(layer_names),
            "layer_values_ignored": sum(
                g is None for n, g in zip(values, reached, strict=True) if n in layer_names
            ),
            "other_values_used": sum(
                g is not None for n, g in zip(values, reached, strict=True) if n not in layer_names
            ),
        },
        path,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--phase", choices=["full", "resume", "accumulate", "obstacle"], default="full")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--method", choices=sorted(METHODS), default="online")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if cli.phase == "obstacle":
        measure_obstacle(cli.outdir, cli.device)
        torch.distributed.destroy_process_group()
        return
    resume_from = None
    if cli.phase == "resume":
        resume_from = cli.outdir / "full_trainer" / f"checkpoint-{SAVE_EVERY}"
    accumulation = 2 if cli.phase == "accumulate" else 1
    train_learning(cli.outdir, cli.phase, "fsdp2", cli.method, resume_from, cli.device, accumulation)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
