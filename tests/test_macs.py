"""Analytic MAC counts: LAT's published BERT-base figure, MiniLM, monotonicity, hand counts, torch cross-check."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForQuestionAnswering

from toolchain.errors import ToolchainError
from toolchain.lat import LengthAdaptiveModel
from toolchain.macs import ARCHS, config_for_arch, count_macs, expected_macs

LAT_BERT_BASE_384 = 35_340_779_904  # LAT paper / repo, torchprofile, SQuAD at 384 tokens


def test_bert_base_matches_lat():
    macs = count_macs(config_for_arch("bert-base"), None, max_seq_length=384)
    assert abs(macs - LAT_BERT_BASE_384) / LAT_BERT_BASE_384 < 0.005
    assert macs == LAT_BERT_BASE_384  # exact once the attention-mask mul is counted


def test_minilm():
    macs = count_macs(config_for_arch("minilm-l6-h384"), None)
    assert abs(macs - 4.76e9) / 4.76e9 < 0.01


def test_presets():
    config = config_for_arch("bert-base")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (768, 12, 3072)
    assert set(ARCHS) == {"bert-base", "minilm-l6-h384"}
    with pytest.raises(ToolchainError, match="unknown architecture 'gpt-9'"):
        config_for_arch("gpt-9")


def test_monotone_decrease():
    config = config_for_arch("bert-base")
    configs = [None, (384,) * 12, (300,) * 12, (300, 250) + (200,) * 10, (269, 253, 252, 202, 104, 34) + (34,) * 6]
    counts = [count_macs(config, c) for c in configs]
    assert counts[0] == counts[1]
    assert all(a > b for a, b in zip(counts[1:], counts[2:]))
    assert count_macs(config, "full") == counts[0]


def test_hand_count_tiny():
    config = BertConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    # L=10, H=8, I=16; layer 0 keeps 6 of 10, layer 1 keeps 3 of 6.
    emb = 10 * 8 + 10  # embedding LayerNorm + attention-mask mul
    layer0 = 4 * 10 * 64 + 2 * 100 * 8 + 10 * 8 + 2 * 6 * 8 * 16 + 6 * 8
    layer1 = 4 * 6 * 64 + 2 * 36 * 8 + 6 * 8 + 2 * 3 * 8 * 16 + 3 * 8
    assert count_macs(config, (6, 3), max_seq_length=10) == emb + layer0 + layer1 + 10 * 8 * 2
    assert count_macs(config, "6,3", 10, head="classify", num_labels=3) == emb + layer0 + layer1 + 64 + 24
    # An entry at or above the current length drops nothing.
    assert count_macs(config, (10, 10), 10) == count_macs(config, None, 10)


def test_expected_macs_cuts_each_input_to_its_real_length():
    config = BertConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    # an input of 4 tokens keeps min(6, 4) = 4 and then 3; one of 10 tokens keeps 6 and 3
    short, long = count_macs(config, (4, 3), 4), count_macs(config, (6, 3), 10)
    assert expected_macs(config, (6, 3), [4, 10, 10]) == pytest.approx((short + 2 * long) / 3)
    assert expected_macs(config, None, [10, 10]) == count_macs(config, None, 10)
    assert expected_macs(config, (6, 3), [4], head="classify", num_labels=3) == count_macs(config, (4, 3), 4, "classify", 3)
    # with the padding cut, dropping to 6 and 3 tokens saves less than it does at the padded length
    padded_ratio = count_macs(config, (6, 3), 10) / count_macs(config, None, 10)
    assert expected_macs(config, (6, 3), [4, 6, 10]) / expected_macs(config, None, [4, 6, 10]) > padded_ratio
    with pytest.raises(ToolchainError, match="at least one input"):
        expected_macs(config, None, [])
    with pytest.raises(ToolchainError, match="at least one token"):
        expected_macs(config, None, [0, 5])


def test_errors():
    config = config_for_arch("minilm-l6-h384")
    with pytest.raises(ToolchainError, match="expected 6"):
        count_macs(config, (300, 200))
    with pytest.raises(ToolchainError, match="above max_seq_length 128"):
        count_macs(config, (200,) * 6, max_seq_length=128)
    with pytest.raises(ToolchainError, match="unknown head"):
        count_macs(config, None, head="ner")


@pytest.mark.parametrize("lengths", [None, (12, 7, 7, 2)])
def test_matmul_part_matches_torch_flop_counter(lengths):
    """The wrapper really runs the counted linear/matmul work (FlopCounterMode counts 2 FLOPs per MAC)."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LengthAdaptiveModel(BertForQuestionAnswering(config).eval())
    seq = 16
    ids = torch.randint(1, 50, (1, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, torch.ones_like(ids), length_config=lengths)
    # Remove LayerNorms and the mask mul, which the flop counter does not see; add the token-significance
    # MatMul (mask @ probs, heads x n x n per dropping layer) and the answer guard's QA head on the states entering
    # each dropping layer (n x hidden x 2), which LAT's count leaves out.
    n, norms, significance = seq, seq * 16 + seq, 0
    for keep in lengths or (seq,) * 4:
        norms += n * 16 + min(keep, n) * 16
        significance += 2 * n * n + n * 16 * 2 if keep < n else 0
        n = min(keep, n)
    assert counter.get_total_flops() == 2 * (count_macs(config, lengths, max_seq_length=seq) - norms + significance)
