"""Cost of the label checks a trainer makes when it is built, on a large map-style dataset.

    python benchmarks/label_check.py             # 400k rows, shuffled selection, 3 classes
    python benchmarks/label_check.py --rows 1000000

Times `check_label_range` (values outside [0, num_labels)) and `split_quiz` (the stratified quiz split)
on a `datasets.Dataset` with a token column beside the labels, both on the table as built and on a
shuffled row selection (``select``), the slower path: the label column is taken through the selection.
"""

from __future__ import annotations

import argparse
import time

import datasets
import numpy as np

from hf_distill.data.label_checks import check_label_range
from hf_distill.data.quiz import split_quiz


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--num_labels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [list(range(64))] * args.rows,
            "label": rng.integers(0, args.num_labels, args.rows),
        }
    )
    shuffled = data.select(rng.permutation(args.rows))
    for name, dataset in (("as built", data), ("shuffled select", shuffled)):
        check = best_of(args.repeats, lambda d=dataset: check_label_range(d, "label", args.num_labels))
        split = best_of(args.repeats, lambda d=dataset: split_quiz(d, 0.1))
        print(
            f"{args.rows} rows, {name}: check_label_range {check * 1e3:.1f} ms, split_quiz {split * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
