"""GEEP bundles on a tiny 3-layer GEEP checkpoint: export-geep layout and manifest, per-depth parity with PyTorch,
GeepPredictor (request order, labels at the predicted exit, concurrency, errors) and INT8 of one depth graph."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import TOKENIZER_FILES, make_tiny_model_dir, run_without_training_stack
from toolchain import export as export_mod, quantize
from toolchain.bundle import graph_path, load_manifest, update_manifest
from toolchain.cli import main
from toolchain.data import SST2_DEV_SLICE, SST2_TRAIN_SLICE
from toolchain.data.classify import load_classification
from toolchain.data.prepare import Columns
from toolchain.errors import ToolchainError
from toolchain.exit_batching import INPUT_NAMES, ort_exit_predictor
from toolchain.exit_predictor import exit_accuracy
from toolchain.geep import depth_accuracy, load_geep, train_geep
from toolchain.geep_export import export_geep_bundle
from toolchain.geep_runtime import profile_exits
from toolchain.macs import count_macs
from toolchain.runtime import Bundle, GeepPredictor, Hardware
from toolchain.training import TrainConfig

SEQ, TRAIN, DEV = 32, 48, 24
# the students of layers 1-2 sit at normalized entropy 0.977-0.999 here: at 0.99 the training samples exit at all three
# depths (5 / 26 / 17), and the max aggregation then predicts depth 2 or 3 for the dev texts (7 / 17)
SPEED, AGGREGATION = 0.99, "max"
EXPORT = dict(max_train_examples=TRAIN, max_eval_examples=DEV, aggregation=AGGREGATION)
CPU = Hardware()  # x86 without VNNI: serves reduce-range INT8 only
VNNI = Hardware(isa=("AVX512-VNNI",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("geep")
    model_dir = make_tiny_model_dir(root / "bert", layers=3)
    train_geep(model_dir=model_dir, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, out_dir=root / "ckpt",
               columns=Columns(), max_seq_length=SEQ, max_train_examples=32, max_eval_examples=16,
               cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=16, group_by_length=False),  # the model SPEED fits
               device_name="cpu")
    return root / "ckpt"


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    return export_geep_bundle(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, tmp_path_factory.mktemp("out") / "geep",
                              SPEED, **EXPORT)


@pytest.fixture
def copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "geep")


def texts(n: int = 14) -> list[str]:
    return [ex.text for ex in load_classification(SST2_DEV_SLICE)[:n]]


@pytest.mark.timeout(120)
def test_bundle_layout_manifest_and_checksums(bundle, checkpoint, copy):
    assert {p.name for p in bundle.iterdir()} == {
        "manifest.json", "config.json", "toolchain.json", "geep-depth1.onnx", "geep-depth2.onnx", "geep-depth3.onnx",
        "geep-predictor.onnx", "weights", *TOKENIZER_FILES}
    assert not list(bundle.parent.glob(".geep*")), "no staging folders left beside the bundle"
    assert json.loads((bundle / "toolchain.json").read_text()) == json.loads((checkpoint / "toolchain.json").read_text())
    manifest = load_manifest(bundle, verify=True)
    assert manifest["task"] == "classify" and manifest["source_checkpoint"] == str(checkpoint.resolve())
    *depths, predictor = manifest["graphs"]
    model, tokenizer, meta = load_geep(checkpoint)
    profile = profile_exits(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, TRAIN, DEV)
    accuracy = depth_accuracy(model, profile.dev)["accuracy_by_depth"]
    for depth, entry in enumerate(depths, start=1):
        config = model.config.to_dict() | {"num_hidden_layers": depth}
        assert entry["name"] == f"geep-depth{depth}" and entry["kind"] == "geep-exit" and entry["depth"] == depth
        assert entry["macs"] == count_macs(type(model.config)(**config), None, SEQ, "classify", 2)
        assert (entry["precision"], entry["format"], entry["ep"], entry["length_config"]) == ("fp32", "fp32", "cpu", None)
        assert entry["max_seq_length"] == SEQ and entry["inputs"] == list(INPUT_NAMES) and entry["outputs"] == ["logits"]
        assert entry["metrics"]["accuracy"] == accuracy[depth - 1] and entry["metrics"]["examples"] == DEV
        assert entry["parity"]["max_abs_diff"] <= 1e-4 and entry["sha256"] and entry["latency_ms"] == {}
    assert depths[-1]["macs"] == count_macs(model.config, None, SEQ, "classify", 2)
    assert depths[0]["macs"] < depths[1]["macs"] < depths[2]["macs"]
    shared = [set(entry["weights"]) for entry in depths]  # a deeper graph adds its layers' tensors, nothing else
    assert shared[0] < shared[1] < shared[2] and {p.name for p in (bundle / "weights").iterdir()} == {
        Path(w).name for entry in manifest["graphs"] for w in entry["weights"]}

    table, _ = profile.fit_table(SPEED, AGGREGATION)
    exits = table.predict(profile.dev["input_ids"], profile.dev["attention_mask"])
    assert predictor["name"] == "geep-predictor" and predictor["kind"] == "geep-predictor"
    assert (predictor["speed"], predictor["aggregation"], predictor["shift"]) == (SPEED, AGGREGATION, 0.0)
    assert predictor["vocab_size"] == len(tokenizer) and predictor["num_layers"] == 3
    assert {k: predictor["metrics"][k] for k in ("exact", "within_1")} == exit_accuracy(exits, profile.dev_exits(SPEED))
    assert predictor["metrics"]["mean_exit"] == pytest.approx(exits.mean(), abs=1e-3)

    with open(copy / "geep-depth2.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ToolchainError, match="checksum mismatch for geep-depth2.onnx"):
        Bundle.load(copy)


def test_depth_graphs_match_pytorch(bundle, checkpoint):
    model, _, _ = load_geep(checkpoint)
    dev = profile_exits(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, 2, 16).dev
    shortest = int(dev["attention_mask"].sum(1).argmin())
    length = int(dev["attention_mask"][shortest].sum())
    for entry in load_manifest(bundle)["graphs"][:3]:
        session = ort.InferenceSession(str(graph_path(bundle, entry)), providers=["CPUExecutionProvider"])
        for rows, cols in ((slice(None), slice(None)), (slice(shortest, shortest + 1), slice(0, length))):
            feed = {k: np.ascontiguousarray(dev[k][rows, cols]) for k in INPUT_NAMES}
            with torch.inference_mode():
                want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, depth=entry["depth"]).numpy()
            np.testing.assert_allclose(session.run(None, feed)[0], want, atol=1e-4, rtol=0)


@pytest.mark.timeout(120)
def test_predictor_answers_in_request_order_at_the_predicted_exit(bundle, checkpoint):
    model, tokenizer, meta = load_geep(checkpoint)
    predictor = GeepPredictor(bundle, batch=3, hardware=CPU)
    items = [t if i % 2 else (t, None) for i, t in enumerate(texts())]  # plain texts and (text, None) pairs
    results = predictor.predict_batch(items)
    assert len(results) == len(items) and predictor.predict_batch([]) == []

    enc = tokenizer(texts(), truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in INPUT_NAMES}
    session = ort.InferenceSession(str(bundle / "geep-predictor.onnx"), providers=["CPUExecutionProvider"])
    exits = ort_exit_predictor(session)(feed)
    assert [r["exit_layer"] for r in results] == exits.tolist()
    assert len(set(exits.tolist())) > 1, "the test needs requests at more than one depth"
    for i, (r, depth) in enumerate(zip(results, exits)):
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v[i:i + 1]) for k, v in feed.items()}, depth=int(depth))[0]
        assert r["label"] == meta["labels"][int(logits.argmax())] and r["graph"] == f"geep-depth{depth}"
        assert r["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-4)
    assert_same([predictor.predict(texts()[3])], results[3:4])

    # concurrent callers on one instance get what a lone caller gets
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(items)) for _ in range(8)]
    got: dict[int, list] = {}

    def call(k: int) -> None:
        got[k] = predictor.predict_batch([items[i] for i in orders[k]])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(orders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, order in enumerate(orders):
        assert_same(got[k], [results[i] for i in order])


def assert_same(got: list[dict], want: list[dict]) -> None:
    """Equal answers; scores up to float noise (batches trim their padding to different lengths)."""
    assert [{**r, "score": None} for r in got] == [{**r, "score": None} for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)


def test_predictor_errors(bundle, copy):
    with pytest.raises(ToolchainError, match="request 1: empty or missing text"):
        GeepPredictor(bundle, hardware=CPU).predict_batch(["a fine film", "  "])

    update_manifest(copy, lambda m: {**m, "graphs": [{**g, "vocab_size": 100} if g["kind"] == "geep-predictor" else g
                                                     for g in m["graphs"]]})
    with pytest.raises(ToolchainError, match="vocabulary of 100 tokens, but the bundle's tokenizer has 30522"):
        GeepPredictor(copy, hardware=CPU)

    update_manifest(copy, lambda m: {**m, "graphs": [g for g in m["graphs"] if g["kind"] != "geep-predictor"]})
    (copy / "geep-predictor.onnx").unlink()
    with pytest.raises(ToolchainError, match=f"bundle {copy} has no GEEP predictor graph"):
        GeepPredictor(copy, hardware=CPU)


def test_bad_speed_tuning_and_existing_output_write_nothing(checkpoint, tmp_path):
    with pytest.raises(ToolchainError, match="speed"):
        export_geep_bundle(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, tmp_path / "b", 1.5, **EXPORT)
    with pytest.raises(ToolchainError, match="unknown tuning target 'f1'; choose accuracy or exits"):
        export_geep_bundle(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, tmp_path / "b", SPEED, **EXPORT, tune_for="f1")
    with pytest.raises(ToolchainError, match="tolerance must be >= 0"):
        export_geep_bundle(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, tmp_path / "b", SPEED, **EXPORT, tolerance=-1)
    assert not (tmp_path / "b").exists()
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export-geep", "--model", str(checkpoint), "--speed", str(SPEED), "--out", str(out),
            "--max-train-examples", str(TRAIN), "--max-eval-examples", str(DEV), "--aggregation", AGGREGATION]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "already exists (use --force to replace it)" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    result = CliRunner().invoke(main, [*args, "--force", "--aggregation", "auto", "--tune-data", str(SST2_DEV_SLICE)])
    assert result.exit_code == 0, result.output
    assert "geep-predictor" in result.output and not (out / "keep.txt").exists()
    assert "warning: the exit table was tuned on the eval data" in result.output
    *depths, predictor = load_manifest(out, verify=True)["graphs"]
    # tuned on the same DEV eval rows the manifest scores: the full-depth accuracy it tuned against is depth 3's
    assert predictor["tune_data"] == str(SST2_DEV_SLICE)
    assert predictor["tuned"]["full_accuracy"] == pytest.approx(depths[-1]["metrics"]["accuracy"], abs=0.01)


def test_parity_failure_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "ATOL", 0.0)  # ONNX Runtime and PyTorch differ by ~1e-7
    with pytest.raises(ToolchainError, match=r"graph geep-depth1: .*max \|logit difference\| .*tolerance 0"):
        export_geep_bundle(checkpoint, SST2_TRAIN_SLICE, SST2_DEV_SLICE, tmp_path / "b", SPEED, **EXPORT)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("quantizing_cpu_has_vnni", [True, False])
def test_quantized_depth_graph_keeps_its_depth_and_is_served_where_exact(copy, monkeypatch, quantizing_cpu_has_vnni):
    """Quantized as on a VNNI CPU (full-range weights), the INT8 depth graph is served only on VNNI; quantized as on an
    AVX2-only CPU (7-bit weights, exact everywhere), on both. Whatever this host is."""
    monkeypatch.setattr(quantize, "u8s8_saturates", lambda: not quantizing_cpu_has_vnni)
    result = CliRunner().invoke(main, ["quantize", "--bundle", str(copy), "--calib-data", str(SST2_TRAIN_SLICE),
                                       "--eval-data", str(SST2_DEV_SLICE), "--graphs", "geep-depth2", "--calib-samples",
                                       "8", "--eval-examples", "16", "--tolerance", "100"])
    assert result.exit_code == 0, result.output
    entry = load_manifest(copy, verify=True)["graphs"][-1]
    assert (entry["name"], entry["kind"], entry["depth"], entry["parent"]) == (
        "geep-depth2-int8-cpu", "geep-exit", 2, "geep-depth2")
    assert (entry["precision"], entry["format"], entry["max_seq_length"]) == ("int8", "qoperator", SEQ)
    assert entry["quantization"]["reduce_range"] is not quantizing_cpu_has_vnni
    assert entry["metrics"]["examples"] == entry["metrics"]["fp32"]["examples"] == 16
    assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(str(graph_path(copy, entry))).graph.node}

    on_plain_cpu = "geep-depth2" if quantizing_cpu_has_vnni else "geep-depth2-int8-cpu"
    assert GeepPredictor(copy, hardware=CPU).graphs[2]["name"] == on_plain_cpu
    predictor = GeepPredictor(copy, hardware=VNNI)
    assert [g["name"] for g in predictor.graphs.values()] == ["geep-depth1", "geep-depth2-int8-cpu", "geep-depth3"]
    for r in predictor.predict_batch(texts()):
        assert r["graph"] == predictor.graphs[r["exit_layer"]]["name"]


def test_cli_predict_serves_geep_bundles(bundle, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps({"text": t}) for t in texts(5)) + "\n")
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--requests", str(requests), "--batch", "4",
                                       "--ep", "cpu"])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert_same(answers, GeepPredictor(bundle, hardware=CPU).predict_batch(texts(5)))
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--requests", str(requests), "--budget-ms", "5"])
    assert result.exit_code == 2 and "GEEP bundle" in result.output
    served = run_without_training_stack("predict", "--bundle", str(bundle), "--requests", str(requests), "--batch", "4",
                                        "--ep", "cpu")  # serving needs neither PyTorch nor transformers
    assert served.returncode == 0, served.stderr
    assert [json.loads(line) for line in served.stdout.splitlines()] == answers
