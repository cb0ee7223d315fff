"""GEEP on tiny models: shared-exit-loss training, exit labels, the token exit table and its ONNX graph,
bucketed inference, per-depth ONNX graphs and the FastBERT baseline."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from conftest import make_tiny_model_dir
from toolchain.data import SST2_DEV_SLICE, SST2_TRAIN_SLICE
from toolchain.data.prepare import Columns, classify_split
from toolchain.errors import ToolchainError
from toolchain.exit_batching import bucketed_predict, full_depth_predict, ort_depth_runner, ort_exit_predictor
from toolchain.exit_predictor import ExitTable, exit_accuracy, export_predictor_onnx
from toolchain.geep import (GeepModel, depth_accuracy, exit_layers, load_geep, normalized_entropy, shared_exit_loss,
                            train_geep)
from toolchain.geep_runtime import (LayerStepper, OrtLayerStepper, _folds, export_depth_graphs, fastbert_predict,
                                    profile_exits, sweep_geep, torch_depth_runner)
from toolchain.training import TrainConfig, train


def tiny_geep(layers: int = 3, seed: int = 0) -> GeepModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return GeepModel(BertForSequenceClassification(config)).eval()


def padded_batch(n: int = 7, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, size=(n, length))
    ids[:, 0] = 1
    lengths = rng.integers(3, length + 1, size=n)
    mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def geep():
    return tiny_geep()


# --- the model ---

def test_layer_loop_matches_hf_encoder_and_checks_depth():
    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64)).eval()
    model = GeepModel(hf).eval()
    batch = tensors(padded_batch())
    with torch.no_grad():
        want = hf.bert(**batch).last_hidden_state
        got = model.hidden_states(**batch)[-1]
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        teacher = model.all_depth_logits(**batch)
        assert teacher.shape == (2, 7, 2) and model.student_logits(**batch).shape == (2, 7, 2)
        np.testing.assert_allclose(model(**batch, depth=1).numpy(), teacher[0].numpy(), atol=1e-6)
    for bad in (0, 3, 1.5):
        with pytest.raises(ToolchainError, match="depth"):
            model(**batch, depth=bad)


def test_mean_pooling_ignores_padding_and_cls_pooling_reads_first_token():
    batch = padded_batch(n=4, length=10)
    longer = {k: np.pad(v, ((0, 0), (0, 6))) for k, v in batch.items()}  # 6 more padding positions
    for pooling in ("mean", "cls"):
        torch.manual_seed(0)
        hf = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64))
        model = GeepModel(hf, pooling=pooling).eval()
        with torch.no_grad():
            a, b = model(**tensors(batch)), model(**tensors(longer))
            states = model.hidden_states(**tensors(batch))[-1]
            mask = torch.from_numpy(batch["attention_mask"]).float()[..., None]
            pooled = (states * mask).sum(1) / mask.sum(1) if pooling == "mean" else states[:, 0]
            head = model.teacher
            want = head.out(torch.tanh(head.dense(pooled)))
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        np.testing.assert_allclose(a.numpy(), want.numpy(), atol=1e-5)
    with pytest.raises(ToolchainError, match="pooling"):
        GeepModel(hf, pooling="max")


def test_shared_exit_loss_training_lowers_teacher_loss_at_every_depth(tokenizer, tmp_path):
    from toolchain.models import load_model

    model_dir = make_tiny_model_dir(tmp_path / "bert", layers=3)
    labels, data = classify_split(SST2_TRAIN_SLICE, tokenizer, 32, None, Columns(), n=32, seed=0)
    model = GeepModel(load_model(model_dir, "classify", labels))
    batch = tensors(data)

    def losses() -> tuple[list[float], float]:
        model.eval()
        with torch.no_grad():
            teacher = model.all_depth_logits(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            students = model.student_logits(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ce = [F.cross_entropy(t, batch["labels"]).item() for t in teacher]
        target = teacher[-1].softmax(-1)
        kl = np.mean([F.kl_div(s.log_softmax(-1), target, reduction="batchmean").item() for s in students])
        return ce, float(kl)

    ce_before, _ = losses()
    train(model, data, shared_exit_loss, TrainConfig(epochs=15, lr=5e-3, batch_size=16, warmup_ratio=0.0),
          torch.device("cpu"), tmp_path / "state", desc="test")
    ce_after, kl_after = losses()
    assert len(ce_after) == 3
    for depth, (before, after) in enumerate(zip(ce_before, ce_after), start=1):
        assert after < 0.5 * before, f"depth {depth}: CE {before:.3f} -> {after:.3f}"
    assert kl_after < 0.1  # the students follow the (now confident) full-depth teacher
    with pytest.raises(ToolchainError, match="depth weights"):
        shared_exit_loss(model, batch, weights=[1.0, 0.0])


# --- exit labels ---

def test_normalized_entropy_and_exit_layers():
    np.testing.assert_allclose(normalized_entropy(np.array([[0.0, 0.0], [3.0, 3.0]])), [1.0, 1.0])
    assert normalized_entropy(np.array([20.0, -20.0])) < 1e-6
    p = 1 / (1 + np.exp(-1.0))  # logits [1, 0]
    np.testing.assert_allclose(normalized_entropy(np.array([1.0, 0.0])), -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2))

    sure, unsure, middling = [8.0, -8.0], [0.0, 0.0], [1.0, 0.0]  # normalized entropy ~0.003, 1, 0.84
    logits = np.array([  # [layers=3, samples=4, classes=2]
        [sure, unsure, unsure, middling],
        [sure, sure, unsure, middling],
        [sure, sure, unsure, sure],
    ])
    np.testing.assert_array_equal(exit_layers(logits, 0.5), [1, 2, 3, 3])
    np.testing.assert_array_equal(exit_layers(logits, 0.9), [1, 2, 3, 1])
    np.testing.assert_array_equal(exit_layers(logits, 0.0), [3, 3, 3, 3])
    np.testing.assert_array_equal(exit_layers(logits, 1.0), [1, 2, 3, 1])  # a uniform layer never exits
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ToolchainError, match="speed"):
            exit_layers(logits, bad)


# --- the exit table ---

SPECIAL = (0, 1, 2)  # pad, [CLS], [SEP]


def hand_table(**kw) -> ExitTable:
    ids = np.array([[1, 5, 6, 2, 0], [1, 5, 7, 2, 0], [1, 8, 8, 2, 0]])
    mask = (ids > 0).astype(np.int64)
    mask[:, 0] = 1
    return ExitTable(vocab_size=10, num_layers=4, **kw).fit(ids, mask, np.array([1, 3, 4]), SPECIAL)


# queries: ids, mask, and the hand-computed mean / max predictions. Token expected exits:
# 5 -> (1+3)/2 = 2, 6 -> 1, 7 -> 3, 8 -> 4; unseen -> default = mean label (1+3+4)/3 = 2.67.
QUERIES = np.array([[1, 5, 7, 8, 2], [1, 6, 6, 5, 2], [1, 9, 2, 0, 0], [1, 9, 6, 2, 0], [1, 2, 0, 0, 0], [1, 6, 2, 8, 8]])
QUERY_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
MEAN = [3, 1, 3, 2, 3, 1]  # 9/3; 4/3; default 2.67; (2.67+1)/2 = 1.83; no tokens: default; padding ignored: 1
MAX = [4, 2, 3, 3, 3, 1]


def test_exit_table_counts_and_hand_computed_predictions():
    table = hand_table()
    np.testing.assert_array_equal(table.counts[5], [1, 0, 1, 0])
    np.testing.assert_array_equal(table.counts[8], [0, 0, 0, 2])
    assert table.counts[list(SPECIAL)].sum() == 0 and table.counts.sum() == 6
    assert table.default == pytest.approx(8 / 3)
    np.testing.assert_allclose(table.token_exits()[[5, 6, 7, 8, 9]], [2, 1, 3, 4, 8 / 3], rtol=1e-6)

    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), MEAN)
    table.set_aggregation("max")
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), MAX)
    table.set_aggregation("quantile:0.5")  # medians: 3, 1, 2.67, 1.83, default, 1
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), [3, 1, 3, 2, 3, 1])
    table.set_aggregation("quantile:1")
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), MAX)
    table.set_aggregation("mean", shift=-1.0)
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), [2, 1, 2, 1, 2, 1])  # 0.33 / 0.83 clip to 1
    table.set_aggregation("mean", shift=5.0)
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), [4] * 6)
    assert ExitTable(10, 4).predict(QUERIES, QUERY_MASK).tolist() == [4] * 6  # empty table: full depth

    for bad in ("median", "quantile:1.5", "quantile:x"):
        with pytest.raises(ToolchainError, match="aggregation"):
            table.set_aggregation(bad)
    with pytest.raises(ToolchainError, match="exit labels"):
        ExitTable(10, 4).fit(QUERIES[:1], QUERY_MASK[:1], np.array([5]))
    with pytest.raises(ToolchainError, match="token ids"):
        table.predict(QUERIES + 10, QUERY_MASK)


def test_exit_table_tune_save_load(tmp_path):
    table = hand_table()
    best = table.tune(QUERIES, QUERY_MASK, np.array(MAX))
    assert best["exact"] == 100.0 and best["within_1"] == 100.0
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), MAX)
    assert exit_accuracy(np.array([1, 2, 3, 4]), np.array([1, 3, 3, 1])) == {"exact": 50.0, "within_1": 75.0}

    path = table.save(tmp_path / "table.npz")
    loaded = ExitTable.load(path, tokenizer_vocab_size=10)
    assert (loaded.aggregation, loaded.shift) == (table.aggregation, table.shift)
    np.testing.assert_array_equal(loaded.counts, table.counts)
    np.testing.assert_array_equal(loaded.predict(QUERIES, QUERY_MASK), MAX)
    with pytest.raises(ToolchainError, match="vocabulary of 10 tokens, but the tokenizer has 30522"):
        ExitTable.load(path, tokenizer_vocab_size=30522)
    with pytest.raises(ToolchainError, match="not found"):
        ExitTable.load(tmp_path / "missing.npz")


def test_exit_table_tune_accuracy_takes_the_fewest_layers_within_tolerance():
    # sample n is answered right from depth NEED[n] on (the last layer gets all right): full accuracy 100
    need = np.array(MAX)
    correct = np.arange(1, 5)[None, :] >= need[:, None]
    table = hand_table()
    best = table.tune_accuracy(QUERIES, QUERY_MASK, correct, tolerance=0.0)
    # only predictions >= NEED everywhere keep 100%; the cheapest of them is NEED itself ('max', shift 0)
    np.testing.assert_array_equal(table.predict(QUERIES, QUERY_MASK), need)
    assert best["accuracy"] == best["full_accuracy"] == 100.0 and best["within_tolerance"]
    assert best["mean_exit"] == pytest.approx(need.mean())

    # a tolerance of two samples in six buys fewer layers, and the accuracy stays within it
    best = table.tune_accuracy(QUERIES, QUERY_MASK, correct, tolerance=34.0)
    pred = table.predict(QUERIES, QUERY_MASK)
    assert best["within_tolerance"] and best["mean_exit"] == pytest.approx(pred.mean()) and pred.mean() < need.mean()
    assert best["accuracy"] == pytest.approx(100.0 * (pred >= need).mean()) and best["accuracy"] >= 66.0

    # no candidate within tolerance: the most accurate one (50% vs 17%), flagged
    best = table.tune_accuracy(QUERIES, QUERY_MASK, correct, 0.0, candidates=[("mean", -3.0), ("max", -0.5)])
    assert (best["aggregation"], best["shift"], best["within_tolerance"]) == ("max", -0.5, False)
    with pytest.raises(ToolchainError, match=r"\[samples, layers\] = \[6, 4\]"):
        table.tune_accuracy(QUERIES, QUERY_MASK, correct[:, :3])
    with pytest.raises(ToolchainError, match="tolerance must be >= 0"):
        table.tune_accuracy(QUERIES, QUERY_MASK, correct, tolerance=-1.0)


@pytest.mark.parametrize("aggregation,shift", [("mean", 0.0), ("max", 0.0), ("mean", 0.5), ("max", -1.0),
                                               ("quantile:0.5", 0.0), ("quantile:0.9", -0.5), ("quantile:0", 0.0),
                                               ("quantile:1", 0.5), ("quantile:0.75", 1.0)])
def test_predictor_onnx_matches_table(tmp_path, aggregation, shift):
    table = hand_table(aggregation=aggregation, shift=shift)
    path = export_predictor_onnx(table, tmp_path / "predictor.onnx")
    graph = onnx.load(str(path))
    assert {node.domain for node in graph.graph.node} == {""}
    predict = ort_exit_predictor(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    rng = np.random.default_rng(0)
    random_ids = rng.integers(0, 10, size=(40, 9))
    random_mask = (np.arange(9) < rng.integers(1, 10, size=40)[:, None]).astype(np.int64)
    for ids, mask in ((QUERIES, QUERY_MASK), (random_ids, random_mask), (QUERIES[:1, :3], QUERY_MASK[:1, :3])):
        got = predict({"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, table.predict(ids, mask))


# --- runtime ---

def test_bucketed_predict_keeps_request_order_and_runs_each_bucket_at_its_depth():
    inputs = padded_batch(n=7)
    inputs["input_ids"][:, 1] = np.arange(7)  # request index, to see which rows each call gets
    predicted = np.array([3, 1, 2, 1, 3, 3, 1])
    calls = []

    def run_at_depth(depth, batch):
        rows = batch["input_ids"][:, 1]
        calls.append((depth, rows.tolist()))
        return np.stack([rows, np.full(len(rows), depth)], axis=1).astype(np.float32)

    logits, depths = bucketed_predict(inputs, lambda x: predicted, run_at_depth, batch_size=2)
    np.testing.assert_array_equal(depths, predicted)
    np.testing.assert_array_equal(logits, np.stack([np.arange(7), predicted], axis=1))
    assert calls == [(1, [1, 3]), (1, [6]), (2, [2]), (3, [0, 4]), (3, [5])]


def test_bucketed_predict_matches_per_sample_runs(geep):
    inputs = padded_batch(n=7)
    predicted = np.array([3, 1, 2, 1, 3, 3, 1])
    run = torch_depth_runner(geep)
    logits, _ = bucketed_predict(inputs, lambda x: predicted, run, batch_size=2)
    for i, depth in enumerate(predicted):
        single = run(int(depth), {k: v[i:i + 1] for k, v in inputs.items()})
        np.testing.assert_allclose(logits[i], single[0], atol=1e-5)
    np.testing.assert_allclose(full_depth_predict(inputs, run, 3, batch_size=3),
                               bucketed_predict(inputs, lambda x: np.full(7, 3), run, 4)[0], atol=1e-5)


def test_depth_graphs_match_pytorch_on_ort(geep, tmp_path):
    paths = export_depth_graphs(geep, tmp_path)
    assert sorted(paths) == [1, 2, 3]
    sessions = {d: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for d, p in paths.items()}
    assert all({n.domain for n in onnx.load(str(p)).graph.node} == {""} for p in paths.values())
    run_ort, run_torch = ort_depth_runner(sessions), torch_depth_runner(geep)
    for inputs in (padded_batch(n=5, length=12), padded_batch(n=1, length=20, seed=1)):  # other shapes than the export's
        for depth in paths:
            np.testing.assert_allclose(run_ort(depth, inputs), run_torch(depth, inputs), atol=1e-4, rtol=0)
    inputs, predicted = padded_batch(n=6), np.array([2, 3, 1, 1, 2, 3])
    np.testing.assert_allclose(bucketed_predict(inputs, lambda x: predicted, run_ort, 4)[0],
                               bucketed_predict(inputs, lambda x: predicted, run_torch, 4)[0], atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_fastbert_baseline_exits(geep, backend, tmp_path):
    inputs = padded_batch(n=9)
    batch = tensors(inputs)
    with torch.no_grad():
        full = geep(**batch).numpy()
        students = geep.student_logits(**batch).numpy()
    stepper = LayerStepper(geep) if backend == "torch" else OrtLayerStepper(geep, tmp_path)
    logits, depths = fastbert_predict(stepper, inputs, speed=0.0, batch_size=4)
    assert depths.tolist() == [3] * 9
    np.testing.assert_allclose(logits, full, atol=1e-4)
    logits, depths = fastbert_predict(stepper, inputs, speed=1.0, batch_size=4)
    assert depths.tolist() == [1] * 9
    np.testing.assert_allclose(logits, students[0], atol=1e-4)
    # in between, the shrinking batch exits exactly where the students' entropies say (as exit profiling does)
    ent = np.sort(normalized_entropy(students[0]))
    speed = float((ent[4] + ent[5]) / 2)  # about half leave at layer 1; midway, so no sample sits on the threshold
    logits, depths = fastbert_predict(stepper, inputs, speed=speed, batch_size=4)
    np.testing.assert_array_equal(depths, exit_layers(students, speed))
    assert 1 < len(set(depths.tolist()))
    for i, d in enumerate(depths):
        np.testing.assert_allclose(logits[i], full[i] if d == 3 else students[d - 1, i], atol=1e-4)
    with pytest.raises(ToolchainError, match="speed"):
        fastbert_predict(stepper, inputs, speed=2.0, batch_size=4)


# --- end to end: train-geep checkpoint, reload, bench ---

@pytest.fixture(scope="module")
def geep_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("geep")
    model_dir = make_tiny_model_dir(root / "bert", layers=2)
    out = root / "ckpt"
    metrics = train_geep(model_dir=model_dir, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, out_dir=out,
                         columns=Columns(), max_seq_length=32, max_train_examples=16, max_eval_examples=16,
                         cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), device_name="cpu")
    return model_dir, out, metrics


def test_train_geep_checkpoint_reloads(geep_checkpoint, tokenizer):
    model_dir, out, metrics = geep_checkpoint
    for name in ("config.json", "model.safetensors", "geep_heads.safetensors", "tokenizer.json", "toolchain.json",
                 "metrics.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".ckpt*")), "temp / resume folders must be cleaned up"
    assert len(metrics["accuracy_by_depth"]) == 2 and len(metrics["student_accuracy_by_depth"]) == 2
    assert metrics["accuracy"] == metrics["accuracy_by_depth"][-1] and metrics["steps"] == 2
    model, _, meta = load_geep(out)
    assert (meta["task"], meta["geep"], meta["num_layers"], meta["labels"]) == ("classify", True, 2, ["0", "1"])
    _, dev = classify_split(SST2_DEV_SLICE, tokenizer, 32, meta["labels"], Columns(), 16)
    assert depth_accuracy(model, dev) == {k: metrics[k] for k in ("accuracy_by_depth", "student_accuracy_by_depth")}
    with pytest.raises(ToolchainError, match="not a GEEP checkpoint"):
        load_geep(model_dir)


def test_train_geep_is_reproducible(geep_checkpoint, tmp_path):
    """Same seed, same weights: the heads are initialised from the seed, not from whatever ran before."""
    from safetensors.torch import load_file

    model_dir, out, _ = geep_checkpoint
    torch.rand(7)  # move the global RNG on
    again = tmp_path / "again"
    train_geep(model_dir=model_dir, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, out_dir=again,
               columns=Columns(), max_seq_length=32, max_train_examples=16, max_eval_examples=16,
               cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), device_name="cpu")
    first, second = load_file(str(out / "geep_heads.safetensors")), load_file(str(again / "geep_heads.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_sweep_geep(geep_checkpoint, tmp_path, backend):
    _, ckpt, metrics = geep_checkpoint
    aggregation = "auto" if backend == "torch" else "max"
    report = sweep_geep(checkpoint_dir=ckpt, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, speeds=[0.5, 0.9],
                        batches=[1, 8], out_dir=tmp_path, max_train_examples=24, max_eval_examples=16,
                        backend=backend, aggregation=aggregation, repeats=1)
    rows = report["rows"]
    assert len(rows) == 2 + 2 * 2 * 2  # full per batch; geep + fastbert per (speed, batch)
    for r in rows:
        assert 1 <= r["mean_depth"] <= 2 and r["examples_per_second"] > 0
        if r["method"] == "full":
            assert r["accuracy"] == metrics["accuracy"]  # padding trimming does not change answers
        if r["method"] == "geep":
            assert set(r["exit_accuracy"]) == {"exact", "within_1"}
            (table,) = r["exit_tables"]
            assert (table["tuned"] is not None) == (aggregation == "auto")
            if aggregation == "auto":  # tuned for accuracy (the default) on held-out training samples
                assert {"accuracy", "mean_exit", "within_tolerance"} <= set(table["tuned"])
                assert r["tuning"] == "held-out fifth of the training samples"
    table = ExitTable.load(tmp_path / "exit_table-speed0.9.npz", tokenizer_vocab_size=30522)
    assert table.exit_histogram.sum() == 24
    for name in ("results.json", "accuracy-vs-throughput.png", "exit_predictor-speed0.5.onnx"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "geep-depth2.onnx").is_file() == (backend == "ort")
    assert set(report["summary"]) == {"batch1", "batch8"}


def test_exit_table_tuned_on_held_out_tune_data(geep_checkpoint, tmp_path):
    _, ckpt, _ = geep_checkpoint
    tune_file = tmp_path / "tune.tsv"  # labelled rows the model was not trained on (the dev slice's)
    tune_file.write_text(SST2_DEV_SLICE.read_text())
    profile = profile_exits(ckpt, SST2_TRAIN_SLICE, SST2_DEV_SLICE, 24, 8, tune_path=tune_file)
    assert len(profile.tune["labels"]) > len(profile.dev["labels"])  # the whole tune file, not --max-eval-examples
    table, tuned = profile.fit_table(0.5, "auto", tolerance=0.0)
    # the same as fitting on every training sample and tuning directly on the tune rows' per-depth correctness
    train, tune = profile.train, profile.tune
    want = ExitTable(table.vocab_size, table.num_layers).fit(
        train["input_ids"], train["attention_mask"], exit_layers(profile.train_students, 0.5),
        profile.tokenizer.all_special_ids)
    correct = (profile.tune_teacher.argmax(-1) == tune["labels"][None]).T
    assert want.tune_accuracy(tune["input_ids"], tune["attention_mask"], correct, 0.0) == tuned
    assert tuned["full_accuracy"] == pytest.approx(100.0 * correct[:, -1].mean())
    np.testing.assert_array_equal(table.predict(tune["input_ids"], tune["attention_mask"]),
                                  want.predict(tune["input_ids"], tune["attention_mask"]))
    # tuned for exits: agreement with the tune rows' own FastBERT exits
    assert profile.fit_table(0.5, "auto", tune_for="exits")[1] == want.tune(
        tune["input_ids"], tune["attention_mask"], exit_layers(profile.tune_students, 0.5))
    with pytest.raises(ToolchainError, match="tune data .* is the training data"):
        profile_exits(ckpt, SST2_TRAIN_SLICE, SST2_DEV_SLICE, 24, 8, tune_path=SST2_TRAIN_SLICE)
    with pytest.raises(ToolchainError, match="not found: .*missing.tsv"):
        profile_exits(ckpt, SST2_TRAIN_SLICE, SST2_DEV_SLICE, 24, 8, tune_path=tmp_path / "missing.tsv")


def test_sweep_geep_cross_fits_when_tuned_on_the_eval_data(geep_checkpoint, tmp_path):
    _, ckpt, _ = geep_checkpoint
    report = sweep_geep(checkpoint_dir=ckpt, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, speeds=[0.5],
                        batches=[4], out_dir=tmp_path, max_train_examples=24, max_eval_examples=16, backend="torch",
                        tune_path=SST2_DEV_SLICE, repeats=1)
    (geep,) = [r for r in report["rows"] if r["method"] == "geep"]
    assert geep["tuning"] == f"2-fold cross-fit on {SST2_DEV_SLICE}" and len(geep["exit_tables"]) == 2
    folds = _folds(16, crossfit=True)
    (first, tune_first), (second, tune_second) = folds
    assert sorted([*first, *second]) == list(range(16)) and len(first) == 8
    assert np.array_equal(first, tune_second) and np.array_equal(second, tune_first)
    # every dev row gets its exit from the table tuned on the other half
    profile = profile_exits(ckpt, SST2_TRAIN_SLICE, SST2_DEV_SLICE, 24, 16, tune_path=SST2_DEV_SLICE)
    dev, depths = profile.dev, np.zeros(16, dtype=np.int64)
    for i, (rows, tune_rows) in enumerate(folds, start=1):
        table = ExitTable.load(tmp_path / f"exit_table-speed0.5-fold{i}.npz", tokenizer_vocab_size=30522)
        assert profile.fit_table(0.5, "auto", tune_rows=tune_rows)[1] == geep["exit_tables"][i - 1]["tuned"]
        depths[rows] = table.predict(dev["input_ids"][rows], dev["attention_mask"][rows])
    assert geep["mean_depth"] == round(float(depths.mean()), 3)
    with pytest.raises(ToolchainError, match="need at least 2 eval examples"):
        _folds(1, crossfit=True)
