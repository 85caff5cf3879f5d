"""Make the documentation's influence figures from a real (tiny) LGTM run: ``python docs/make_figures.py``.

A 2-layer BERT teacher is fine-tuned on a synthetic keyword task (label 1 when token 7 occurs, 10 % of
the training labels flipped), then LGTM distils it into a 1-layer student with `InfluenceLoggerCallback`
recording every per-sample influence weight. `hf_distill.plotting` turns the log into
``docs/img/influence_mean_trend.png`` (and, with ``--trajectories``, ``influence_trajectories.png``:
two clean samples and one with a flipped label). CPU only, 2–5 minutes on two cores; deterministic for
a given torch build.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_distill import InfluenceLoggerCallback, LGTMTrainer, LGTMTrainingArguments
from hf_distill.plotting import load_influence_log, plot_mean_trend, plot_sample_trajectories

IMG = Path(__file__).resolve().parent / "img"
VOCAB, LENGTH = 64, 12


def keyword_task(n: int, seed: int, noise: float) -> tuple[datasets.Dataset, list[int]]:
    """Fixed-length rows (no padding needed), label 1 when token 7 occurs, a `noise` share of labels
    flipped; returns the dataset and the flipped rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)
    labels = torch.arange(n) % 2
    positions = torch.randint(1, LENGTH, (n,), generator=g)
    ids[labels == 1, positions[labels == 1]] = 7
    ids[:, 0] = 2
    flipped = torch.rand(n, generator=g) < noise
    labels = torch.where(flipped, 1 - labels, labels)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "label": labels.tolist()}
    )
    return dataset, torch.nonzero(flipped).flatten().tolist()


def tiny_bert(layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(IMG), help="where the PNGs go (default: docs/img)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--trajectories", action="store_true", help="also plot three samples' weights")
    args = parser.parse_args()
    torch.set_num_threads(2)
    common = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    train, flipped = keyword_task(320, seed=0, noise=0.1)
    with tempfile.TemporaryDirectory() as work:
        teacher = tiny_bert(2, seed=1)
        Trainer(
            model=teacher,
            args=TrainingArguments(
                output_dir=f"{work}/teacher",
                learning_rate=3e-3,
                num_train_epochs=4,
                per_device_train_batch_size=16,
                **common,
            ),
            train_dataset=train,
        ).train()

        run_dir = Path(work) / "lgtm"
        trainer = LGTMTrainer(
            model=tiny_bert(1, seed=2),
            teacher_model=teacher,
            args=LGTMTrainingArguments(
                output_dir=str(run_dir),
                learning_rate=2e-3,
                teacher_learning_rate=1e-3,
                alpha=1.0,
                temperature=1.0,
                teacher_alpha=0.4,
                influence_scale=1.0,
                per_device_train_batch_size=16,
                num_train_epochs=args.epochs,
                logging_steps=10,
                quiz_split=0.1,
                **common,
            ),
            train_dataset=train,
            callbacks=[InfluenceLoggerCallback()],
        )
        trainer.train()
        records = load_influence_log(run_dir / "influence.jsonl")
        print(plot_mean_trend(records, Path(args.out_dir) / "influence_mean_trend.png", num_samples=64))
        if args.trajectories:
            logged = set(records["idx"].tolist())
            samples = [i for i in range(len(train)) if i in logged and i not in flipped][:2]
            samples += [i for i in flipped if i in logged][:1]
            out = Path(args.out_dir) / "influence_trajectories.png"
            print(plot_sample_trajectories(records, samples, out))


if __name__ == "__main__":
    main()
