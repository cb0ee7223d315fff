"""ONNX export into bundles: parity with PyTorch, baked TopK, manifest integrity, atomic failure, Optimum loading."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TOKENIZER_FILES, make_tiny_classifier_dir, make_tiny_model_dir
from test_lat import kept_counts
from transformers import AutoConfig

from toolchain import export as export_mod
from toolchain.bundle import add_graph, graph_path, latency_key, load_manifest, update_manifest, write_bundle
from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.export import OPTIMIZATIONS, export, export_pareto
from toolchain.lat import PROTECT_ANSWERS, FixedLengthModel
from toolchain.macs import count_macs
from toolchain.train_lat import load_length_adaptive

SEQ = 64
CONFIGS = [None, (50, 30), (32, 12)]
NAMES = ["lat-full", "lat-50-30", "lat-32-12"]
META = {"task": "squad", "max_seq_length": SEQ, "doc_stride": 16, "labels": None, "length_adaptive": True,
        "keep_cls": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("ckpt"))
    (path / "toolchain.json").write_text(json.dumps(META))
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    return export(checkpoint, tmp_path_factory.mktemp("out") / "bundle", CONFIGS, optimize="none")


def _dev_inputs(checkpoint):
    _, tokenizer, _ = load_length_adaptive(checkpoint)
    return prepare.sample_inputs("squad", tokenizer, SEQ, export_mod.PARITY_BATCH, 16)


@pytest.mark.timeout(60)
def test_graphs_match_pytorch_at_batch_1_and_8(bundle, checkpoint):
    manifest = load_manifest(bundle)
    assert [g["name"] for g in manifest["graphs"]] == NAMES
    wrapper, _, _ = load_length_adaptive(checkpoint)
    inputs = _dev_inputs(checkpoint)
    assert len(inputs["input_ids"]) == 8 and inputs["input_ids"].shape[1] == SEQ
    for entry, cfg in zip(manifest["graphs"], CONFIGS):
        assert entry["length_config"] == (None if cfg is None else list(cfg))
        assert entry["macs"] == count_macs(wrapper.config, cfg, SEQ, "qa")
        assert entry["parity"]["max_abs_diff"] <= 1e-4 and entry["optimization"]["method"] == "none"
        assert entry["protect_answers"] == PROTECT_ANSWERS
        session = ort.InferenceSession(str(graph_path(bundle, entry)), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
        fixed = FixedLengthModel(wrapper, cfg).eval()
        for rows in (slice(7, 8), slice(0, 8)):
            feed = {k: v[rows] for k, v in inputs.items()}
            with torch.no_grad():
                want = [t.numpy() for t in fixed(*(torch.from_numpy(v) for v in feed.values()))]
            for got, ref in zip(session.run(None, feed), want):
                np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
                assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    macs = [g["macs"] for g in manifest["graphs"]]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 3


def test_graphs_use_standard_ops_and_baked_lengths(bundle):
    for entry, cfg in zip(load_manifest(bundle)["graphs"], CONFIGS):
        model = onnx.load(str(graph_path(bundle, entry)))
        onnx.checker.check_model(model)
        assert {node.domain for node in model.graph.node} == {""}
        assert entry["optimization"]["domains"] == ["ai.onnx"]
        assert kept_counts(model.graph) == set(cfg or ())
        assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_bundle_is_self_contained(bundle, checkpoint):
    manifest = load_manifest(bundle)
    assert manifest["schema_version"] == 1 and manifest["task"] == "squad"
    assert manifest["source_checkpoint"] == str(checkpoint.resolve()) and manifest["created"]
    for name in ("config.json", "toolchain.json", *TOKENIZER_FILES):
        assert (bundle / name).is_file(), name
    assert json.loads((bundle / "toolchain.json").read_text()) == META
    for entry in manifest["graphs"]:
        assert entry["kind"] == "lat" and entry["precision"] == "fp32" and entry["ep"] == "cpu"
        files = [graph_path(bundle, entry), *(bundle / w for w in entry["weights"])]
        assert entry["size_bytes"] == sum(f.stat().st_size for f in files)
        assert entry["metrics"] == {} and entry["latency_ms"] == {}


def test_graphs_share_one_copy_of_the_weights(bundle, checkpoint):
    graphs = load_manifest(bundle)["graphs"]
    weights = {w for g in graphs for w in g["weights"]}
    assert all(set(g["weights"]) == weights for g in graphs)  # every configuration holds the same weights
    stored = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "weights").iterdir())
    assert stored == sorted(weights)
    params = sum(p.numel() * 4 for p in load_length_adaptive(checkpoint)[0].parameters() if p.numel() * 4 >= 1024)
    on_disk = sum((bundle / w).stat().st_size for w in weights)
    assert 0.9 * params <= on_disk <= params  # one copy (tied or equal tensors once), not one per graph
    for g in graphs:  # the graph files themselves are small: every large tensor is external
        assert graph_path(bundle, g).stat().st_size < 0.1 * on_disk
        model = onnx.load(str(graph_path(bundle, g)), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert {next(e.value for e in t.external_data if e.key == "location") for t in external} == weights


def test_checksum_mismatch_names_the_file(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    graph = copy / "lat-50-30.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    load_manifest(copy, verify=False)
    with pytest.raises(ToolchainError, match=r"checksum mismatch for lat-50-30\.onnx"):
        load_manifest(copy)
    graph.unlink()
    with pytest.raises(ToolchainError, match=r"missing graph file lat-50-30\.onnx"):
        load_manifest(copy)


def test_weights_checksum_mismatch_names_the_file(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    rel = load_manifest(copy)["graphs"][1]["weights"][0]
    data = bytearray((copy / rel).read_bytes())
    data[0] ^= 0xFF
    (copy / rel).write_bytes(bytes(data))
    with pytest.raises(ToolchainError, match=f"checksum mismatch for {rel}"):
        load_manifest(copy)
    (copy / rel).unlink()
    with pytest.raises(ToolchainError, match=f"missing weights file \\(of graph 'lat-full'\\) {rel}"):
        load_manifest(copy)


def _edit_manifest(bundle, tmp_path, edit):
    copy = shutil.copytree(bundle, tmp_path / "b", dirs_exist_ok=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("bad", ["../lat-full.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_manifest_path_escaping_bundle_is_refused(bundle, tmp_path, bad):
    copy = _edit_manifest(bundle, tmp_path, lambda m: m["graphs"][0].update(file=bad))
    with pytest.raises(ToolchainError, match="escapes the bundle directory"):
        load_manifest(copy, verify=False)


def test_manifest_errors(bundle, tmp_path):
    copy = _edit_manifest(bundle, tmp_path, lambda m: m.update(schema_version=99))
    with pytest.raises(ToolchainError, match="schema_version 99"):
        load_manifest(copy)
    with pytest.raises(ToolchainError, match="bundle not found"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(ToolchainError, match="not a bundle"):
        load_manifest(tmp_path)


def test_add_graph_and_update_manifest(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    full = load_manifest(copy)["graphs"][0]
    int8 = {**{k: v for k, v in full.items() if k not in ("sha256", "size_bytes")}, "name": "lat-full-int8",
            "file": "int8/lat-full.onnx", "precision": "int8", "format": "qdq", "parent": "lat-full"}
    add_graph(copy, graph_path(copy, full), int8)
    key = latency_key("cpu", 1)
    assert key.startswith("cpu:") and key.endswith(":b1")
    timing = {"median": 12.5, "p90": 13.0, "threads": 2}
    update_manifest(copy, lambda m: m["graphs"][-1]["latency_ms"].update({key: timing}))
    added = load_manifest(copy)["graphs"][-1]
    assert added["name"] == "lat-full-int8" and added["latency_ms"] == {key: timing}
    assert added["sha256"] == full["sha256"] and added["parent"] == "lat-full"
    with pytest.raises(ToolchainError, match="already has a graph named"):
        add_graph(copy, graph_path(copy, full), int8)
    with pytest.raises(ToolchainError, match="unknown parent"):
        add_graph(copy, graph_path(copy, full), {**int8, "name": "x", "file": "x.onnx", "parent": "nope"})
    with pytest.raises(ToolchainError, match="escapes"):
        add_graph(copy, graph_path(copy, full), {**int8, "name": "y", "file": "../y.onnx"})
    assert not (copy / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
    assert not [p for p in copy.rglob(".*")]  # no temp files left behind
    with pytest.raises(ToolchainError, match="already exists"):
        write_bundle(copy, [], {}, task="squad", source_checkpoint="x")


@pytest.mark.timeout(60)
def test_existing_output_needs_force(checkpoint, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ToolchainError, match="already exists"):
        export(checkpoint, out, [None], optimize="none")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    export(checkpoint, out, [(40, 20)], force=True, optimize="none")
    assert [g["name"] for g in load_manifest(out)["graphs"]] == ["lat-40-20"] and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.timeout(60)
def test_parity_failure_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "ATOL", -1.0)
    with pytest.raises(ToolchainError, match=r"graph lat-full .*disagree at batch 1: max \|logit difference\|"):
        export(checkpoint, tmp_path / "b", [None, (50, 30)], optimize="auto")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cfgs, match", [
    ([(50, 30, 10)], "3 entries, expected 2"),
    ([(30, 50)], "non-increasing"),
    ([(65, 30)], "above max_seq_length 64"),
    (["50,x"], "not an integer"),
    ([], "nothing to export"),
])
def test_invalid_length_config_writes_nothing(checkpoint, tmp_path, cfgs, match):
    with pytest.raises(ToolchainError, match=match):
        export(checkpoint, tmp_path / "b", cfgs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("remove, match", [
    ("model.safetensors", "no weights"), ("toolchain.json", "not a toolchain checkpoint"),
    ("tokenizer.json", "no fast tokenizer"),
])
def test_incomplete_checkpoint(checkpoint, tmp_path, remove, match):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (ckpt / remove).unlink()
    with pytest.raises(ToolchainError, match=match):
        export(ckpt, tmp_path / "b", [None])
    assert not (tmp_path / "b").exists()
    with pytest.raises(ToolchainError, match="checkpoint not found"):
        export(tmp_path / "nowhere", tmp_path / "b", [None])


@pytest.mark.parametrize("text, match", [
    ("{not json", "cannot read pareto file"),
    ('{"points": []}', "non-empty 'frontier' list"),
    ('{"frontier": []}', "non-empty 'frontier' list"),
    ('{"frontier": [{"macs": 3}]}', "frontier entry 0 is not an object with a 'length_config'"),
    ('{"frontier": [{"length_config": "50,30"}]}', "length_config must be a list"),
    ('{"frontier": [{"length_config": [50, 30, 1]}]}', "3 entries, expected 2"),
])
def test_malformed_pareto(checkpoint, tmp_path, text, match):
    (tmp_path / "pareto.json").write_text(text)
    with pytest.raises(ToolchainError, match=match):
        export_pareto(checkpoint, tmp_path / "pareto.json", tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.timeout(120)
def test_export_pareto_with_measured_optimization(checkpoint, tmp_path):
    # the chosen configuration is exported even when it is off the frontier (a selection split chose it)
    pareto = {"frontier": [{"length_config": [50, 30], "macs": 1, "f1": 80.0}],
              "chosen": {"length_config": [32, 12], "macs": 2, "report": {"f1": 70.5, "questions": 9}}}
    (tmp_path / "pareto.json").write_text(json.dumps(pareto))
    out = export_pareto(checkpoint, tmp_path / "pareto.json", tmp_path / "b")
    manifest = load_manifest(out)
    graphs = manifest["graphs"]
    assert [g["name"] for g in graphs] == NAMES and manifest["chosen"] == NAMES[2] == "lat-32-12"
    assert graphs[2]["metrics"]["f1"] == 70.5
    assert {g["protect_answers"] for g in graphs} == {0}  # a search from before the answer guard scored without it
    with pytest.raises(ToolchainError, match="searched with protect-answers 0, not 32"):
        export_pareto(checkpoint, tmp_path / "pareto.json", tmp_path / "c", protect_answers=32)
    assert not (tmp_path / "c").exists()
    record = graphs[0]["optimization"]
    assert record["selected"] == "auto" and record["method"] in OPTIMIZATIONS and record["measured_on"] == "lat-full"
    assert record["candidates"]["none"]["median_ms"] > 0
    assert all(g["optimization"]["method"] == record["method"] and g["parity"]["max_abs_diff"] <= 1e-4 for g in graphs)


@pytest.mark.timeout(60)
def test_optimum_question_answering_pipeline(bundle):
    from optimum.onnxruntime import ORTModelForQuestionAnswering
    from transformers import AutoTokenizer, pipeline

    model = ORTModelForQuestionAnswering.from_pretrained(bundle, file_name="lat-32-12.onnx")
    qa = pipeline("question-answering", model=model, tokenizer=AutoTokenizer.from_pretrained(bundle))
    context = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named after the "
               "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    answer = qa(question="Who designed the tower?", context=context, max_seq_len=SEQ, padding="max_length", doc_stride=16)
    assert answer["answer"] and answer["answer"] in context
    assert context[answer["start"]:answer["end"]] == answer["answer"]
    # the pipeline's default pads to the longest window only; the graph takes any length, with the same answer
    shorter = qa(question="Who designed the tower?", context=context[:120], max_seq_len=SEQ, doc_stride=16)
    padded = qa(question="Who designed the tower?", context=context[:120], max_seq_len=SEQ, padding="max_length",
                doc_stride=16)
    assert shorter["answer"] == padded["answer"] and shorter["score"] == pytest.approx(padded["score"], abs=1e-5)


@pytest.mark.timeout(60)
def test_classification_export(tmp_path):
    ckpt = make_tiny_classifier_dir(tmp_path / "cls")
    out = export(ckpt, tmp_path / "b", ["full", "24,10"], optimize="none")
    graphs = load_manifest(out)["graphs"]
    assert [g["name"] for g in graphs] == ["lat-full", "lat-24-10"]
    config = AutoConfig.from_pretrained(ckpt)
    assert all(g["outputs"] == ["logits"] and g["macs"] == count_macs(config, g["length_config"], 32, "classify")
               for g in graphs)
    session = ort.InferenceSession(str(graph_path(out, graphs[1])), providers=["CPUExecutionProvider"])
    ids = np.zeros((3, 32), dtype=np.int64)
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids})
    assert logits.shape == (3, 2)
