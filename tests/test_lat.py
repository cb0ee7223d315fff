"""Length-adaptive drop-and-restore wrapper: exactness, a slow reference, padding/CLS handling, ONNX export."""

import copy
import math
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
)

from toolchain.errors import ToolchainError
from toolchain.evaluate import session_runner
from toolchain.export import _export_graph
from toolchain.lat import (
    PROTECT_ANSWERS,
    FixedLengthModel,
    LengthAdaptiveModel,
    parse_length_config,
    sample_layer_mask,
    sample_length_config,
    smallest_length_config,
)

SEQ = 24
REAL = (24, 17, 9)  # real tokens per sample of the padded test batch
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, attn_implementation="eager")


def bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=100, **{**TINY, **kw})


def make(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


def padded_batch(real=REAL, seq=SEQ, pad_id=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(real), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(real)[:, None]).long()
    types = ((torch.arange(seq)[None, :] >= torch.tensor(real)[:, None] // 2) & (mask > 0)).long()
    return ids.masked_fill(mask == 0, pad_id), mask, types


@pytest.fixture(scope="module")
def qa():
    return make(BertForQuestionAnswering, bert_config())


@pytest.fixture(scope="module")
def qa64():
    """Float64 copy with larger weights: significance ties cannot flip between implementations."""
    return make(BertForQuestionAnswering, bert_config(initializer_range=0.2)).double()


@torch.no_grad()
def test_full_equals_hf_qa(qa):
    ids, mask, types = padded_batch()
    ref = qa(input_ids=ids, attention_mask=mask, token_type_ids=types)
    wrapper = LengthAdaptiveModel(qa)
    assert wrapper.task == "qa" and wrapper.num_layers == 4 and wrapper.hf_model is qa and not wrapper.keep_cls
    for cfg in (None, "full", (SEQ,) * 4, (64,) * 4):  # entries >= current length drop nothing
        out = wrapper(ids, mask, types, length_config=cfg)
        assert torch.allclose(out.start_logits, ref.start_logits, atol=1e-5, rtol=0)
        assert torch.allclose(out.end_logits, ref.end_logits, atol=1e-5, rtol=0)
        assert out.kept_positions is None


@pytest.mark.parametrize("cls", [BertForSequenceClassification, RobertaForSequenceClassification, RobertaForQuestionAnswering])
@torch.no_grad()
def test_full_equals_hf_other_models(cls):
    if cls.__name__.startswith("Roberta"):
        config = RobertaConfig(vocab_size=100, num_labels=3 if "Classification" in cls.__name__ else 2,
                               pad_token_id=1, type_vocab_size=1, **TINY)
        ids, mask, _ = padded_batch(pad_id=1)
        types = None
    else:
        config = bert_config(num_labels=3)
        ids, mask, types = padded_batch()
    model = make(cls, config)
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = LengthAdaptiveModel(model)(ids, mask, types)
    for name in ("logits",) if "Classification" in cls.__name__ else ("start_logits", "end_logits"):
        assert torch.allclose(out[name], ref[name], atol=1e-5, rtol=0), name


@torch.no_grad()
def reference_lat(model, ids, mask, types, lengths, keep_cls, guard=0):
    """Slow reference: one unpadded sample at a time, Python loops, HF layer modules called directly; `guard`: the
    QA head's top `guard` start and end positions on the states entering a layer outrank the rest there."""
    base, starts, ends = model.base_model, [], []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        state = base.embeddings(input_ids=ids[b:b + 1, :n], token_type_ids=types[b:b + 1, :n])[0]  # latest per token
        alive = list(range(n))
        for layer, keep in zip(base.encoder.layer, lengths):
            attn_out, probs = layer.attention(state[alive].unsqueeze(0), output_attentions=True)[:2]
            attn_out = attn_out[0]
            if keep < len(alive):
                significance = probs[0].sum(dim=(0, 1)).tolist()  # over heads and queries
                head = model.qa_outputs(state[alive])  # [alive, 2]
                guarded = {j for column in head.T for j in column.argsort(descending=True)[:guard].tolist()}
                ranked = sorted(range(len(alive)), key=lambda j: (not (keep_cls and alive[j] == 0), j not in guarded,
                                                                   -significance[j]))
                chosen = sorted(ranked[:keep])
                alive, attn_out = [alive[j] for j in chosen], attn_out[chosen]
            state = state.clone()
            state[alive] = layer.feed_forward_chunk(attn_out)
        logits = model.qa_outputs(state)
        starts.append(logits[:, 0])
        ends.append(logits[:, 1])
    return starts, ends


@pytest.mark.parametrize("guard", [0, 2])
@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("lengths", [(20, 14, 9, 5), (24, 12, 12, 3), (10, 10, 2, 1), (17, 9, 9, 9)])
@torch.no_grad()
def test_matches_slow_reference(qa64, lengths, keep_cls, guard):
    ids, mask, types = padded_batch()
    out = LengthAdaptiveModel(qa64, keep_cls=keep_cls, protect_answers=guard)(ids, mask, types, length_config=lengths)
    starts, ends = reference_lat(qa64, ids, mask, types, lengths, keep_cls, guard)
    for b, n in enumerate(REAL):
        torch.testing.assert_close(out.start_logits[b, :n], starts[b], atol=1e-10, rtol=0)
        torch.testing.assert_close(out.end_logits[b, :n], ends[b], atol=1e-10, rtol=0)
    # Dropping actually changed something compared with the full model.
    full = LengthAdaptiveModel(qa64)(ids, mask, types)
    assert not torch.allclose(out.start_logits[0], full.start_logits[0])


@torch.no_grad()
def test_padding_dropped_first(qa):
    ids, mask, types = padded_batch()
    out = LengthAdaptiveModel(qa)(ids, mask, types, length_config=(9, 9, 9, 9))
    kept = out.kept_positions
    assert kept.shape == (3, 9)
    assert torch.equal(kept[2], torch.arange(9))  # exactly the 9 real tokens of the shortest sample
    assert (kept[1] < 17).all()  # the 17-token sample keeps only real tokens
    assert (kept[:, 1:] > kept[:, :-1]).all()  # positional order preserved


@torch.no_grad()
def test_answer_guard(qa):
    """The QA head's top start/end positions on the states entering a dropping layer survive its drop."""
    ids, mask, types = padded_batch()
    embeddings = qa.bert.embeddings(input_ids=ids, token_type_ids=types)
    head = qa.qa_outputs(embeddings).masked_fill(mask[..., None] == 0, -math.inf)  # [B, L, 2]
    lengths = (6, 6, 6, 6)  # only the first layer drops, so the kept positions are its choice
    guarded = LengthAdaptiveModel(qa, protect_answers=2)(ids, mask, types, length_config=lengths).kept_positions
    plain = LengthAdaptiveModel(qa, protect_answers=0)(ids, mask, types, length_config=lengths).kept_positions
    for b in range(len(REAL)):
        top = set(head[b].topk(2, dim=0).indices.flatten().tolist())
        assert top <= set(guarded[b].tolist())
    assert not torch.equal(guarded, plain)  # the guard changed what was kept
    assert LengthAdaptiveModel(qa).protect_answers == PROTECT_ANSWERS
    assert LengthAdaptiveModel(qa).guarded(0).protect_answers == 0
    clf = make(BertForSequenceClassification, bert_config(num_labels=3))
    assert LengthAdaptiveModel(clf).protect_answers == 0
    with pytest.raises(ToolchainError, match="needs a question-answering model"):
        LengthAdaptiveModel(clf, protect_answers=4)
    with pytest.raises(ToolchainError, match="whole number >= 0"):
        LengthAdaptiveModel(qa, protect_answers=-1)


@torch.no_grad()
def test_keep_cls():
    clf = make(BertForSequenceClassification, bert_config(num_labels=3))
    ids, mask, types = padded_batch()
    wrapper = LengthAdaptiveModel(clf)
    assert wrapper.task == "classify" and wrapper.keep_cls
    for lengths in ((12, 6, 3, 1), (2, 2, 2, 2)):
        out = wrapper(ids, mask, types, length_config=lengths)
        assert (out.kept_positions[:, 0] == 0).all()
        assert out.logits.shape == (3, 3)
    qa_cls = LengthAdaptiveModel(make(BertForQuestionAnswering, bert_config()), keep_cls=True)
    assert (qa_cls(ids, mask, types, length_config=(1, 1, 1, 1)).kept_positions == 0).all()


@pytest.mark.parametrize(
    "value, message",
    [
        ("10,9", "has 2 entries, expected 4"),
        ((10, 9, 8, 7, 6), "has 5 entries, expected 4"),
        ("10,12,8,4", "non-increasing: entry 1 (12) > entry 0 (10)"),
        ("10,0,0,0", "entry 1 is 0: token counts must be positive"),
        ((10, 8, -2, -3), "entry 2 is -2: token counts must be positive"),
        ("100,8,4,2", "entry 0 is 100: above max_seq_length 64"),
        ("10,a,4,2", "entry 'a' is not an integer"),
        ((10, 8.5, 4, 2), "entry 8.5 is not an integer"),
        ("", "length config is empty"),
        (12, "must be a comma-separated string or a sequence of ints"),
    ],
)
def test_parse_length_config_errors(value, message):
    with pytest.raises(ToolchainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_length_config(value, num_layers=4, max_seq_length=64)


def test_parse_length_config_valid():
    assert parse_length_config(None, 4, 64) is None
    assert parse_length_config(" Full ", 4, 64) is None
    assert parse_length_config("40, 30,30,2", 4, 64) == (40, 30, 30, 2)
    assert parse_length_config("(64,30,30,2)", 4, 64) == (64, 30, 30, 2)
    assert parse_length_config(np.array([8, 4, 2, 1]), 4, 64) == (8, 4, 2, 1)
    assert parse_length_config("269,253,252,202,104,34", 6, 384) == (269, 253, 252, 202, 104, 34)


@torch.no_grad()
def test_layer_mask(qa):
    ids, mask, types = padded_batch()
    wrapper = LengthAdaptiveModel(qa)
    shallow = copy.deepcopy(qa)
    del shallow.bert.encoder.layer[1]
    ref = shallow(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = wrapper(ids, mask, types, layer_mask=[True, False, True, True])
    assert torch.allclose(out.start_logits, ref.start_logits, atol=1e-5, rtol=0)
    # Every layer skipped: the head sees the embeddings unchanged.
    none = wrapper(ids, mask, types, layer_mask=[False] * 4)
    emb = qa.qa_outputs(qa.bert.embeddings(input_ids=ids, token_type_ids=types))
    assert torch.allclose(none.start_logits, emb[..., 0], atol=1e-6, rtol=0)
    # A skipped layer drops no tokens either.
    out = wrapper(ids, mask, types, length_config=(20, 10, 10, 10), layer_mask=[False, True, True, True])
    assert out.kept_positions.shape == (3, 10)
    with pytest.raises(ToolchainError, match="layer mask has 3 entries, expected 4"):
        wrapper(ids, mask, types, layer_mask=[True] * 3)


def test_training_backward():
    model = make(BertForQuestionAnswering, bert_config(hidden_dropout_prob=0.1)).train()
    ids, mask, types = padded_batch()
    out = LengthAdaptiveModel(model)(ids, mask, types, length_config=(20, 14, 9, 5), layer_mask=[True, True, False, True])
    (out.start_logits.sum() + out.end_logits.sum()).backward()
    assert model.bert.encoder.layer[3].intermediate.dense.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[2].intermediate.dense.weight.grad is None  # skipped by LayerDrop


def test_unsupported_model():
    with pytest.raises(ToolchainError, match="is not supported"):
        LengthAdaptiveModel(make(BertModel, bert_config()))


@torch.no_grad()
def test_fixed_length_model_tuples(qa):
    ids, mask, types = padded_batch()
    fixed = FixedLengthModel(LengthAdaptiveModel(qa), "20,14,9,5")
    start, end = fixed(ids, mask, types)
    out = LengthAdaptiveModel(qa)(ids, mask, types, length_config=(20, 14, 9, 5))
    assert torch.equal(start, out.start_logits) and torch.equal(end, out.end_logits)
    clf = FixedLengthModel(LengthAdaptiveModel(make(BertForSequenceClassification, bert_config(num_labels=3))), None)
    (logits,) = clf(ids, mask, types)
    assert logits.shape == (3, 3)
    with pytest.raises(ToolchainError, match="expected 4"):
        FixedLengthModel(LengthAdaptiveModel(qa), "20,14")


def kept_counts(graph) -> set[int]:
    """Token counts baked into a graph: the ends of the Slices that cut a TopK's (descending) indices."""
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    indices = {n.output[1] for n in graph.node if n.op_type == "TopK"}
    return {int(consts[n.input[2]].item()) for n in graph.node if n.op_type == "Slice" and n.input[0] in indices}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("guard", [0, 3, 12])  # 12: more than the shortest row's 9 real tokens
def test_onnx_export_matches_pytorch_at_any_length(qa, tmp_path, guard):
    lengths = (20, 14, 9, 5)
    fixed = FixedLengthModel(LengthAdaptiveModel(qa, protect_answers=guard), lengths).eval()
    ids, mask, types = padded_batch()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = {n: t.numpy() for n, t in zip(names, (ids, mask, types))}
    path = tmp_path / "lat.onnx"
    _export_graph(fixed, inputs, ["start_logits", "end_logits"], path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} == {""}
    assert kept_counts(model.graph) == set(lengths)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        padded = fixed(ids, mask, types)
    # batch 3 at full length; one row cut to its 17 real tokens (keeps 17, then drops real tokens to 14, 9, 5);
    # the two rows of at most 17 tokens cut to 17
    for rows, width in ((slice(0, 3), SEQ), (slice(1, 2), REAL[1]), (slice(1, 3), REAL[1])):
        feed = {n: v[rows, :width] for n, v in inputs.items()}
        with torch.no_grad():
            eager = fixed(*(torch.from_numpy(v) for v in feed.values()))
        for got, cut, full in zip(session.run(None, feed), eager, padded):
            assert got.shape == (len(feed["input_ids"]), width)
            np.testing.assert_allclose(got, cut.numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(got, full[rows, :width].numpy(), atol=1e-4, rtol=0)


def test_sample_length_config():
    rng = random.Random(0)
    for bound in (0.0, 0.2, 0.5):
        for _ in range(50):
            cfg = sample_length_config(6, 384, bound, rng, min_len=2)
            assert len(cfg) == 6
            prev = 384
            for n in cfg:
                assert max(math.ceil(prev * (1 - bound) - 1e-9), 2) <= n <= prev
                prev = n
    assert sample_length_config(4, 384, 0.0, rng) == (384,) * 4
    assert sample_length_config(6, 64, 0.3, random.Random(7)) == sample_length_config(6, 64, 0.3, random.Random(7))
    gen_cfg = sample_length_config(6, 64, 0.3, np.random.default_rng(0))
    assert all(isinstance(n, int) for n in gen_cfg) and list(gen_cfg) == sorted(gen_cfg, reverse=True)
    with pytest.raises(ToolchainError, match="length_drop_ratio_bound"):
        sample_length_config(6, 64, 1.5, rng)


def test_smallest_length_config():
    assert smallest_length_config(4, 384, 0.2) == (308, 247, 198, 159)
    assert smallest_length_config(2, 100, 0.2) == (80, 64)  # no float-rounding overshoot
    assert smallest_length_config(6, 10, 0.5, min_len=2) == (5, 3, 2, 2, 2, 2)
    rng = random.Random(1)
    smallest = smallest_length_config(6, 128, 0.25)
    for _ in range(30):
        assert all(s <= n for s, n in zip(smallest, sample_length_config(6, 128, 0.25, rng)))


def test_sample_layer_mask():
    rng = random.Random(0)
    assert sample_layer_mask(5, 0.0, rng) == (True,) * 5
    assert sample_layer_mask(5, 1.0, rng) == (False,) * 5
    kept = sum(sum(sample_layer_mask(10, 0.3, rng)) for _ in range(200))
    assert 0.6 < kept / 2000 < 0.8
    with pytest.raises(ToolchainError, match="layer_drop_prob"):
        sample_layer_mask(4, -0.1, rng)


@pytest.mark.timeout(20)
def test_session_runner_pads_cut_batches_for_a_fixed_length_graph(qa, tmp_path):
    """Bundles exported before graphs took any length keep working: shorter batches are padded up and cut back."""
    fixed = FixedLengthModel(LengthAdaptiveModel(qa), (20, 14, 9, 5)).eval()
    ids, mask, types = padded_batch()
    inputs = {n: t.numpy() for n, t in zip(("input_ids", "attention_mask", "token_type_ids"), (ids, mask, types))}
    _export_graph(fixed, inputs, ["start_logits", "end_logits"], tmp_path / "any.onnx")
    model = onnx.load(str(tmp_path / "any.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[1].dim_value = SEQ
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    any_length, fixed_length = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                                for f in ("any.onnx", "fixed.onnx"))
    feed = {k: v[1:, :REAL[1]] for k, v in inputs.items()}
    with pytest.raises(Exception, match="dimensions"):
        fixed_length.run(None, feed)
    for got, want in zip(session_runner(fixed_length)(feed), session_runner(any_length)(feed)):
        assert got.shape == want.shape == (2, REAL[1])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
