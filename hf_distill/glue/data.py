"""GLUE data without surprises: task → sentence keys and labels, loading (Hub or local files), checks,
tokenisation and GLUE-submission predictions.

Used by the GLUE example and the GLUE benchmark; usable on its own::

    from hf_distill.glue import load_glue, tokenize_glue

    raw = load_glue("mrpc", data_dir="glue/mrpc")  # or load_glue("mrpc") for the Hub's GLUE
    data = tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=128)

Local files hold one row per example with the Hugging Face ``glue`` column names (``sentence1``,
``sentence2``, ``label``, ...; see `GLUE_TASK_KEYS`), as JSON lines (``.jsonl``/``.json``), CSV or TSV.
Labels may be class ids or class names (``"equivalent"``, ``"entailment"``); test files may have no
label. Missing columns fail with an error that names them and the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import glue_metrics

__all__ = [
    "GLUE_LABEL_NAMES",
    "GLUE_SUBMISSION_FILES",
    "GLUE_TASK_KEYS",
    "TRAINABLE_GLUE_TASKS",
    "check_glue_columns",
    "eval_split_names",
    "find_split_files",
    "glue_label_names",
    "glue_num_labels",
    "load_glue",
    "load_split_file",
    "metric_task",
    "normalize_glue_labels",
    "predictions_from_logits",
    "score_predictions",
    "test_split_names",
    "tokenize_glue",
    "write_glue_predictions",
]

# The sentence columns of each task, as the Hugging Face `glue` dataset names them.
GLUE_TASK_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
TRAINABLE_GLUE_TASKS: tuple[str, ...] = tuple(GLUE_TASK_KEYS)

# Class names in label-id order (the Hugging Face `glue` ClassLabel order); None for regression.
GLUE_LABEL_NAMES: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "stsb": None,
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}

# File names the GLUE server expects, per evaluated split (metric task name).
GLUE_SUBMISSION_FILES: dict[str, str] = {
    "cola": "CoLA.tsv",
    "sst2": "SST-2.tsv",
    "mrpc": "MRPC.tsv",
    "stsb": "STS-B.tsv",
    "qqp": "QQP.tsv",
    "mnli_matched": "MNLI-m.tsv",
    "mnli_mismatched": "MNLI-mm.tsv",
    "qnli": "QNLI.tsv",
    "rte": "RTE.tsv",
    "wnli": "WNLI.tsv",
}
# Tasks whose submission holds class names; the others hold class ids (STS-B: a score).
_SUBMIT_NAMES = frozenset({"mnli", "qnli", "rte"})

# File formats by extension: (datasets builder, extra builder arguments).
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    # keep_default_na=False: a sentence "NA" or "null" stays text. GLUE's own TSVs are not quoted (a
    # sentence may hold a lone `"`), so TSV reads with no quoting at all.
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
}
LABEL = "label"
NO_LABEL = -1  # the label of unlabelled (test) rows, as in the Hub's GLUE


def _check_task(task: str) -> None:
    if task not in GLUE_TASK_KEYS:
        raise ValueError(
            f"Unknown GLUE task {task!r}; choose one of: {', '.join(TRAINABLE_GLUE_TASKS)} "
            "(mnli evaluates both its matched and mismatched validation sets)."
        )


def glue_label_names(task: str) -> list[str] | None:
    """Class names of ``task`` in label-id order; None for the regression task stsb."""
    _check_task(task)
    names = GLUE_LABEL_NAMES[task]
    return None if names is None else list(names)


def glue_num_labels(task: str) -> int:
    """Outputs of the classifier head: the number of classes, or 1 for stsb."""
    names = glue_label_names(task)
    return 1 if names is None else len(names)


def eval_split_names(task: str) -> list[str]:
    """Validation splits of ``task``: ``validation``, or mnli's matched and mismatched ones."""
    _check_task(task)
    return ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]


def test_split_names(task: str) -> list[str]:
    """Test splits of ``task``: ``test``, or mnli's matched and mismatched ones."""
    _check_task(task)
    return ["test_matched", "test_mismatched"] if task == "mnli" else ["test"]


def metric_task(task: str, split: str) -> str:
    """The `hf_distill.metrics` task name of a split: ``mnli_matched``/``mnli_mismatched`` for mnli."""
    _check_task(task)
    if task == "mnli":
        return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
    return task


def _split_aliases(task: str) -> dict[str, str]:
    """File stem → split name. For mnli, plain ``validation``/``test`` files are the matched sets."""
    names = ["train", *eval_split_names(task), *test_split_names(task)]
    aliases = {name: name for name in names}
    if task == "mnli":
        aliases.update({"validation": "validation_matched", "test": "test_matched"})
    return aliases


def find_split_files(data_dir: str | os.PathLike, task: str) -> dict[str, Path]:
    """The split files in ``data_dir``: ``train``, ``validation`` and ``test`` with a .jsonl, .json, .tsv or
    .csv extension (mnli: ``validation_matched``, ``validation_mismatched``, ``test_matched``,
    ``test_mismatched``; plain ``validation``/``test`` count as matched). Raises when the folder has no
    split file, or two files for one split."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data_dir {folder} is not a folder.")
    found: dict[str, Path] = {}
    for stem, split in _split_aliases(task).items():
        for extension in _FORMATS:
            path = folder / f"{stem}{extension}"
            if not path.is_file():
                continue
            if split in found:
                raise ValueError(
                    f"{folder} has two files for the {split} split ({found[split].name} and {path.name}); "
                    "keep one."
                )
            found[split] = path
    if not found:
        expected = ", ".join(f"{s}.jsonl" for s in _split_aliases(task))
        raise FileNotFoundError(
            f"No GLUE split files in {folder}: expected files such as {expected} (or .json/.tsv/.csv)."
        )
    return found


def load_split_file(path: str | os.PathLike, cache_dir: str | None = None) -> Any:
    """One split file as a `datasets.Dataset`; the format comes from the extension."""
    import datasets

    path = Path(path)
    extension = path.suffix.lower()
    if extension not in _FORMATS:
        raise ValueError(
            f"{path}: unsupported file type {extension or '(none)'!r}; use .jsonl, .json, .tsv or .csv."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    builder, options = _FORMATS[extension]
    return datasets.load_dataset(
        builder, data_files={"data": str(path)}, split="data", cache_dir=cache_dir, **options
    )


def check_glue_columns(dataset: Any, task: str, split: str, source: str = "") -> None:
    """Raise a ValueError naming the columns ``task`` needs that ``dataset`` lacks (labels: not for test)."""
    key1, key2 = GLUE_TASK_KEYS[task]
    needed = [key1] + ([key2] if key2 else [])
    if not split.startswith("test"):
        needed.append(LABEL)
    columns = list(dataset.column_names)
    missing = [c for c in needed if c not in columns]
    if missing:
        where = f" ({source})" if source else ""
        raise ValueError(
            f"The {split} split{where} lacks the column(s) {missing} that GLUE task {task!r} needs; it has "
            f"{columns}. {task} rows need {needed}."
        )


def _label_id(value: Any, names: list[str], lookup: dict[str, int], where: str) -> int:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return NO_LABEL
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{where}: label {value!r} is a boolean; use class ids 0..{len(names) - 1} or names."
        )
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    elif isinstance(value, str) and value.strip().lower() in lookup:
        return lookup[value.strip().lower()]
    else:
        raise ValueError(
            f"{where}: unknown label {value!r}; use class ids 0..{len(names) - 1} or names {names}."
        )
    if label != NO_LABEL and not 0 <= label < len(names):
        raise ValueError(f"{where}: label {label} is out of range; {len(names)} classes {names}.")
    return label


def normalize_glue_labels(dataset: Any, task: str, split: str = "data") -> Any:
    """Labels as class ids (int; -1 when unlabelled) or, for stsb, float scores; text columns as strings.

    Class names (case-insensitive) and digit strings are mapped to ids. A dataset whose labels are already
    integers (the Hub's ClassLabel) is left as it is.
    """
    import datasets

    key1, key2 = GLUE_TASK_KEYS[task]
    for key in (key1, key2):
        if key and key in dataset.column_names and dataset.features[key] != datasets.Value("string"):
            dataset = dataset.cast_column(key, datasets.Value("string"))  # e.g. a CSV column of numbers
    if LABEL not in dataset.column_names:
        if split.startswith("test"):
            return dataset.add_column(LABEL, [NO_LABEL] * len(dataset))
        return dataset
    feature = dataset.features[LABEL]
    names = glue_label_names(task)
    where = f"{task} {split}"
    if names is None:
        values = dataset[LABEL]
        try:
            scores = [float(NO_LABEL) if v is None or v == "" else float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: stsb labels must be numbers (similarity 0-5): {err}") from err
        dataset = dataset.remove_columns(LABEL).add_column(LABEL, scores)
        return dataset.cast_column(LABEL, datasets.Value("float32"))
    if isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith("int")
    ):
        labels = np.asarray(dataset[LABEL])
        bad = labels[(labels != NO_LABEL) & ((labels < 0) | (labels >= len(names)))]
        if bad.size:
            raise ValueError(f"{where}: label {int(bad[0])} is out of range; {len(names)} classes {names}.")
        return dataset
    lookup = {name.lower(): i for i, name in enumerate(names)}
    ids = [_label_id(v, names, lookup, where) for v in dataset[LABEL]]
    dataset = dataset.remove_columns(LABEL).add_column(LABEL, ids)
    return dataset.cast_column(LABEL, datasets.Value("int64"))


def load_glue(
    task: str,
    *,
    dataset_name: str = "glue",
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache_dir: str | None = None,
) -> Any:
    """The splits of GLUE ``task`` as a `datasets.DatasetDict`, checked and with normalised labels.

    Without files, ``datasets.load_dataset(dataset_name, task)`` (the Hub). With ``data_dir``, its split
    files (see `find_split_files`); ``train_file``/``validation_file``/``test_file`` add or replace single
    splits (for mnli, ``validation_file``/``test_file`` are the matched sets). Split names are ``train``,
    `eval_split_names` and `test_split_names`.
    """
    import datasets

    _check_task(task)
    files: dict[str, Path] = {}
    if data_dir is not None:
        files.update(find_split_files(data_dir, task))
    aliases = _split_aliases(task)
    for split, path in (("train", train_file), ("validation", validation_file), ("test", test_file)):
        if path is not None:
            files[aliases[split]] = Path(path)
    if files:
        raw = datasets.DatasetDict({split: load_split_file(path, cache_dir) for split, path in files.items()})
        sources = {split: str(path) for split, path in files.items()}
    else:
        try:
            raw = datasets.load_dataset(dataset_name, task, cache_dir=cache_dir)
        except Exception as err:  # offline, unknown name, ...: say what to do instead
            raise RuntimeError(
                f"Could not load GLUE task {task!r} from the Hub as load_dataset({dataset_name!r}, {task!r}): "
                f"{type(err).__name__}: {err}. Offline? Pass local files with --data_dir (train/validation/test "
                ".jsonl/.tsv/.csv) or --train_file/--validation_file/--test_file."
            ) from err
        sources = {split: f"{dataset_name}/{task}" for split in raw}
    known = set(aliases.values())
    out = datasets.DatasetDict()
    for split, dataset in raw.items():
        if split not in known:
            continue
        check_glue_columns(dataset, task, split, sources[split])
        out[split] = normalize_glue_labels(dataset, task, split)
    return out


def tokenize_glue(
    data: Any,
    tokenizer: Any,
    task: str,
    max_seq_length: int | None = 128,
    padding: bool | str = False,
    keep_columns: Sequence[str] = (LABEL, "idx"),
) -> Any:
    """Tokenise the sentence (pair) of every row; keeps ``label`` and ``idx`` and drops the text.

    ``padding=False`` (default) leaves padding to the collator, so each batch is only as long as its
    longest row. Works on a `datasets.Dataset` or `DatasetDict`.
    """
    key1, key2 = GLUE_TASK_KEYS[task]
    if max_seq_length is not None:
        max_seq_length = min(max_seq_length, getattr(tokenizer, "model_max_length", max_seq_length))

    def tokenize(rows: Mapping[str, list]) -> dict[str, list]:
        texts = (rows[key1],) if key2 is None else (rows[key1], rows[key2])
        return tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)

    def one(dataset: Any) -> Any:
        drop = [c for c in dataset.column_names if c not in keep_columns]
        return dataset.map(tokenize, batched=True, remove_columns=drop, desc="Tokenising")

    if isinstance(data, Mapping):  # a DatasetDict (or a plain dict of datasets)
        return type(data)({split: one(dataset) for split, dataset in data.items()})
    return one(data)


def predictions_from_logits(task: str, logits: Any) -> np.ndarray:
    """Class ids (argmax) or, for stsb, the scores of a (n, 1) or (n,) output."""
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    if glue_label_names(task) is None:
        return logits.reshape(len(logits), -1)[:, 0]
    return logits.argmax(-1)


def write_glue_predictions(path: str | os.PathLike, task: str, predictions: Any) -> Path:
    """Write GLUE-server predictions: a header ``index<TAB>prediction`` then one row per test example.

    mnli, qnli and rte hold class names, stsb a score with three decimals, the other tasks class ids.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = glue_label_names(task)
    with path.open("w", encoding="utf-8") as file:
        file.write("index\tprediction\n")
        for index, value in enumerate(np.asarray(predictions).reshape(-1)):
            if names is None:
                shown = f"{float(value):.3f}"
            elif task in _SUBMIT_NAMES:
                shown = names[int(value)]
            else:
                shown = str(int(value))
            file.write(f"{index}\t{shown}\n")
    return path


def score_predictions(task: str, split: str, logits: Any, labels: Any) -> dict[str, float]:
    """`hf_distill.metrics.glue_metrics` of a split's logits (mnli: the matched/mismatched metric name)."""
    return glue_metrics(metric_task(task, split), predictions_from_logits(task, logits), labels)
