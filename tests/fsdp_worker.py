"""One DistillationTrainer run for tests/test_fsdp.py, with the frozen teacher and the student under FSDP2.

Launched once per rank by ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUTDIR``
(each rank takes 4 rows per step), or called in-process through `train_once` with ``mode="single"`` for the
single-process reference (8 rows per step, no sharding). The data order is sequential, so the ranks' two
4-row halves of each step are exactly the single process's 8-row batch. With ``--device cuda`` (one rank per
GPU, over NCCL) the plain trainer runs. ``--mode`` picks how the ranks hold the models: ``fsdp2``, ``ddp``
(the student replicated, the teacher a plain module), or DeepSpeed's ``zero2`` or ``zero3`` (CUDA only).

accelerate does not run FSDP on the CPU: ``AcceleratorState`` switches to ``DistributedType.FSDP`` only for
accelerator devices (CUDA, XPU, NPU, ...), so on a CPU with gloo the plugin that ``TrainingArguments(fsdp=...)``
builds is dropped and the run is silently plain DDP. `CPUFSDP2DistillationTrainer` therefore puts that plugin
back into the state right after Trainer creates its accelerator; everything after that (the teacher's
preparation, accelerate's ``fully_shard`` of the student, Trainer's loop) is the code a GPU run takes.

Each run writes ``OUTDIR/<tag>_rank<r>.pt``: the losses, the full (gathered) student and teacher weights
before and after training, the teacher's logits on a probe batch, and how the teacher is held.
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
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from testing_utils import keyword_dataset, tiny_classifier, tiny_tokenizer  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_distill.distributed import full_state_dict  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3
ROWS = GLOBAL_BATCH * STEPS
# BERT names no `_no_split_modules`, so the layer class is named, as users of such models do.
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
DEEPSPEED_AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


class CPUFSDP2Mixin:
    """Puts back the FSDP2 plugin that accelerate drops on the CPU (see above); goes before the trainer class."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True
        # On the CPU, accelerate's gathered state dict of an FSDP2 model (`get_state_dict`, which Trainer saves
        # the student with) holds tensors whose storage safetensors cannot read; torch's full state-dict API,
        # which hf_distill gathers a sharded teacher with, gives readable ones.
        self.accelerator.get_state_dict = lambda model, unwrap=True: full_state_dict(model)


class CPUFSDP2DistillationTrainer(CPUFSDP2Mixin, DistillationTrainer):
    """DistillationTrainer with the FSDP2 plugin that accelerate drops on the CPU put back."""


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights, whole on every rank (a collective when they are sharded)."""
    module = getattr(module, "module", module)  # a DeepSpeed engine's model
    if any(hasattr(p, "ds_id") for p in module.parameters()):  # ZeRO-3 partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


def probe_inputs() -> dict[str, torch.Tensor]:
    rows = keyword_dataset(4, seed=9)
    width = max(len(ids) for ids in rows["input_ids"])
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows["input_ids"]):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def how_teacher_is_held(teacher: torch.nn.Module) -> dict[str, object]:
    params = list(teacher.parameters())
    sharded = [p for p in params if isinstance(p, DTensor) or hasattr(p, "ds_id")]
    return {
        "sharded_fraction": len(sharded) / len(params),
        # What this rank holds of the teacher's weights: about 1/world_size of them when sharded.
        "local_numel": sum(_local(p).numel() for p in params),
        "full_numel": sum(getattr(p, "ds_numel", None) or p.numel() for p in params),
        "device": str(params[0].device),
        "any_requires_grad": any(p.requires_grad for p in params),
        "training_mode": teacher.training,
        # The sharding units, by class: the wrap policy's layers, the embedding, the root.
        "fsdp_units": sorted(type(m).__name__ for m in teacher.modules() if isinstance(m, FSDPModule)),
    }


def _local(param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return param.to_local()
    return getattr(param, "ds_tensor", param)  # a ZeRO-3 parameter's own partition


def train_once(outdir: Path, tag: str, per_device_batch: int, mode: str, device: str = "cpu") -> Path:
    """``mode``: ``single`` (one process), ``ddp``, ``fsdp2``, ``zero2`` or ``zero3`` (DeepSpeed, CUDA only)."""
    rank = int(os.environ.get("RANK", "0"))
    sharding = {
        "single": {},
        "ddp": {},
        "fsdp2": {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)},
        "zero2": {"deepspeed": {**DEEPSPEED_AUTO, "zero_optimization": {"stage": 2}}},
        "zero3": {"deepspeed": {**DEEPSPEED_AUTO, "zero_optimization": {"stage": 3}}},
    }[mode]
    on_cpu = device == "cpu"
    teacher = tiny_classifier(layers=2, seed=1)
    student = tiny_classifier(layers=1, seed=2)
    teacher_init, student_init = full_state(teacher), full_state(student)
    with torch.no_grad():
        reference_logits = tiny_classifier(layers=2, seed=1).eval()(**probe_inputs()).logits
    args = DistillationTrainingArguments(
        output_dir=str(outdir / f"{tag}_trainer"),
        per_device_train_batch_size=per_device_batch,
        max_steps=STEPS,
        learning_rate=5e-3,
        alpha=0.5,
        temperature=2.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=on_cpu,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if on_cpu and mode != "single" else None,
        **sharding,
    )
    trainer_class = CPUFSDP2DistillationTrainer if on_cpu and mode == "fsdp2" else DistillationTrainer
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(ROWS),
        processing_class=tiny_tokenizer(outdir / f"tok_{tag}_rank{rank}"),
    )
    held_before_training = how_teacher_is_held(trainer.teacher_model)
    trainer.train()
    probe = {k: v.to(trainer.args.device) for k, v in probe_inputs().items()}
    with torch.no_grad():
        teacher_logits = trainer.teacher_model(**probe).logits.detach().float().cpu()
    path = outdir / f"{tag}_rank{rank}.pt"
    torch.save(
        {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "student": full_state(trainer.model),
            "student_init": student_init,
            "student_wrapper": type(trainer.model_wrapped).__name__,
            "teacher_wrapper": type(trainer.teacher_model).__name__,
            "teacher": full_state(trainer.teacher_model),
            "teacher_init": teacher_init,
            "teacher_logits": teacher_logits,
            "reference_teacher_logits": reference_logits,
            "teacher_held": held_before_training,
            "world_size": trainer.args.world_size,
            "global_step": trainer.state.global_step,
        },
        path,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "zero2", "zero3"], default="fsdp2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_once(cli.outdir, cli.mode, GLOBAL_BATCH // world, cli.mode, cli.device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
