"""What the non-finite checks add to one step, timed on their own (step_cost.py's `kd` against `kd_unchecked`
gives the end-to-end ratio, which machine noise blurs at this size).

    python benchmarks/nonfinite_cost.py                      # a KD step's checks: logits 16 × 2, two losses
    python benchmarks/nonfinite_cost.py --logits 8 512 32000 # a causal LM's logits

Per optimisation step a `DistillationTrainer` watches the teacher's logits, the distillation term and the
student's loss (one reduction each, kept on the device) and reads the totals once before the optimizer step.
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    monitor = NonFiniteMonitor("error")
    logits, loss = torch.randn(*args.logits), torch.tensor(0.5)
    start = time.perf_counter()
    for step in range(args.steps):
        monitor.watch("teacher's logits", logits, "teacher")
        monitor.watch("distillation term", loss, "student")
        monitor.watch("student's loss", loss, "student")
        monitor.should_skip(step)
        monitor.end_step()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"logits {tuple(args.logits)}: {per_step * 1e6:.1f} µs of checks per step ({args.threads} thread)")


if __name__ == "__main__":
    main()
