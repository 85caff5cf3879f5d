"""Fixtures for the suite; the helpers they use live in testing_utils.py."""

from __future__ import annotations

import pytest
from testing_utils import tiny_classifier, tiny_tokenizer
from transformers import BertTokenizerFast


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_pair():
    """(teacher, student): a 2-layer and a 1-layer tiny BERT classifier."""
    return tiny_classifier(layers=2, seed=1), tiny_classifier(layers=1, seed=2)
