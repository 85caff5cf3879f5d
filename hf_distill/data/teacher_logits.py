"""Preparing data for a teacher: its own tokenisation (``teacher_`` columns), and its logits computed
once and cached in the dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..teacher.loading import forward_arg_names
from .batch import (
    CACHED_TEACHER_COLUMNS,
    TEACHER_LOGITS,
    TEACHER_PREFIX,
    TEACHER_TAIL_LOGPROB,
    TEACHER_TOPK_COLUMNS,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
)
from .collators import default_student_collator


def add_teacher_inputs(
    dataset: Any,
    teacher_tokenizer: PreTrainedTokenizerBase,
    text_columns: str | Sequence[str],
    **tokenizer_kwargs: Any,
) -> Any:
    """Tokenise ``text_columns`` with the teacher's tokenizer into ``teacher_`` columns of a `datasets.Dataset`.

    ``tokenizer_kwargs`` go to the tokenizer (e.g. ``truncation=True, max_length=128``); padding is left to
    the collator.
    """
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"add_teacher_inputs: columns {missing} are not in the dataset ({dataset.column_names})."
        )
    if len(columns) > 2:
        raise ValueError("add_teacher_inputs takes one text column or a sentence pair (two columns).")

    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        encoded = teacher_tokenizer(*(rows[c] for c in columns), **tokenizer_kwargs)
        return {TEACHER_PREFIX + k: v for k, v in encoded.items()}

    return dataset.map(tokenize, batched=True, desc="Tokenising for the teacher")


def _teacher_sources(dataset: Any, teacher: nn.Module) -> dict[str, str]:
    """Dataset column -> the teacher's forward argument it feeds (``teacher_`` columns when there are any)."""
    use_teacher_columns = any(
        c.startswith(TEACHER_PREFIX) and c not in CACHED_TEACHER_COLUMNS for c in dataset.column_names
    )
    accepted = forward_arg_names(teacher) - {"labels"}
    source = {
        (TEACHER_PREFIX + name if use_teacher_columns else name): name
        for name in accepted
        if (TEACHER_PREFIX + name if use_teacher_columns else name) in dataset.column_names
    }
    if not source:
        raise ValueError(
            f"cache_teacher_logits: no dataset column matches the teacher's inputs {sorted(accepted)}; "
            f"tokenise the dataset first (columns: {dataset.column_names})."
        )
    return source


def _teacher_logits_of(
    rows: dict[str, list],
    teacher: nn.Module,
    source: dict[str, str],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    device: str | torch.device,
) -> tuple[torch.Tensor, list[int]]:
    """The teacher's logits for a batch of dataset rows (on ``device``), and each row's token count."""
    features = [{source[c]: rows[c][i] for c in source} for i in range(len(rows[next(iter(source))]))]
    batch = {k: v.to(device) for k, v in collate(features).items() if torch.is_tensor(v)}
    return teacher(**batch).logits, [len(f["input_ids"]) for f in features]


def _row_positions(row: torch.Tensor, length: int, left_padded: bool) -> torch.Tensor:
    """A token-level row without the padding collation added (sequence-level rows pass through)."""
    if row.dim() < 2:
        return row
    return row[row.shape[0] - length :] if left_padded else row[:length]


@torch.no_grad()
def cache_teacher_logits(
    dataset: Any,
    teacher_model: nn.Module | Sequence[nn.Module],
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    top_k: int | None = None,
    logprob_dtype: str = "float16",
    teacher_name: str | None = None,
) -> Any:
    """Run the (frozen) teacher once over a `datasets.Dataset` and attach its outputs.

    Without ``top_k``: the full logits as ``teacher_logits``. With several teachers each row holds a
    ``(num_teachers, ...)`` array. Token-level logits are trimmed to each row's length. Only columns the
    teacher's forward accepts (or their ``teacher_`` versions) are fed; they are padded with ``tokenizer``
    (the teacher's), or collated by ``data_collator`` if given.

    With ``top_k=K`` (one teacher that reads the student's tokens, typically a language model): per
    position the teacher's K largest log-probabilities at temperature 1 (``teacher_topk_logprobs``, stored
    as ``logprob_dtype``: float16, or float32 for exact comparisons), their token ids
    (``teacher_topk_ids``, int32) and the log of the mass outside them (``teacher_tail_logprob``, float32,
    ``-inf`` when K is the vocabulary size). The teacher (``teacher_name``, default its checkpoint name),
    K, the vocabulary size, the temperature and the tokenizer (its name and a hash of its vocabulary) are
    recorded in ``dataset.info.description``, which `datasets` keeps through ``save_to_disk``; the trainer
    refuses a student whose tokenizer differs. Read them back with `topk_cache_metadata`.
    """
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    if device is None:
        device = next(teachers[0].parameters()).device
    collate = data_collator or default_student_collator(tokenizer)
    # Only the default collation pads on the tokenizer's side; a custom collator is taken to pad on the right.
    left_padded = data_collator is None and getattr(tokenizer, "padding_side", "right") == "left"
    if top_k is not None:
        if len(teachers) != 1:
            raise ValueError(
                f"cache_teacher_logits(top_k={top_k}) caches one teacher; got {len(teachers)}. Cache each teacher's "
                "top k into its own dataset, or combine them by caching the full logits (top_k=None)."
            )
        topk = TopKCaching(teachers[0], top_k, logprob_dtype, teacher_name, tokenizer)
        return topk.run(dataset, collate, batch_size, device, left_padded)
    all_rows: list[Any] = []
    for teacher in teachers:
        was_training = teacher.training
        teacher.eval()
        source = _teacher_sources(dataset, teacher)
        logits_rows = []
        for start in range(0, len(dataset), batch_size):
            logits, lengths = _teacher_logits_of(
                dataset[start : start + batch_size], teacher, source, collate, device
            )
            for row, length in zip(logits.float().cpu(), lengths, strict=True):
                logits_rows.append(_row_positions(row, length, left_padded))
        teacher.train(was_training)
        all_rows.append(logits_rows)
    if len(teachers) == 1:
        column = [r.tolist() for r in all_rows[0]]
    else:
        column = [torch.stack([rows[i] for rows in all_rows]).tolist() for i in range(len(dataset))]
    if TEACHER_LOGITS in dataset.column_names:
        dataset = dataset.remove_columns(TEACHER_LOGITS)
    return dataset.add_column(TEACHER_LOGITS, column)


# ----- a top-k cache --------------------------------------------------------------------------------------

TOPK_METADATA_TAG = "hf_distill teacher top-k cache: "
LOGPROB_DTYPES = ("float16", "float32")


def tokenizer_vocab_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of a tokenizer's vocabulary (token → id, sorted): equal for tokenizers that map text alike."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def topk_cache_metadata(dataset: Any) -> dict[str, Any] | None:
    """What `cache_teacher_logits` recorded about a top-k cache (teacher, K, vocabulary size, temperature,
    tokenizer and its vocabulary hash, largest token id), or ``None`` for a dataset that holds none."""
    info = getattr(dataset, "info", None)
    for line in reversed((getattr(info, "description", None) or "").splitlines()):
        if line.startswith(TOPK_METADATA_TAG):
            return json.loads(line[len(TOPK_METADATA_TAG) :])
    return None


def _topk_features(dataset: Any, top_k: int, logprob_dtype: str, token_level: bool) -> Any:
    import datasets  # the library's data layer reads `datasets` objects but does not need it to import

    ids, logprobs = datasets.Value("int32"), datasets.Value(logprob_dtype)
    ids, logprobs = datasets.List(ids, length=top_k), datasets.List(logprobs, length=top_k)
    tail = datasets.Value("float32")
    if token_level:
        ids, logprobs, tail = datasets.List(ids), datasets.List(logprobs), datasets.List(tail)
    features = dataset.features.copy()
    features.update({TEACHER_TOPK_IDS: ids, TEACHER_TOPK_LOGPROBS: logprobs, TEACHER_TAIL_LOGPROB: tail})
    return features


def top_k_of_logits(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K largest log-probabilities (float32) of ``(..., V)`` logits, their ids, and the log of the mass
    outside them: a logsumexp over the other log-probabilities, exact when the top K hold nearly all of it."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top_k, dim=-1)
    tail = logprobs.scatter_(-1, ids, float("-inf")).logsumexp(-1)  # in place: one (..., V) buffer
    return values, ids, tail


class TopKCaching:
    """One teacher's top-k cache of a dataset: `run` adds the columns and records the metadata."""

    def __init__(
        self,
        teacher: nn.Module,
        top_k: int,
        logprob_dtype: str,
        teacher_name: str | None,
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (e.g. 64), got {top_k!r}.")
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype={logprob_dtype!r} is unknown; choose one of {LOGPROB_DTYPES}.")
        self.teacher, self.top_k, self.logprob_dtype = teacher, top_k, logprob_dtype
        config = getattr(teacher, "config", None)
        self.teacher_name = teacher_name or getattr(config, "_name_or_path", None) or type(teacher).__name__
        self.tokenizer = tokenizer

    def run(
        self,
        dataset: Any,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        device: str | torch.device,
        left_padded: bool,
    ) -> Any:
        source = _teacher_sources(dataset, self.teacher)
        if any(c.startswith(TEACHER_PREFIX) for c in source):
            raise ValueError(
                "cache_teacher_logits(top_k=...) pairs the teacher's token ids with the student's positions, so "
                "the teacher must read the student's tokens; the dataset has teacher_ input columns (a tokenizer "
                "of the teacher's own). Cache the full logits (top_k=None) instead."
            )
        dataset = dataset.remove_columns([c for c in CACHED_TEACHER_COLUMNS if c in dataset.column_names])
        was_training = self.teacher.training
        self.teacher.eval()
        shape = self._first_logits_shape(dataset, source, collate, device)
        if self.top_k > shape[-1]:
            raise ValueError(
                f"top_k={self.top_k} exceeds the teacher's vocabulary ({shape[-1]}); choose a smaller K."
            )

        def add_top_k(rows: dict[str, list]) -> dict[str, list]:
            logits, lengths = _teacher_logits_of(rows, self.teacher, source, collate, device)
            values, ids, tail = (t.cpu() for t in top_k_of_logits(logits, self.top_k))
            out: dict[str, list] = {name: [] for name in TEACHER_TOPK_COLUMNS}
            for row, length in enumerate(lengths):
                out[TEACHER_TOPK_IDS].append(_row_positions(ids[row], length, left_padded).int().numpy())
                out[TEACHER_TOPK_LOGPROBS].append(_row_positions(values[row], length, left_padded).numpy())
                out[TEACHER_TAIL_LOGPROB].append(
                    _row_positions(tail[row, ..., None], length, left_padded)[..., 0].numpy()
                )
            return out

        token_level = len(shape) == 3
        try:
            cached = dataset.map(
                add_top_k,
                batched=True,
                batch_size=batch_size,
                features=_topk_features(dataset, self.top_k, self.logprob_dtype, token_level),
                desc=f"Caching the teacher's top {self.top_k}",
                # The teacher is not hashed (it may weigh gigabytes): the cache depends on what is recorded.
                new_fingerprint=hashlib.sha256(
                    f"{dataset._fingerprint}|{self._settings()}".encode()
                ).hexdigest()[:16],
                load_from_cache_file=False,
            )
        finally:
            self.teacher.train(was_training)
        self._record(cached, shape[-1])
        return cached

    def _settings(self) -> str:
        return json.dumps([self.teacher_name, self.top_k, self.logprob_dtype, self._tokenizer_fields()])

    def _first_logits_shape(self, dataset: Any, source: dict[str, str], collate: Any, device: Any) -> tuple:
        if len(dataset) == 0:
            raise ValueError("cache_teacher_logits: the dataset has no rows to cache.")
        logits, _ = _teacher_logits_of(dataset[:1], self.teacher, source, collate, device)
        return tuple(logits.shape)

    def _tokenizer_fields(self) -> dict[str, str | None]:
        if not isinstance(self.tokenizer, PreTrainedTokenizerBase):
            return {"tokenizer": None, "tokenizer_vocab_sha256": None}
        return {
            "tokenizer": self.tokenizer.name_or_path or None,
            "tokenizer_vocab_sha256": tokenizer_vocab_hash(self.tokenizer),
        }

    def _record(self, dataset: Any, vocab_size: int) -> None:
        import pyarrow.compute as pc

        ids = dataset.data.column(TEACHER_TOPK_IDS)
        while hasattr(ids.type, "value_type"):  # lists of lists of ids -> the ids
            ids = pc.list_flatten(ids)
        metadata = {
            "teacher": self.teacher_name,
            "top_k": self.top_k,
            "vocab_size": vocab_size,
            "max_token_id": pc.max(ids).as_py(),
            "temperature": 1.0,
            "logprob_dtype": self.logprob_dtype,
            **self._tokenizer_fields(),
        }
        lines = [
            line
            for line in (dataset.info.description or "").splitlines()
            if not line.startswith(TOPK_METADATA_TAG)
        ]
        dataset.info.description = "\n".join([*lines, TOPK_METADATA_TAG + json.dumps(metadata)])
