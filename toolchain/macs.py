"""Analytic multiply-accumulate (MAC) count of a length-adaptive BERT encoder at batch 1.

Counts what LAT's torchprofile measurement counts: linear layers, the two attention matmuls, LayerNorms (numel
of their input) and element-wise ``mul`` ops; softmax, GELU, adds, divisions, gathers and TopK are free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import BertConfig, PretrainedConfig

from toolchain.errors import ToolchainError
from toolchain.lat import LengthConfig, parse_length_config

ARCHS: dict[str, dict] = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6-h384": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def config_for_arch(name: str) -> BertConfig:
    """A ``BertConfig`` for one of the ``ARCHS`` presets (vocabulary and positions as in BERT-base uncased)."""
    if name not in ARCHS:
        raise ToolchainError(f"unknown architecture {name!r}: choose one of {', '.join(sorted(ARCHS))}")
    return BertConfig(vocab_size=30522, max_position_embeddings=512, **ARCHS[name])


def count_macs(
    config: PretrainedConfig,
    length_config: LengthConfig,
    max_seq_length: int = 384,
    head: str = "qa",
    num_labels: int = 2,
) -> int:
    """MACs of one forward pass at ``max_seq_length`` tokens, dropping tokens per ``length_config``.

    Layer with ``n`` input tokens keeping ``k = min(entry, n)``: Q, K, V, O linears ``4 n H^2``; QK^T and
    attention x V ``2 n^2 H``; attention-output LayerNorm ``n H``; feed-forward ``2 k H I``; its LayerNorm
    ``k H``. Plus the embedding LayerNorm ``L H``, the extended-attention-mask ``mul`` ``L`` (HF builds it as
    ``(1 - mask) * min``) and the head: QA ``2 L H`` on every restored position, classification pooler ``H^2``
    plus classifier ``H * num_labels`` on [CLS]. BERT-base at 384 tokens gives LAT's 35,340,779,904.
    """
    if max_seq_length <= 0:
        raise ToolchainError(f"max_seq_length must be positive, got {max_seq_length}")
    if head not in ("qa", "classify"):
        raise ToolchainError(f"unknown head {head!r}: choose 'qa' or 'classify'")
    if num_labels <= 0:
        raise ToolchainError(f"num_labels must be positive, got {num_labels}")
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = parse_length_config(length_config, layers, max_seq_length) or (max_seq_length,) * layers
    length = max_seq_length
    macs = length * hidden + length  # embedding LayerNorm + attention-mask scaling
    for keep in lengths:
        kept = min(keep, length)
        macs += 4 * length * hidden * hidden + 2 * length * length * hidden + length * hidden
        macs += 2 * kept * hidden * inter + kept * hidden
        length = kept
    if head == "qa":
        macs += max_seq_length * hidden * 2
    else:
        macs += hidden * hidden + hidden * num_labels
    return macs


def expected_macs(
    config: PretrainedConfig,
    length_config: LengthConfig,
    lengths: Sequence[int],
    head: str = "qa",
    num_labels: int = 2,
) -> float:
    """Mean MACs over inputs of the given real token counts, each run cut to its own length (graphs take any
    length): an input of ``n`` tokens keeps at most ``n`` per layer, so a configuration costs what it drops of
    the real tokens, not of the padding."""
    counts, weights = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if not len(counts) or counts[0] <= 0:
        raise ToolchainError("expected MACs need at least one input, each of at least one token")
    total = sum(int(w) * count_macs(config, None if length_config is None else tuple(min(k, int(n)) for k in length_config),
                                    int(n), head, num_labels) for n, w in zip(counts, weights))
    return total / int(weights.sum())
