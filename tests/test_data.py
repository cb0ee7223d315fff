"""SQuAD and classification readers, feature building round trip, and post-processing."""

import gzip
import json

import numpy as np
import pytest

from toolchain.data import SQUAD_DEV_SLICE, SQUAD_TRAIN_SLICE, SST2_DEV_SLICE
from toolchain.data.classify import encode_texts, label_list, load_classification
from toolchain.data.squad import build_features, load_squad, postprocess
from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError
from toolchain.models import default_model_dir


def test_slices_load():
    dev = load_squad(SQUAD_DEV_SLICE)
    train = load_squad(SQUAD_TRAIN_SLICE)
    assert len(dev) >= 300 and len(train) >= 500
    assert all(ex.context[s:s + len(a)] == a for ex in train for a, s in zip(ex.answers, ex.answer_starts))


def test_plain_json_and_gz_agree(tmp_path):
    plain = tmp_path / "dev.json"
    plain.write_bytes(gzip.open(SQUAD_DEV_SLICE).read())
    assert load_squad(plain) == load_squad(SQUAD_DEV_SLICE)


@pytest.mark.parametrize("seq, stride", [(384, 128), (128, 32)])
def test_answer_span_survives_tokenization(tokenizer, seq, stride):
    examples = load_squad(SQUAD_TRAIN_SLICE)[:150]
    feats = build_features(examples, tokenizer, seq, stride)
    assert feats.input_ids.shape == (len(feats), seq)
    found = 0
    for f in range(len(feats)):
        s, e = feats.start_positions[f], feats.end_positions[f]
        if s == 0:
            continue
        ex = examples[feats.example_index[f]]
        a0 = ex.answer_starts[0]
        a1 = a0 + len(ex.answers[0])
        # the span's first token holds the answer's first character, its last token the last one
        assert feats.offsets[f, s, 0] <= a0 < feats.offsets[f, s, 1]
        assert feats.offsets[f, e, 0] < a1 <= feats.offsets[f, e, 1]
        assert ex.answers[0] in ex.context[feats.offsets[f, s, 0]:feats.offsets[f, e, 1]]
        found += 1
    if seq == 128:
        assert len(feats) > len(examples)  # long contexts split into several windows
    # every example has its answer inside at least one window
    with_answer = {feats.example_index[f] for f in range(len(feats)) if feats.start_positions[f] > 0}
    assert len(with_answer) >= 0.98 * len(examples) and found >= len(examples)


def test_balanced_windows(tokenizer):
    examples = load_squad(SQUAD_DEV_SLICE)[:120]
    bal = build_features(examples, tokenizer, 128, 32)
    std = build_features(examples, tokenizer, 128, 32, balanced=False)
    real = lambda f: f.attention_mask.sum(1)  # noqa: E731
    assert np.array_equal(np.bincount(bal.example_index), np.bincount(std.example_index))  # as many windows each
    split = 0
    for i, ex in enumerate(examples):
        b, s = np.nonzero(bal.example_index == i)[0], np.nonzero(std.example_index == i)[0]
        if len(s) == 1:  # a context that fits is left alone
            assert np.array_equal(bal.input_ids[b], std.input_ids[s]) and np.array_equal(bal.offsets[b], std.offsets[s])
            continue
        split += 1
        # windows as even as the tokens allow (the last shorter by less than one token a window), never longer
        # than BERT's full ones
        assert real(bal)[b].max() <= real(std)[s].max() and np.ptp(real(bal)[b[:-1]]) == 0
        assert np.ptp(real(bal)[b]) < len(b)
        # the same context tokens, consecutive windows sharing doc_stride of them
        spans = [{tuple(o) for o in bal.offsets[w] if o[0] >= 0} for w in b]
        assert set().union(*spans) == set().union(*({tuple(o) for o in std.offsets[w] if o[0] >= 0} for w in s))
        assert all(len(x & y) == 32 for x, y in zip(spans, spans[1:]))
        # padding after the real tokens
        for w in b:
            n = real(bal)[w]
            assert bal.attention_mask[w, :n].all() and (bal.input_ids[w, n:] == tokenizer.pad_token_id).all()
            assert (bal.offsets[w, n:] == -1).all()
    assert split >= 20
    ids = [e.id for e in examples]
    assert postprocess(examples, bal, *(np.zeros(bal.input_ids.shape),) * 2).keys() == set(ids)


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
    """A RoBERTa-style tokenizer (byte-level BPE, <s> </s></s> pairs, pad id 1) trained on the packaged slice."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    examples = load_squad(SQUAD_DEV_SLICE)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([ex.context for ex in examples] + [ex.question for ex in examples], vocab_size=600,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    folder = tmp_path_factory.mktemp("bpe")
    RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                         cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["wordpiece", "byte-level-bpe"])
def test_features_match_transformers_own_tokenizer_call(kind, bpe_tokenizer_dir):
    """Features come from `tokenizers` directly (so serving needs no transformers); they are what transformers' call
    gives, whether the tokenizer was read from the folder or taken from transformers (whose settings it leaves)."""
    from transformers import AutoTokenizer

    folder = default_model_dir() if kind == "wordpiece" else bpe_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = load_squad(SQUAD_DEV_SLICE)[:60]
    enc = tokenizer([ex.question for ex in examples], [ex.context for ex in examples], truncation="only_second",
                    max_length=96, stride=24, return_overflowing_tokens=True, return_offsets_mapping=True)
    assert len(enc["input_ids"]) > 100  # many contexts need several windows at 96 tokens
    for source in (tokenizer, TextTokenizer.load(folder)):
        feats = build_features(examples, source, 96, 24, balanced=False)
        assert feats.example_index.tolist() == enc["overflow_to_sample_mapping"]
        for i, ids in enumerate(enc["input_ids"]):
            n = len(ids)
            assert feats.input_ids[i, :n].tolist() == ids and (feats.input_ids[i, n:] == tokenizer.pad_token_id).all()
            types = enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * n  # RoBERTa's: none, or all 0
            assert feats.token_type_ids is None or feats.token_type_ids[i, :n].tolist() == types
            assert feats.attention_mask[i].sum() == n
            context = [s == 1 for s in enc.sequence_ids(i)]
            assert feats.offsets[i, :n][context].tolist() == [list(o) for o, c in zip(enc["offset_mapping"][i], context) if c]
            assert (feats.offsets[i, :n][~np.array(context)] == -1).all()
    texts = ["a gorgeous, witty film", ("it rains", "the film is dull, " * 20), "é" * 40]
    for source in (tokenizer, TextTokenizer.load(folder)):
        got = encode_texts(source, texts, 24)
        for i, t in enumerate(texts):
            want = tokenizer(*((t, None) if isinstance(t, str) else t), truncation=True, max_length=24, padding="max_length")
            assert {k: got[k][i].tolist() for k in want} == dict(want)
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(500, stride=3)
    backend.no_padding()
    before = (backend.truncation, backend.padding)
    encode_texts(tokenizer, texts, 24)
    assert (backend.truncation, backend.padding) == before  # the shared backend is left as it was


def test_left_padding_tokenizer_is_refused(tokenizer):
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ToolchainError, match="pads on the right"):
            build_features(load_squad(SQUAD_DEV_SLICE)[:2], tokenizer, 128, 32)
    finally:
        tokenizer.padding_side = "right"


def test_postprocess_recovers_gold_span_from_peaked_logits(tokenizer):
    examples = load_squad(SQUAD_DEV_SLICE)[:40]
    feats = build_features(examples, tokenizer, 128, 32)
    # logits peaked on each window's gold span: the best span over all windows is the gold answer
    start = np.full(feats.input_ids.shape, -10.0)
    end = np.full(feats.input_ids.shape, -10.0)
    rows = np.arange(len(feats))
    has = feats.start_positions > 0
    start[rows[has], feats.start_positions[has]] = 10.0
    end[rows[has], feats.end_positions[has]] = 10.0
    preds = postprocess(examples, feats, start, end)
    for ex in examples:
        assert ex.answers[0] in preds[ex.id]["text"] and len(preds[ex.id]["text"]) < len(ex.answers[0]) + 15


def test_postprocess_respects_max_answer_length(tokenizer):
    examples = load_squad(SQUAD_DEV_SLICE)[:1]
    feats = build_features(examples, tokenizer, 384, 128)
    ctx = np.nonzero(feats.offsets[0, :, 0] >= 0)[0]
    start = np.zeros(feats.input_ids.shape)
    end = np.zeros(feats.input_ids.shape)
    start[0, ctx[0]] = 5.0
    end[0, ctx[40]] = 5.0  # 41 tokens: too long, must not be chosen
    pred = postprocess(examples, feats, start, end, max_answer_length=30)[examples[0].id]
    assert pred["end"] - pred["start"] > 0
    span_tokens = ((feats.offsets[0, :, 0] >= pred["start"]) & (feats.offsets[0, :, 1] <= pred["end"])
                   & (feats.offsets[0, :, 0] >= 0)).sum()
    assert span_tokens <= 30


def test_sst2_slice():
    examples = load_classification(SST2_DEV_SLICE)
    assert len(examples) == 400 and label_list(examples) == ["0", "1"]


def test_sentence_pair_tsv_and_headerless_csv(tmp_path):
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA person rests.\tentailment\n"
                   "1\tIt rains.\tThe sun shines.\tnot_entailment\n")
    ex = load_classification(rte, ("sentence1", "sentence2"))
    assert ex[0].text_pair == "A person rests." and label_list(ex) == ["entailment", "not_entailment"]
    ag = tmp_path / "ag.csv"
    ag.write_text('"3","Wall St. Bears Claw Back","Short-sellers, Wall Street\'s dwindling band"\n'
                  '"4","Carlyle Looks Toward","Private investment firm, Carlyle"\n')
    ex = load_classification(ag, ("1", "2"), "0", header=False)
    assert ex[0].text == "Wall St. Bears Claw Back" and ex[0].text_pair.startswith("Short-sellers, Wall")
    assert label_list(ex) == ["3", "4"]


def test_mrpc_style_quotes_in_tsv(tmp_path):
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said "yes".\t"Yes," he said.\n')
    ex = load_classification(mrpc, ("#1 String", "#2 String"), "Quality")
    assert ex[0].text == 'He said "yes".' and ex[0].text_pair == '"Yes," he said.'


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\n", "holds no examples"),
    ("sentence\tscore\nfine movie\t1\n", "no column 'label'"),
])
def test_classification_errors(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ToolchainError, match=message):
        load_classification(path)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "cannot read SQuAD file"),
    (json.dumps({"version": "1.1", "articles": []}).encode(), "not in SQuAD layout"),
    (json.dumps({"data": [{"paragraphs": [{"context": "x"}]}]}).encode(), "missing field 'qas'"),
])
def test_squad_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ToolchainError, match=message):
        load_squad(path)


def test_squad_missing_and_corrupt_gz(tmp_path):
    with pytest.raises(ToolchainError, match="not found"):
        load_squad(tmp_path / "nope.json.gz")
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ToolchainError, match="cannot read SQuAD file"):
        load_squad(bad)


def test_feature_length_errors(tokenizer):
    examples = load_squad(SQUAD_DEV_SLICE)[:5]
    with pytest.raises(ToolchainError, match="doc_stride .* must be smaller"):
        build_features(examples, tokenizer, 128, 128)
    with pytest.raises(ToolchainError, match="too small"):
        build_features(examples, tokenizer, 24, 8)
