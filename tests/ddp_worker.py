"""One learning-teacher run (online, LGTM or meta) for tests/test_online_distributed.py.

Launched once per rank by ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUTDIR``
(each rank takes 4 rows per step), or called in-process through `train_once` for the single-process
reference (8 rows per step). The data order is sequential, so the ranks' two 4-row halves of each step are
exactly the single process's 8-row batch.

Each run writes ``OUTDIR/<tag>_rank<r>.pt``: the teacher and student state dicts before and after training.
``--variants nosync`` also (or instead) trains with the teacher's gradient averaging replaced by a no-op,
which must leave the ranks' teachers apart: the proof that the comparison can fail. ``lgtm_ga`` and
``meta_ga`` train LGTMTrainer and MetaDistillTrainer with 2 micro-batches of 4 rows per rank and step, to
compare with one process's batch of 16.
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
from testing_utils import keyword_dataset, tiny_classifier, tiny_tokenizer  # noqa: E402

import hf_distill.trainers.learning_teacher_trainer  # noqa: E402
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
ACCUMULATION = 2  # the *_ga variants: micro-batches per rank and step
ROWS = GLOBAL_BATCH * 6


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_once(
    outdir: Path,
    tag: str,
    per_device_batch: int,
    sync_teacher: bool = True,
    method: str = "online",
    accumulation: int = 1,
) -> Path:
    """Train one trainer and save its weights before/after to ``outdir/<tag>_rank<r>.pt``.

    ``method``: ``online`` (OnlineDistillTrainer), ``lgtm`` or ``lgtm_pre`` (LGTMTrainer with
    ``lgtm_student_targets`` updated / pre_update, and a fixed quiz set whose global batch the ranks share)
    or ``meta`` (MetaDistillTrainer, the same quiz set); ``accumulation``: gradient_accumulation_steps.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    teacher = tiny_classifier(layers=2, seed=1)
    student = tiny_classifier(layers=1, seed=2)
    teacher_init, student_init = _snapshot(teacher), _snapshot(student)
    args_class, extra = OnlineDistillTrainingArguments, {"teacher_alpha": 0.5}
    if method.startswith("lgtm"):
        args_class = LGTMTrainingArguments
        extra["lgtm_student_targets"] = "pre_update" if method == "lgtm_pre" else "updated"
    elif method == "meta":
        # A large pilot step, so that the pilot gradient's averaging across ranks shows in the result.
        args_class, extra = MetaDistillTrainingArguments, {"pilot_learning_rate": 5.0}
    args = args_class(
        **extra,
        output_dir=str(outdir / f"{tag}_trainer"),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        learning_rate=5e-3,
        teacher_learning_rate=5e-3,
        alpha=0.5,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if distributed else None,
    )
    calls = []
    real_average = hf_distill.trainers.learning_teacher_trainer.average_gradients_across_processes

    def counted_average(params):
        calls.append(len(params))
        real_average(params)

    def skipped_average(params):
        calls.append(len(params))

    hf_distill.trainers.learning_teacher_trainer.average_gradients_across_processes = (
        counted_average if sync_teacher else skipped_average
    )
    try:
        trainer_class, quiz = OnlineDistillTrainer, {}
        if method != "online":
            trainer_class = MetaDistillTrainer if method == "meta" else LGTMTrainer
            quiz = {"quiz_dataset": keyword_dataset(2 * GLOBAL_BATCH, seed=5)}
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=keyword_dataset(ROWS),
            processing_class=tiny_tokenizer(outdir / f"tok_{tag}_rank{rank}"),
            **quiz,
        )
        trainer.train()
    finally:
        hf_distill.trainers.learning_teacher_trainer.average_gradients_across_processes = real_average
    path = outdir / f"{tag}_rank{rank}.pt"
    torch.save(
        {
            "teacher": _snapshot(trainer.teacher_model),
            "student": _snapshot(trainer.model),
            "teacher_init": teacher_init,
            "student_init": student_init,
            "world_size": trainer.args.world_size,
            "teacher_steps": len(calls),
            "global_step": trainer.state.global_step,
        },
        path,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["sync", "nosync", "lgtm", "lgtm_pre", "lgtm_ga", "meta_ga"],
        default=["sync"],
    )
    cli = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for variant in cli.variants:
        method = "online" if variant in ("sync", "nosync") else variant.removesuffix("_ga")
        train_once(
            cli.outdir,
            variant,
            GLOBAL_BATCH // world,
            sync_teacher=variant != "nosync",
            method=method,
            accumulation=ACCUMULATION if variant.endswith("_ga") else 1,
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
