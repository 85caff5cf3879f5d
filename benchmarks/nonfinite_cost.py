"""What the non-finite checks add to one step, timed on their own (step_cost.py's `kd` against `kd_unchecked`
gives the end-to-end ratio, which machine noise blurs at this size).

    python benchmarks/nonfinite_cost.py                      # a KD step's checks: logits 16 × 2, two losses
    python benchmarks/nonfinite_cost.py --logits 8 512 32000 # a causal LM's logits
    python benchmarks/nonfinite_cost.py --teacher_parameters 22700000  # + skip's copy of a learning teacher

Per optimisation step a `DistillationTrainer` watches the teacher's logits, the distillation term, the
student's loss and the student's gradient norm (one reduction each, kept on the device) and reads the totals
once before the optimizer step. Under ``nonfinite="skip"`` a learning teacher's trainable weights and AdamW
state are also copied before its update (to take it back if the step is skipped): ``--teacher_parameters``
times that copy for a teacher of that many trainable parameters.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_distill.safety.nonfinite import NonFiniteMonitor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--logits", type=int, nargs="+", default=[16, 2], help="shape of the teacher's logits"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher_parameters", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    monitor = NonFiniteMonitor("error")
    logits, loss, grad_norm = torch.randn(*args.logits), torch.tensor(0.5), torch.tensor(1.5)
    start = time.perf_counter()
    for step in range(args.steps):
        monitor.watch("teacher's logits", logits, "teacher")
        monitor.watch("distillation term", loss, "student")
        monitor.watch("student's loss", loss, "student")
        monitor.watch("student's gradient", grad_norm, "student")
        monitor.should_skip(step)
        monitor.end_step()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"logits {tuple(args.logits)}: {per_step * 1e6:.1f} µs of checks per step ({args.threads} thread)")
    if args.teacher_parameters:
        print(
            f"skip's copy of a {args.teacher_parameters:,}-parameter teacher: {teacher_copy(args.teacher_parameters) * 1e3:.0f} ms"
        )


def teacher_copy(parameters: int, repeats: int = 5) -> float:
    """Median time of the copy `nonfinite="skip"` makes before a learning teacher's update: its trainable
    weights and its AdamW state (two moments and a step count per tensor)."""
    import copy
    import statistics

    weights = [torch.nn.Parameter(torch.randn(parameters // 8)) for _ in range(8)]
    optimizer = torch.optim.AdamW(weights, lr=1e-3)
    for w in weights:
        w.grad = torch.randn_like(w)
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _ = [w.detach().clone() for w in weights], copy.deepcopy(optimizer.state_dict())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
