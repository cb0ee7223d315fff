"""Shared fixtures: a tiny BERT with the packaged MiniLM tokenizer, and the packaged data slices."""

import shutil

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from toolchain.models import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_tiny_model_dir(path, layers: int = 2, seed: int = 0):
    """A randomly initialised 2-layer BERT (hidden 32) saved as an HF folder with the real tokenizer."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tokenizer():
    from toolchain.models import load_tokenizer

    return load_tokenizer()
