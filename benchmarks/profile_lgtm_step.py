"""Where an LGTM step's time goes: `torch.profiler` over a few steps, split by the step's passes.

    python benchmarks/profile_lgtm_step.py                          # faithful, batch 16 × 128, 3 steps
    python benchmarks/profile_lgtm_step.py --variant lgtm_pre --batch_size 32

`LGTMTrainer` marks its passes with `torch.profiler.record_function` (``lgtm.teacher_forward``,
``lgtm.lookahead``, ``lgtm.quiz_gradient_and_influence``, ``lgtm.teacher_backward_and_step``); the rest of
a step is the base trainer's work: the student's forward, the updated teacher's soft labels (faithful
only), the student's backward and optimizer step. The table gives milliseconds per step for each part
and the ten aten operators with the most self time, to show what is left to remove. Same models and
batches as `benchmarks/step_cost.py` (which it imports).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import LGTM_VARIANTS, StepTimer, make_data, make_trainer, resolve_model  # noqa: E402

REGIONS = (
    "lgtm.teacher_forward",
    "lgtm.lookahead",
    "lgtm.quiz_gradient_and_influence",
    "lgtm.teacher_backward_and_step",
)


class ProfilerSteps(TrainerCallback):
    """Advances the profiler's schedule at every optimisation step, so warm-up steps are left out."""

    def __init__(self, profiler: profile) -> None:
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()


def main() -> None:
    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="lgtm", choices=[*LGTM_VARIANTS, "lgtm_naive"])
    parser.add_argument("--model_path", default=None)
    parser.add_argument("--from_config", action="store_true")
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    resolve_model(args)
    torch.manual_seed(0)
    data = make_data(args)
    timer = StepTimer()
    trainer = make_trainer(args.variant, args, data, timer, Path("/tmp/hf_distill_profile"))
    prof = profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=args.warmup, warmup=0, active=args.steps, repeat=1),
    )
    trainer.add_callback(ProfilerSteps(prof))
    with prof:
        trainer.train()
    steps = args.steps
    events = prof.key_averages()
    step_ms = 1000 * statistics.mean(timer.times[args.warmup :])
    print(
        f"# profile_lgtm_step: {args.variant}, {args.model_name} → first {args.student_layers} layers, batch "
        f"{args.batch_size} × {args.seq_len}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# wall time per step (mean of {args.steps} after {args.warmup} warm-up): {step_ms:.0f} ms\n")
    print("| part of the step | ms per step | share |")
    print("|---|---|---|")
    by_name = {e.key: e for e in events}
    covered = 0.0
    for region in REGIONS:
        event = by_name.get(region)
        ms = event.cpu_time_total / 1000 / steps if event else 0.0
        covered += ms
        print(f"| {region} | {ms:.0f} | {ms / step_ms:.0%} |")
    rest = step_ms - covered
    print(f"| rest: student forward/backward, soft labels, optimizer | {rest:.0f} | {rest / step_ms:.0%} |")
    print("\nTop aten operators by self CPU time (ms per step):\n")
    print("| operator | calls per step | self ms per step |")
    print("|---|---|---|")
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    for event in aten[:10]:
        print(f"| {event.key} | {event.count / steps:.0f} | {event.self_cpu_time_total / 1000 / steps:.0f} |")


if __name__ == "__main__":
    main()
