"""Runtime selection (budgets, accuracy floors, MACs, hardware variants), latency probing and predictors."""

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SEQ, make_tiny_classifier_dir
from transformers import AutoTokenizer

from toolchain import runtime
from toolchain.bundle import graph_path, latency_key, load_manifest, update_manifest
from toolchain.data.squad import SquadExample, build_features, postprocess
from toolchain.errors import ToolchainError
from toolchain.export import export
from toolchain.hardware import u8s8_saturates
from toolchain.runtime import (Bundle, ClassifyPredictor, Hardware, PREDICTORS, QAPredictor, explain,
                               read_requests, select)

CUDA = "CUDAExecutionProvider"
VNNI = Hardware(isa=("AVX512-VNNI", "AVX512", "AVX2"))
NO_VNNI = Hardware(isa=("AVX512", "AVX2"))
CUDA_OK = Hardware(providers=(CUDA, "CPUExecutionProvider"))
CONTEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named after the "
           "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
LONG = " ".join([CONTEXT, "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 "
                 "World's Fair.", CONTEXT.replace("Paris", "France"), "It is 330 metres tall."])


def _load(path, hardware=NO_VNNI, **kw):
    return Bundle.load(path, hardware=hardware, threads=1, **{"probe_runs": 0, **kw})


def _brute_force(graphs, budget, vnni, ep="cpu", batch=1):
    """(name, fits) by definition: most accurate within the budget (ties: faster), else the fastest."""
    key = latency_key(ep, batch)
    lat = lambda g: g["latency_ms"][key]["median"]  # noqa: E731
    usable = [g for g in graphs if g["precision"] == "fp32" or (g["ep"] == ep and (vnni or ep == "cuda"))]
    fitting = [g for g in usable if lat(g) <= budget]
    if fitting:
        return max(fitting, key=lambda g: (g["metrics"]["f1"], -lat(g)))["name"], True
    return min(usable, key=lat)["name"], False


@pytest.mark.parametrize("hardware, vnni", [(VNNI, True), (NO_VNNI, False)])
@pytest.mark.parametrize("batch", [1, 4])
def test_budget_sweep_matches_brute_force(measured, hardware, vnni, batch):
    bundle = _load(measured, hardware)
    graphs = bundle.manifest["graphs"]
    lats = sorted({g["latency_ms"][latency_key("cpu", batch)]["median"] for g in graphs})
    budgets = sorted({*lats, *np.linspace(lats[0] * 0.5, lats[-1] * 1.5, 41).round(3)})
    fits_seen = set()
    for budget in budgets:
        sel = bundle.select(budget_ms=float(budget), batch=batch)
        assert (sel.entry["name"], sel.fits) == _brute_force(graphs, budget, vnni, batch=batch), budget
        assert sel.ep == "cpu" and (sel.entry["precision"] == "fp32" or vnni)
        assert ("no graph fits" in sel.reason) == (not sel.fits)
        fits_seen.add(sel.fits)
    assert fits_seen == {True, False}


def test_budget_picks_int8_only_on_vnni(measured):
    assert _load(measured, VNNI).select(budget_ms=6.0).entry["name"] == "lat-full-int8-cpu"
    assert _load(measured, VNNI).select(budget_ms=4.5).entry["name"] == "lat-50-30-int8-cpu"
    sel = _load(measured, NO_VNNI).select(budget_ms=6.0)
    assert sel.entry["name"] == "lat-32-12"
    why = {c["name"]: c["rejected"] for c in explain(sel)["candidates"]}
    assert "without VNNI" in why["lat-full-int8-cpu"] and "cuda execution provider" in why["lat-full-int8-cuda"]
    assert why["lat-full"] == "10 ms over the budget of 6 ms" and why["lat-32-12"] is None


def test_reduce_range_int8_serves_without_vnni(measured, tmp_path):
    bundle = shutil.copytree(measured, tmp_path / "bundle")

    def seven_bit(manifest):
        for g in manifest["graphs"]:
            if g["name"] == "lat-full-int8-cpu":
                g["quantization"] = {"reduce_range": True}

    update_manifest(bundle, seven_bit)
    sel = _load(bundle, NO_VNNI).select(budget_ms=6.0)
    assert sel.entry["name"] == "lat-full-int8-cpu"
    why = {c["name"]: c["rejected"] for c in explain(sel)["candidates"]}
    assert "saturate" in why["lat-50-30-int8-cpu"]  # full range: still not served here


def test_full_range_int8_serves_on_arm(measured):
    """The saturating int16 pair sum is in x86's kernels only: an ARM64 CPU (no x86 ISA names) gets full-range graphs."""
    arm = Hardware(arch="aarch64")
    assert _load(measured, arm).select(budget_ms=4.5).entry["name"] == "lat-50-30-int8-cpu"
    assert _load(measured, Hardware()).select(budget_ms=4.5).entry["name"] != "lat-50-30-int8-cpu"


@pytest.mark.parametrize("isa, arch, saturates", [
    (["AVX2"], "x86_64", True), (["AVX512", "AVX2"], "x86_64", True), (["AVX-VNNI", "AVX2"], "x86_64", False),
    (["AVX512-VNNI", "AVX512"], "AMD64", False), (["AMX"], "x86_64", False), ([], "aarch64", False)])
def test_u8s8_saturation_by_cpu(isa, arch, saturates):
    assert u8s8_saturates(isa, arch) is saturates


def test_random_manifests_match_brute_force():
    rng = random.Random(0)
    key = latency_key("cpu", 1)
    for _ in range(200):
        graphs = [{"name": f"g{i}", "kind": "lat", "precision": "fp32", "format": "fp32", "ep": "cpu",
                   "macs": rng.randint(1, 9), "latency_ms": {key: {"median": float(rng.randint(1, 20))}},
                   "metrics": {} if rng.random() < 0.2 else {"f1": float(rng.randint(60, 64))}}
                  for i in range(rng.randint(1, 8))]
        budget = float(rng.randint(0, 22)) + 0.5
        lat = lambda g: g["latency_ms"][key]["median"]  # noqa: E731
        rank = lambda g: ("f1" in g["metrics"], g["metrics"].get("f1", 0), -lat(g), -g["macs"])  # noqa: E731
        fitting = [g for g in graphs if lat(g) <= budget]
        sel = select(graphs, budget_ms=budget, hardware=NO_VNNI)
        want = max(fitting, key=rank) if fitting else min(graphs, key=lambda g: (lat(g), g["macs"]))
        assert sel.fits == bool(fitting)
        assert rank(sel.entry) == rank(want) and lat(sel.entry) == lat(want)


def test_unmeasured_graphs_rank_below_measured():
    key = latency_key("cpu", 1)
    graphs = [{"name": n, "kind": "lat", "precision": "fp32", "format": "fp32", "ep": "cpu", "macs": 1,
               "latency_ms": {key: {"median": ms}}, "metrics": m}
              for n, ms, m in (("fast-unmeasured", 1.0, {}), ("slow", 9.0, {"accuracy": 50.0}))]
    assert select(graphs, budget_ms=10, hardware=NO_VNNI).entry["name"] == "slow"
    assert select(graphs, hardware=NO_VNNI).entry["name"] == "slow"
    assert select(graphs, budget_ms=5, hardware=NO_VNNI).entry["name"] == "fast-unmeasured"
    with pytest.raises(ToolchainError, match="no graph reaches accuracy 60"):
        select(graphs, min_f1=60, hardware=NO_VNNI)


def test_min_f1_policy(measured):
    assert _load(measured, VNNI).select(min_f1=79).entry["name"] == "lat-full-int8-cpu"
    assert _load(measured, NO_VNNI).select(min_f1=79).entry["name"] == "lat-full"
    sel = _load(measured, NO_VNNI).select(min_f1=75)
    assert sel.entry["name"] == "lat-50-30" and sel.fits and sel.policy == "min_f1"
    assert {c["name"]: c["rejected"] for c in explain(sel)["candidates"]}["lat-32-12"] == "accuracy 70 < 75"
    with pytest.raises(ToolchainError, match=r"no graph reaches accuracy 80\.5 on cpu \(best measured: 80\)"):
        _load(measured, VNNI).select(min_f1=80.5)


def test_max_macs_policy(measured):
    macs = {g["name"]: g["macs"] for g in load_manifest(measured)["graphs"]}
    limit = macs["lat-50-30"]
    assert _load(measured, VNNI).select(max_macs=limit).entry["name"] == "lat-50-30-int8-cpu"  # tie on f1: faster
    assert _load(measured, NO_VNNI).select(max_macs=limit).entry["name"] == "lat-50-30"
    sel = _load(measured, NO_VNNI).select(max_macs=1000)
    assert sel.entry["name"] == "lat-32-12" and not sel.fits and "cheapest" in sel.reason
    assert _load(measured, NO_VNNI).select().entry["name"] == "lat-full"  # no policy: the most accurate


def test_cuda_listed_but_unusable_falls_back_to_cpu(measured):
    graphs = load_manifest(measured)["graphs"]
    broken = Hardware(isa=VNNI.isa, providers=(CUDA, "CPUExecutionProvider"), cuda_error="libcudnn.so.9 not found")
    sel = select(graphs, budget_ms=6.0, hardware=broken)
    assert sel.ep == "cpu" and sel.entry["name"] == "lat-full-int8-cpu"
    assert any("CUDA not used" in n and "libcudnn.so.9" in n for n in sel.notes)
    assert explain(sel)["notes"] == sel.notes
    sel = select(graphs, budget_ms=6.0, hardware=NO_VNNI)
    assert sel.ep == "cpu" and any(f"no {CUDA}" in n for n in sel.notes)
    with pytest.raises(ToolchainError, match="CUDA execution provider is not usable: libcudnn"):
        select(graphs, budget_ms=6.0, ep="cuda", hardware=broken)
    assert select(graphs, budget_ms=6.0, ep="cpu", hardware=broken).notes == []


def test_cuda_usable_picks_cuda_graphs(measured):
    graphs = load_manifest(measured)["graphs"]
    for budget, want in ((0.5, "lat-full-int8-cuda"), (1.5, "lat-full-int8-cuda"), (2.6, "lat-full-int8-cuda"),
                         (3.0, "lat-full")):
        sel = select(graphs, budget_ms=budget, hardware=CUDA_OK)
        assert (sel.ep, sel.entry["name"], sel.fits) == ("cuda", want, budget >= 1.0)
        assert sel.latency_key == latency_key("cuda", 1) and not sel.notes
        assert (sel.entry["name"], sel.fits) == _brute_force(graphs, budget, False, "cuda")
    report = explain(select(graphs, budget_ms=2.6, hardware=CUDA_OK))
    why = {c["name"]: c["rejected"] for c in report["candidates"]}
    assert "made for the cpu execution provider" in why["lat-full-int8-cpu"]
    assert why["lat-50-30"] == "less accurate than lat-full-int8-cuda" and report["graph"] == "lat-full-int8-cuda"
    assert json.loads(json.dumps(report)) == report


@pytest.mark.timeout(120)
def test_latency_probe_is_cached_beside_the_bundle(plain, tmp_path, monkeypatch):
    bundle = shutil.copytree(plain, tmp_path / "b")
    calls = []
    probe = Bundle.probe
    monkeypatch.setattr(Bundle, "probe", lambda self, *a: calls.append(a[0]["name"]) or probe(self, *a))
    with pytest.raises(ToolchainError, match="no graph has a latency"):
        _load(bundle, probe_runs=0).select(budget_ms=100)
    assert not calls and not (bundle / runtime.CACHE).exists()
    sel = _load(bundle, probe_runs=2).select(budget_ms=100)
    assert sorted(calls) == sorted(c.name for c in sel.candidates)
    assert {c.latency_source for c in sel.candidates} == {"probe"} and sel.fits
    cache = json.loads((bundle / runtime.CACHE).read_text())
    key = latency_key("cpu", 1)
    assert all(cache[c.name]["latency_ms"][key]["median"] == c.latency_ms and cache[c.name]["sha256"] == c.entry["sha256"]
               for c in sel.candidates)
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []  # atomic write left no temp file
    calls.clear()
    again = _load(bundle, probe_runs=2).select(budget_ms=100)
    assert calls == [] and {c.latency_source for c in again.candidates} == {"cache"}
    assert [c.latency_ms for c in again.candidates] == [c.latency_ms for c in sel.candidates]
    load_manifest(bundle)  # the cache does not disturb checksum verification
    _load(bundle, probe_runs=2).select(batch=2)  # another batch size is another key: probed once more
    cache = json.loads((bundle / runtime.CACHE).read_text())
    assert len(calls) == 3 and all(set(rec["latency_ms"]) == {key, latency_key("cpu", 2)} for rec in cache.values())
    cache["lat-full"]["sha256"] = "0" * 64  # a record for another file is stale
    (bundle / runtime.CACHE).write_text(json.dumps(cache))
    calls.clear()
    _load(bundle, probe_runs=2).select()
    assert calls == ["lat-full"]
    (bundle / runtime.CACHE).write_text("{not json")  # an unreadable cache is ignored and rewritten
    calls.clear()
    _load(bundle, probe_runs=2).select()
    assert len(calls) == 3 and json.loads((bundle / runtime.CACHE).read_text()).keys() == cache.keys()


def _direct(bundle, entry, question, context):
    """The chosen graph run by hand: features, ONNX Runtime, postprocess."""
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    examples = [SquadExample("q", question, context, (), ())]
    feats = build_features(examples, tokenizer, SEQ, 16)
    session = ort.InferenceSession(str(graph_path(bundle, entry)), providers=["CPUExecutionProvider"])
    start, end = session.run(None, feats.inputs(slice(None)))
    return postprocess(examples, feats, start, end)["q"], len(feats)


def _same_answers(got, want):
    assert [{**a, "score": pytest.approx(a["score"], abs=1e-4)} for a in want] == got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch, budget", [(1, 8.0), (4, 20.0)])
@pytest.mark.parametrize("context", [CONTEXT, LONG])
def test_qa_predictor_matches_running_the_graph(measured, context, batch, budget):
    predictor = QAPredictor(_load(measured), budget_ms=budget, batch=batch)
    assert predictor.entry["name"] == "lat-50-30"
    answer = predictor.predict("Who designed the tower?", context)
    want, windows = _direct(measured, predictor.entry, "Who designed the tower?", context)
    assert windows == (1 if context == CONTEXT else 3)
    assert answer["answer"] and context[answer["start"]:answer["end"]] == answer["answer"]
    assert (answer["answer"], answer["start"], answer["end"]) == (want["text"], want["start"], want["end"])
    assert answer["score"] == pytest.approx(want["score"], abs=1e-4) and answer["graph"] == "lat-50-30"


@pytest.mark.timeout(120)
def test_predictor_serves_concurrent_callers(measured):
    predictor = QAPredictor(_load(measured), budget_ms=5.0)
    questions = ["Who designed the tower?", "Where is the tower?", "When was it built?", "How tall is it?"]
    requests = [(q, c) for q in questions for c in (CONTEXT, LONG)]
    want = [predictor.predict(q, c) for q, c in requests]
    jobs = [i % len(requests) for i in range(8 * 20)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: predictor.predict(*requests[i]), jobs))
    assert got == [want[i] for i in jobs]
    assert predictor.predict_batch(requests) == want
    _same_answers(QAPredictor(predictor.bundle, budget_ms=15.5, batch=4).predict_batch(requests[:3]), want[:3])


@pytest.mark.timeout(120)
def test_classify_predictor(tmp_path):
    ckpt = make_tiny_classifier_dir(tmp_path / "cls", labels=("neg", "pos"))
    bundle = export(ckpt, tmp_path / "b", ["full", "24,10"], optimize="none")
    loaded = Bundle.load(bundle, hardware=NO_VNNI, threads=1, probe_runs=1)
    predictor = PREDICTORS[loaded.task](loaded)
    assert isinstance(predictor, ClassifyPredictor)
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    session = ort.InferenceSession(str(graph_path(bundle, predictor.entry)), providers=["CPUExecutionProvider"])
    for text, pair in (("a gorgeous, witty film", None), ("it rains", "the film is dull")):
        got = predictor.predict(text, pair)
        enc = tokenizer(text, pair, truncation=True, max_length=32, padding="max_length", return_tensors="np")
        (logits,) = session.run(None, {k: enc[k].astype(np.int64) for k in predictor.entry["inputs"]})
        probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
        assert got == {"label": ["neg", "pos"][int(probs.argmax())], "score": pytest.approx(float(probs.max()), abs=1e-5),
                       "graph": predictor.entry["name"]}
    with pytest.raises(ToolchainError, match="is a classify bundle, not squad"):
        QAPredictor(predictor.bundle)
    with pytest.raises(ToolchainError, match="request 0: empty or missing text"):
        predictor.predict("  ")


def _edit(bundle, tmp_path, edit):
    copy = shutil.copytree(bundle, tmp_path / "b", dirs_exist_ok=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bad_bundles(measured, tmp_path):
    with pytest.raises(ToolchainError, match="bundle not found"):
        Bundle.load(tmp_path / "nowhere")
    copy = shutil.copytree(measured, tmp_path / "tampered")
    (copy / "lat-32-12.onnx").write_bytes((copy / "lat-32-12.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ToolchainError, match=r"checksum mismatch for lat-32-12\.onnx"):
        Bundle.load(copy)
    with pytest.raises(ToolchainError, match="schema_version 2"):
        Bundle.load(_edit(measured, tmp_path, lambda m: m.update(schema_version=2)))
    with pytest.raises(ToolchainError, match="escapes the bundle directory"):
        Bundle.load(_edit(measured, tmp_path, lambda m: m["graphs"][0].update(file="../../etc/passwd")))
    with pytest.raises(ToolchainError, match="has no graphs"):
        Bundle.load(_edit(measured, tmp_path, lambda m: m.update(graphs=[])))
    with pytest.raises(ToolchainError, match="unknown execution provider 'tpu'"):
        Bundle.load(measured, ep="tpu")


@pytest.mark.parametrize("kw, match", [
    ({"budget_ms": 0}, "budget_ms must be positive"), ({"budget_ms": -3}, "budget_ms must be positive"),
    ({"budget_ms": float("nan")}, "budget_ms must be positive"), ({"max_macs": 0}, "max_macs must be positive"),
    ({"min_f1": 100.5}, r"min_f1 must be within 0\.\.100"), ({"min_f1": -1}, r"min_f1 must be within 0\.\.100"),
    ({"batch": 0}, "batch must be a positive integer"), ({"batch": 1.5}, "batch must be a positive integer"),
    ({"budget_ms": 5, "min_f1": 70}, "at most one of budget_ms, min_f1, max_macs"),
])
def test_bad_policies(measured, kw, match):
    with pytest.raises(ToolchainError, match=match):
        _load(measured).select(**kw)


def test_bad_requests(measured, tmp_path):
    predictor = QAPredictor(_load(measured), budget_ms=8.0)
    for question, context, what in (("", CONTEXT, "question"), ("Who?", "   ", "context"), (None, CONTEXT, "question")):
        with pytest.raises(ToolchainError, match=f"request 0: empty or missing {what}"):
            predictor.predict(question, context)
    assert predictor.predict_batch([]) == []
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "Who?", "context": CONTEXT}) + "\n\n" + json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(ToolchainError, match=r"r\.jsonl:3: empty or missing context"):
        read_requests(path, QAPredictor.FIELDS, QAPredictor.REQUIRED)
    path.write_text('{"question": "Who?", "context": "x"}\n[1]\n')
    with pytest.raises(ToolchainError, match=r"r\.jsonl:2: expected a JSON object"):
        read_requests(path, QAPredictor.FIELDS, QAPredictor.REQUIRED)
    path.write_bytes(b'{"question": "caf\xe9?", "context": "x"}\n')
    with pytest.raises(ToolchainError, match=r"r\.jsonl is not UTF-8 text"):
        read_requests(path, QAPredictor.FIELDS, QAPredictor.REQUIRED)
    path.write_text('{"text": "fine"}\n{"text": "a", "text_pair": "b"}\n')
    assert read_requests(path, ClassifyPredictor.FIELDS, ClassifyPredictor.REQUIRED) == [("fine", None), ("a", "b")]


def test_latency_keys_tell_cpu_generations_apart(monkeypatch):
    """VMs name a Zen 1 and a Zen 4 alike ("AMD EPYC"); their latencies must not be mixed up."""
    import toolchain.bundle as bundle_module

    ids = set()
    for generation in ("23.1", "25.17"):
        info = {"model": "AMD EPYC", "generation": generation, "isa": ["AVX2"], "cores": 2}
        monkeypatch.setattr(bundle_module, "cpu_info", lambda info=info: info)
        ids.add(latency_key("cpu", 1))
    assert ids == {"cpu:amd-epyc-23-1-2c:b1", "cpu:amd-epyc-25-17-2c:b1"}
