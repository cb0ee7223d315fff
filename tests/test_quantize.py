"""Static INT8 of bundle graphs: tiny BERT bundles at seq 64 (QA) and 32 (classification), a few calibration rows."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_neural_compressor.algorithms.post_training_quant.calibrate import ONNXRTAugment
from transformers import AutoTokenizer

from conftest import make_tiny_model_dir
from toolchain import quantize
from toolchain.bundle import graph_path, load_manifest
from toolchain.data import SQUAD_DEV_SLICE, SQUAD_TRAIN_SLICE, SST2_DEV_SLICE, SST2_TRAIN_SLICE, prepare
from toolchain.errors import ToolchainError
from toolchain.export import export

SEQ = 64
FAST = dict(calib_samples=16, eval_examples=24, tolerance=100.0)  # a random model's F1 is noise: see score_int8_lower


def _export(tmp_path_factory, meta: dict, configs: list[str]):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("model"))
    (model_dir / "toolchain.json").write_text(json.dumps(meta))
    return export(model_dir, tmp_path_factory.mktemp("bundles") / "b", configs, optimize="none")


@pytest.fixture(scope="module")
def qa_bundle(tmp_path_factory):
    """A full-length graph and a length-adaptive one (TopK keeps 48, then 40 tokens)."""
    return _export(tmp_path_factory, {"task": "squad", "max_seq_length": SEQ, "doc_stride": 16}, ["full", "48,40"])


@pytest.fixture
def bundle(qa_bundle, tmp_path):
    return shutil.copytree(qa_bundle, tmp_path / "bundle")


def snapshot(bundle):
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}


def outputs(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def assert_tracks_fp32(bundle, entry, feed):
    """INT8 logits correlate with the parent's and pick the same best token/class on most rows."""
    fp32 = outputs(bundle / f"{entry['parent']}.onnx", feed)
    int8 = outputs(graph_path(bundle, entry), feed)
    for f, q in zip(fp32, int8):
        assert np.corrcoef(f.ravel(), q.ravel())[0, 1] > 0.9
        assert (f.argmax(-1) == q.argmax(-1)).mean() >= 0.7


def op_types(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def dev_feed(bundle, n=24):
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    return prepare.squad_split(SQUAD_DEV_SLICE, tokenizer, SEQ, 16, n)[1].inputs(slice(None))


def test_cpu_int8_joins_the_manifest_and_tracks_fp32(bundle):
    entries = quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, **FAST)
    manifest = load_manifest(bundle, verify=True)
    names = ["lat-full", "lat-48-40", "lat-full-int8-cpu", "lat-48-40-int8-cpu"]
    assert [g["name"] for g in manifest["graphs"]] == names
    feed = dev_feed(bundle)
    for entry, stored in zip(entries, manifest["graphs"][2:]):
        parent = next(g for g in manifest["graphs"] if g["name"] == entry["parent"])
        assert stored["sha256"] and stored["parent"] == parent["name"]
        assert (stored["precision"], stored["format"], stored["ep"]) == ("int8", "qoperator", "cpu")
        assert stored["length_config"] == parent["length_config"] and stored["max_seq_length"] == SEQ
        assert stored["metrics"]["fp32"]["questions"] == stored["metrics"]["questions"] == 24
        q = stored["quantization"]
        assert q["calibration"]["samples"] == 16 and q["fallback_units"] == q["trials"][-1]["fallback_units"]
        assert stored["size_bytes"] <= 0.35 * parent["size_bytes"]
        integer = [n for n in onnx.load(str(graph_path(bundle, stored))).graph.node
                   if n.op_type == "MatMulIntegerToFloat"]  # static INT8 MatMuls with fp32 outputs
        assert integer and all(len(n.input) == 7 and n.input[6] for n in integer)  # each with its bias folded in
        assert_tracks_fp32(bundle, stored, feed)


def test_cuda_format_is_s8s8_qdq_only(bundle):
    (entry,) = quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, graphs=["lat-48-40"], ep="cuda",
                                        **FAST)
    assert (entry["name"], entry["format"], entry["ep"]) == ("lat-48-40-int8-cuda", "qdq", "cuda")
    path = graph_path(bundle, entry)
    ops = op_types(path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    integer_ops = {"MatMulInteger", "ConvInteger", "QGemm", "DynamicQuantizeLinear"}
    assert not {op for op in ops if op.startswith("QLinear") or op in integer_ops}
    model = onnx.load(str(path))
    zero_points = [t for t in model.graph.initializer if t.name.endswith("zero_point")]
    assert zero_points and all(t.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(t).any()
                               for t in zero_points)
    assert_tracks_fp32(bundle, entry, dev_feed(bundle))


def test_plain_classifier_full_length(tmp_path_factory):
    meta = {"task": "classify", "max_seq_length": 32, "labels": ["0", "1"],
            "columns": {"text": ["sentence"], "label": "label", "header": True}}
    bundle = _export(tmp_path_factory, meta, ["full"])
    (entry,) = quantize.quantize_bundle(bundle, SST2_TRAIN_SLICE, SST2_DEV_SLICE, calib_samples=32, eval_examples=64,
                                        tolerance=100.0)
    assert entry["parent"] == "lat-full" and entry["metrics"]["examples"] == 64
    assert entry["metrics"]["fp32"]["examples"] == 64
    load_manifest(bundle, verify=True)
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    _, arrays = prepare.classify_split(SST2_DEV_SLICE, tokenizer, 32, ["0", "1"], prepare.Columns(), 64)
    assert_tracks_fp32(bundle, entry, {k: v for k, v in arrays.items() if k != "labels"})


def int8_weights(path) -> np.ndarray:
    """The int8 weights of every integer MatMul (static and dynamic) of a CPU INT8 graph, concatenated."""
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    return np.concatenate([onnx.numpy_helper.to_array(init[n.input[1]]).ravel() for n in model.graph.node
                           if n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")])


@pytest.mark.parametrize("vnni, reduce_range, seven_bit", [(False, None, True), (True, None, False), (True, True, True)])
def test_weight_range_follows_the_cpu(bundle, monkeypatch, vnni, reduce_range, seven_bit):
    """Without VNNI/AMX the default is 7-bit weights (no int16 saturation in U8S8 GEMMs); with it, full range."""
    monkeypatch.setattr(quantize, "u8s8_saturates", lambda: not vnni)
    (entry,) = quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, graphs=["lat-full"],
                                        reduce_range=reduce_range, **FAST)
    assert entry["quantization"]["reduce_range"] is seven_bit
    peak = np.abs(int8_weights(graph_path(bundle, entry)).astype(int)).max()
    assert peak <= 64 if seven_bit else peak == 127


def test_full_range_is_refused_without_vnni(bundle, monkeypatch):
    monkeypatch.setattr(quantize, "u8s8_saturates", lambda: True)
    before = snapshot(bundle)
    with pytest.raises(ToolchainError, match="no VNNI or AMX: full-range U8S8 MatMuls saturate"):
        quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, reduce_range=False, **FAST)
    assert snapshot(bundle) == before


@pytest.mark.parametrize("change, message", [
    (dict(calib_data="missing-train.json"), "not found"),
    (dict(calib_samples=100_000), "fewer than the 100000 calibration samples"),
    (dict(ep="tpu"), "unknown execution provider"),
    (dict(graphs=["lat-full", "lat-1-1"]), "no fp32 graph named 'lat-1-1'"),
    (dict(eval_data=SQUAD_TRAIN_SLICE), "same file"),
    (dict(tolerance=-1), "tolerance must be >= 0"),
])
def test_bad_inputs_leave_the_bundle_unchanged(bundle, change, message):
    before = snapshot(bundle)
    args = {"calib_data": SQUAD_TRAIN_SLICE, "eval_data": SQUAD_DEV_SLICE, **FAST, **change}
    with pytest.raises(ToolchainError, match=message):
        quantize.quantize_bundle(bundle, **args)
    assert snapshot(bundle) == before


def test_checksum_mismatch_is_refused(bundle):
    with open(bundle / "lat-full.onnx", "ab") as f:
        f.write(b"\0")
    before = snapshot(bundle)
    with pytest.raises(ToolchainError, match="checksum mismatch"):
        quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, **FAST)
    assert snapshot(bundle) == before


def score_int8_lower(monkeypatch, unless_fp32=()):
    """Scripted F1: 50 for fp32 graphs and INT8 graphs that left ``unless_fp32`` (node names) out of static INT8,
    else 45."""
    real_runner, real_eval = quantize._runner, quantize.evaluate_squad

    class Tagged:
        def __init__(self, path, ep):
            graph = onnx.load(str(path), load_external_data=False).graph
            kept = {n.name for n in quantize.weight_nodes(graph)}  # fp32, or dynamic INT8 (MatMulInteger, "_quant")
            kept |= {n.name.removesuffix("_quant") for n in graph.node if n.op_type == "MatMulInteger"}
            int8 = "QuantizeLinear" in op_types(path)
            self.run, self.lowered = real_runner(path, ep), int8 and not (unless_fp32 and kept >= set(unless_fp32))

        def __call__(self, feed):
            return self.run(feed)

    def lowered(run, *args, **kwargs):
        metrics, preds = real_eval(run, *args, **kwargs)
        return {**metrics, "f1": 45.0 if run.lowered else 50.0}, preds

    monkeypatch.setattr(quantize, "_runner", Tagged)
    monkeypatch.setattr(quantize, "evaluate_squad", lowered)


def test_fallback_makes_the_failing_unit_dynamic_int8(bundle, monkeypatch):
    units = quantize.fallback_units(onnx.load(str(bundle / "lat-full.onnx"), load_external_data=False).graph)
    score_int8_lower(monkeypatch, units["ffn-out"])
    calibrations = []  # the calibration pass runs the graph over the samples; the second trial reuses its ranges
    real_run = ONNXRTAugment.get_intermediate_outputs
    monkeypatch.setattr(ONNXRTAugment, "get_intermediate_outputs",
                        lambda self, *a, **k: calibrations.append(1) or real_run(self, *a, **k))
    (entry,) = quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, graphs=["lat-full"],
                                        **{**FAST, "tolerance": 1.0})
    assert len(calibrations) == 1
    q = entry["quantization"]
    assert q["fallback_units"] == ["ffn-out"] and q["fallback"] == "dynamic int8" and q["fp32_nodes"] == []
    assert sorted(q["dynamic"]["nodes"]) == sorted(units["ffn-out"])
    assert [t["fallback_units"] for t in q["trials"]] == [[], ["ffn-out"]]
    assert (entry["metrics"]["f1"], entry["metrics"]["fp32"]["f1"]) == (50.0, 50.0)
    graph = onnx.load(str(graph_path(bundle, entry))).graph
    assert sorted(n.name for n in graph.node if n.op_type == "MatMulInteger") == sorted(f"{n}_quant" for n in units["ffn-out"])
    assert not [n for n in quantize.weight_nodes(graph) if n.op_type == "MatMul"]
    monkeypatch.undo()
    assert_tracks_fp32(bundle, entry, dev_feed(bundle))


def test_unmet_tolerance_reports_the_best_and_keeps_fp32(bundle, monkeypatch):
    score_int8_lower(monkeypatch)
    before = snapshot(bundle)
    message = r"lat-full: INT8 f1 is not within 1 points of fp32 50.00 after 2 trials; best INT8 f1 45.00"
    with pytest.raises(ToolchainError, match=message):
        quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, graphs=["lat-full"], max_trials=2,
                                 **{**FAST, "tolerance": 1.0})
    assert snapshot(bundle) == before


def test_failure_while_adding_rolls_back(bundle, monkeypatch):
    calls = []

    def add_then_fail(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_add(*args)

    real_add = quantize.add_graph
    monkeypatch.setattr(quantize, "add_graph", add_then_fail)
    before = snapshot(bundle)
    with pytest.raises(OSError, match="disk full"):
        quantize.quantize_bundle(bundle, SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, **FAST)
    assert len(calls) == 2
    assert snapshot(bundle) == before and not list(bundle.parent.glob(".bundle.quantize-*"))
    load_manifest(bundle, verify=True)


def test_fallback_units_follow_the_roles(qa_bundle):
    units = quantize.fallback_units(onnx.load(str(qa_bundle / "lat-48-40.onnx"), load_external_data=False).graph)
    assert list(units) == list(quantize.FALLBACK)
    # the QA head, and the answer guard's use of it before each of the two dropping layers (one weight, read directly)
    assert units["head"] == ["/model/qa_outputs_2/MatMul", "/model/qa_outputs/MatMul", "/model/qa_outputs_1/MatMul"]
    assert [len(units[u]) for u in ("ffn-out", "qkv", "ffn-in", "attention-out", "embeddings")] == [2, 6, 2, 2, 3]
    assert all("intermediate" in n for n in units["ffn-in"]) and all("query" in n or "key" in n or "value" in n
                                                                      for n in units["qkv"])


def test_relative_bundle_path_leaves_cwd_clean(bundle, monkeypatch):
    monkeypatch.chdir(bundle.parent)
    before = set(bundle.parent.iterdir())
    entries = quantize.quantize_bundle("bundle", SQUAD_TRAIN_SLICE, SQUAD_DEV_SLICE, graphs=["lat-full"], **FAST)
    assert [e["name"] for e in entries] == ["lat-full-int8-cpu"]
    assert set(bundle.parent.iterdir()) == before  # no temporary files left beside the bundle or in the cwd
    load_manifest(bundle, verify=True)
