"""`toolchain quantize`: accuracy-aware static INT8 of a bundle's fp32 graphs with Intel Neural Compressor.

Length-adaptive (``lat``) graphs and a GEEP bundle's per-depth (``geep-exit``) graphs are quantized; an INT8 graph
keeps its parent's kind, length configuration and depth.

Each selected graph is preprocessed as ONNX Runtime recommends (``quant_pre_process``: symbolic shape inference,
basic graph optimization, ONNX shape inference) and calibrated (MinMax) on train-split features built by the
bundle's own pipeline at the graph's ``max_seq_length``. A length-adaptive graph has its TopK token selection baked
in, so calibration runs at that graph's own length configuration. MatMul weights are int8 per output channel; the
embedding tables are 8-bit too. INC's ``autotune`` then tries every weight op in INT8, then keeps one more group in fp32
per trial (FALLBACK order) until the INT8 graph's F1 (SQuAD) or accuracy (classification) on a held-out dev split
is within ``tolerance`` points of the fp32 graph's. The new graphs join the bundle only once every selected graph
has passed; on any failure the bundle is left as it was.

On the CPU the static INT8 MatMuls keep fp32 outputs (``MatMulIntegerToFloat``, Neural Compressor with MatMul
output quantization off) with the following bias Add folded in, and a MatMul that static INT8 leaves out is quantized
dynamically (int8 weights per output channel, uint8 activations with each run's range) instead of kept in fp32.
Requantizing every MatMul output to uint8 (``QLinearMatMul``, INC's default) cost 3.7 F1 on lat-full of the
384-trained LA model (2,000 report-split questions, fp32 56.28: 52.52) and needed the FFN output projections left
out; with fp32 outputs every MatMul is static INT8 at 55.89. It is faster too: no DequantizeLinear after each
MatMul, no separate bias pass, and ORT's GELU fusion still applies (lat-full batch 1, 2 threads, interleaved
medians while a training job shared the cores: fp32 58.3 ms, requantized outputs with weight-only FFN out 36.2 ms,
fp32 outputs 30.3 ms, + folded biases 28.2 ms). INC also leaves the attention (activation x activation) MatMuls in
fp32: it quantizes such a MatMul only when an input already is, which its bias Add (fp32 here) prevents. Quantizing
the Adds too makes them INT8 but slower (all-QLinear attention and no GELU/FusedMatMul fusions: 50.2 vs 42.5 ms at
one thread).

Formats per target:

- ``cpu`` (VNNI): U8S8 (uint8 activations, int8 weights), QOperator. On a CPU without VNNI or AMX, ONNX Runtime's
  U8S8 GEMMs (AVX2 ``vpmaddubsw``) add pairs of uint8 x int8 products in int16 and saturate: on this project's Zen 1
  machine a 64 x 384 x 384 ``MatMulInteger`` with full-range int8 weights got 99.9% of its outputs wrong (off by up
  to 99,264 on random inputs). With 7-bit weights (``reduce_range``, -64..63) a pair cannot overflow and the result
  is exact on every CPU, so ``reduce_range=None`` (auto) picks it when the quantizing CPU is an x86 without
  VNNI/AMX (``hardware.u8s8_saturates``), where a full-range graph's accuracy check would measure saturated outputs;
  full range is refused there. The manifest records ``reduce_range``, and the runtime serves only reduce-range CPU
  graphs on such CPUs. With requantized MatMul outputs the two formats
  tied within 1.5% (MiniLM-L6-H384, seq 384, batch 1, 2 threads, ORT 1.31.1, medians of 60-100 interleaved runs).
  With fp32 outputs QDQ is slower: ORT dequantizes the whole embedding table before its Gather on every run (5.3 ms
  of 39.4 at one thread, lat-full), where a QOperator Gather reads the uint8 rows and dequantizes only those (32.5 ms).
- ``cuda``: S8S8 QDQ (symmetric int8 activations and weights). ORT's CUDA EP has no QLinear* kernels; a
  QOperator graph would silently fall back to the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnx_neural_compressor.algorithms.post_training_quant.calibrate import ONNXRTAugment
from onnx_neural_compressor.algorithms.post_training_quant.quantizer import StaticQuantizer
from onnx_neural_compressor.quantization import config, tuning
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from toolchain.bundle import add_graph, chosen_graph, graph_path, load_manifest, prune_weights, update_manifest
from toolchain.data import prepare
from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError
from toolchain.evaluate import Runner, evaluate_classify, evaluate_squad, session_runner
from toolchain.hardware import cpu_info, u8s8_saturates
from toolchain.models import read_meta
from toolchain.sessions import ort_session

CALIB_BATCH = 8
FORMATS = {  # ep -> (manifest format, INC StaticQuantConfig arguments)
    "cpu": ("qoperator", dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                              weight_type=QuantType.QInt8, execution_provider="CPUExecutionProvider",
                              extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})),
    "cuda": ("qdq", dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                         execution_provider="CUDAExecutionProvider",
                         extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})),
}
# Fallback order, most sensitive first. MinMax ranges are set by outliers: the FFN output projection reads the GELU
# output and Q/K/V read a layer norm's output with its outlier dimensions. Fine-tuned MiniLM at seq 384, 300
# calibration rows, 200 dev questions: fp32 F1 49.0; all INT8 44.5; FFN out fp32 47.4; + Q/K/V fp32 50.6 (+ FFN in
# instead 49.4, + attention out instead 47.7). The embeddings come last: they hold most of the size saving.
FALLBACK = ("ffn-out", "qkv", "ffn-in", "attention-out", "head", "embeddings")
NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization")

QUANTIZABLE = ("lat", "geep-exit")  # graph kinds; a GEEP bundle's predictor graph (table lookups) is not quantized
Evaluator = Callable[[Runner], dict]


def weight_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that read an fp32 weight: MatMul/Gemm with an fp32 initializer B, Gather from an fp32 table."""
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [n for n in graph.node if (n.op_type in ("MatMul", "Gemm") and n.input[1] in floats)
            or (n.op_type == "Gather" and n.input[0] in floats)]


def fallback_units(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Weight nodes by role, in FALLBACK order; roles are told apart by the layer norms before a node.

    Graphs are topologically sorted: no norm before the embeddings, one after them, then per encoder layer an
    attention segment (Q, K, V, then the attention output projection last) and a feed-forward segment (FFN in,
    then FFN out last), each closed by a norm; the head follows the last norm. The answer guard's uses of the head's
    weights inside the encoder belong to the head.
    """
    total = sum(n.op_type in NORMS for n in graph.node)
    weights = {n.name: n.input[0] if n.op_type == "Gather" else n.input[1] for n in weight_nodes(graph)}
    segments: dict[int, list[str]] = {}
    norms = 0
    for node in graph.node:
        norms += node.op_type in NORMS
        if node.name in weights:
            segments.setdefault(norms, []).append(node.name)
    units: dict[str, list[str]] = {unit: [] for unit in FALLBACK}
    for count, nodes in segments.items():
        if count in (0, total):
            units["embeddings" if count == 0 else "head"] += nodes
        else:
            first, last = ("qkv", "attention-out") if count % 2 else ("ffn-in", "ffn-out")
            units[first] += nodes[:-1]
            units[last].append(nodes[-1])
    head = {weights[n] for n in units["head"]}
    for unit in ("qkv", "attention-out", "ffn-in", "ffn-out"):
        units["head"] += [n for n in units[unit] if weights[n] in head]
        units[unit] = [n for n in units[unit] if weights[n] not in head]
    return {unit: nodes for unit, nodes in units.items() if nodes}


def fold_bias(graph: onnx.GraphProto) -> None:
    """Move each ``MatMulIntegerToFloat -> Add(bias)`` pair's bias into the MatMul's optional bias input (in place).

    ONNX Runtime fuses this pair only in dynamically quantized graphs; in a static one the Add is a separate pass over
    the output.
    """
    vectors = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = []
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > 6 or len(readers.get(node.output[0], [])) != 1:
            continue
        (add,) = readers[node.output[0]]
        bias = [i for i in add.input if i != node.output[0]]
        if add.op_type != "Add" or len(bias) != 1 or bias[0] not in vectors:
            continue
        node.input.extend([""] * (6 - len(node.input)) + bias)
        node.output[0] = add.output[0]
        folded.append(add)
    for add in folded:
        graph.node.remove(add)


def cpu_graph(model: onnx.ModelProto, out: Path, reduce_range: bool) -> list[str]:
    """Save INC's CPU graph to ``out`` with the biases folded into the integer MatMuls and the MatMuls static INT8
    left out (fp32 weights) dynamically quantized (7-bit weights with ``reduce_range``); returns those MatMuls'
    names."""
    fold_bias(model.graph)
    names = [n.name for n in weight_nodes(model.graph) if n.op_type == "MatMul"]
    if names:
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=names, per_channel=True,
                         weight_type=QuantType.QInt8, reduce_range=reduce_range)
    else:
        onnx.save(model, out)
    return names


class _Reader:
    """INC calibration reader: the calibration rows in batches of CALIB_BATCH."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs, self.rows, self.pos = inputs, len(inputs["input_ids"]), 0
        self.batches = math.ceil(self.rows / CALIB_BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.rows:
            return None
        self.pos += CALIB_BATCH
        return {k: v[self.pos - CALIB_BATCH:self.pos] for k, v in self.inputs.items()}

    def rewind(self) -> None:
        self.pos = 0


def _runner(path: Path | str, ep: str) -> Runner:
    return session_runner(ort_session(Path(path), ep=ep))


def _task_data(bundle_dir: Path, task: str, tokenizer, calib_data: str | Path, eval_data: str | Path, seq_len: int,
               calib_samples: int, eval_examples: int | None, seed: int, eval_skip: int = 0,
               ) -> tuple[dict[str, np.ndarray], Evaluator]:
    """(calibration inputs from the train split, evaluator on the dev split), tokenized at ``seq_len``."""
    meta = read_meta(bundle_dir)
    if task == "squad":
        stride = min(meta.get("doc_stride", 128), seq_len // 2)  # as in export
        examples, feats = prepare.squad_split(calib_data, tokenizer, seq_len, stride, calib_samples, seed,
                                              split="train", balanced=False)
        calib, found = feats.inputs(slice(0, calib_samples)), len(examples)
        dev, dev_feats = prepare.squad_split(eval_data, tokenizer, seq_len, stride, eval_examples, skip=eval_skip)
        evaluate = lambda run: evaluate_squad(run, dev, dev_feats, desc="quantize eval")[0]  # noqa: E731
    else:
        columns = prepare.Columns.from_meta(meta)
        _, arrays = prepare.classify_split(calib_data, tokenizer, seq_len, meta["labels"], columns, calib_samples, seed)
        calib, found = {k: v for k, v in arrays.items() if k != "labels"}, len(arrays["labels"])
        _, dev_arrays = prepare.classify_split(eval_data, tokenizer, seq_len, meta["labels"], columns, eval_examples,
                                               skip=eval_skip)
        evaluate = lambda run: evaluate_classify(run, dev_arrays, desc="quantize eval")[0]  # noqa: E731
    if found < calib_samples:
        raise ToolchainError(f"calibration data {calib_data} holds {found} examples, fewer than the "
                             f"{calib_samples} calibration samples asked for")
    return calib, evaluate


def _select(manifest: dict, bundle_dir: Path, graphs: list[str] | None, ep: str) -> list[dict]:
    """The fp32 ``lat`` and ``geep-exit`` graphs to quantize (all of them by default), refusing names whose INT8
    graph exists.

    The name ``chosen`` stands for the graph the search chose (the manifest's ``chosen``, set by export --pareto).
    """
    fp32 = {g["name"]: g for g in manifest["graphs"] if g["precision"] == "fp32" and g["kind"] in QUANTIZABLE}
    if graphs and "chosen" in graphs:
        graphs = [chosen_graph(manifest, bundle_dir) if g == "chosen" else g for g in graphs]
    unknown = [name for name in graphs or [] if name not in fp32]
    if unknown:
        raise ToolchainError(f"no fp32 graph named {', '.join(map(repr, unknown))} in bundle {bundle_dir}; "
                             f"choose from {', '.join(fp32) or 'none'}")
    selected = [fp32[name] for name in dict.fromkeys(graphs or fp32)]
    if not selected:
        raise ToolchainError(f"bundle {bundle_dir} has no fp32 graphs to quantize")
    names = {g["name"] for g in manifest["graphs"]}
    todo = [e for e in selected if int8_name(e["name"], ep) not in names]
    for entry in selected:
        if entry not in todo:
            logging.getLogger(__name__).warning("%s already has %s; skipped", bundle_dir, int8_name(entry["name"], ep))
        elif (bundle_dir / f"{int8_name(entry['name'], ep)}.onnx").exists():
            raise ToolchainError(f"bundle {bundle_dir} has a stray file {int8_name(entry['name'], ep)}.onnx not in its manifest")
    return todo


def _weight_range(reduce_range: bool) -> contextlib.AbstractContextManager:
    """Make INC's static quantizer use 7-bit weights when ``reduce_range``: onnx-neural-compressor 1.0 accepts
    ``StaticQuantConfig(reduce_range=True)`` but its ``static_quantize_entry`` builds the ``StaticQuantizer`` without
    it, so the weights came out full range (checked by ``tests/test_quantize.py``)."""
    if not reduce_range:
        return contextlib.nullcontext()
    return mock.patch.object(StaticQuantizer, "__init__",
                             functools.partialmethod(StaticQuantizer.__init__, reduce_range=True))


@contextlib.contextmanager
def _calibrate_once():
    """Make INC's autotune calibrate a graph once, not once per trial: every trial runs the same fp32 graph on the same
    samples and every tensor is MinMax-calibrated, so the ranges come out the same each time (a trial only changes
    which nodes use them). Calibration at seq 384 is about a minute of a trial here."""
    ranges = {}
    dump = ONNXRTAugment.dump_minmax

    def dump_once(augment: ONNXRTAugment, q_config: dict) -> dict:
        if not ranges:
            ranges.update(dump(augment, q_config))
        return copy.deepcopy(ranges)

    with mock.patch.object(ONNXRTAugment, "dump_minmax", dump_once):
        yield


def int8_name(parent: str, ep: str) -> str:
    """``lat-full`` -> ``lat-full-int8-cpu``."""
    return f"{parent}-int8-{ep}"


def _quantize_graph(bundle_dir: Path, entry: dict, work: Path, calib: dict[str, np.ndarray], evaluate: Evaluator,
                    metric: str, tolerance: float, ep: str, max_trials: int, reduce_range: bool) -> tuple[dict, Path]:
    """Tune one graph; returns (manifest entry, staged INT8 file) or raises ToolchainError with the best reached."""
    t0 = time.perf_counter()
    fp32_path, name = graph_path(bundle_dir, entry), entry["name"]
    pre = work / f"{name}.pre.onnx"
    src, dst = fp32_path.resolve(), pre.resolve()  # before the chdir below
    try:
        with contextlib.chdir(work.resolve()):  # its shape inference may drop temporary external-data files in the cwd
            # auto_merge: graphs with a dynamic sequence axis (GEEP's) slice position ids to Min(max positions,
            # sequence), which symbolic shape inference must merge with the sequence axis; fixed-length graphs have
            # nothing to merge
            quant_pre_process(src, dst, auto_merge=True)
    except Exception as e:  # symbolic shape inference cannot see through ONNX Runtime contrib ops
        raise ToolchainError(f"cannot prepare {name} for quantization ({type(e).__name__}: {e}); graphs with ONNX "
                             "Runtime contrib ops (export --optimize ort-extended or fusion) do not quantize: "
                             "re-export with --optimize auto or none") from None
    fp32 = evaluate(_runner(fp32_path, ep))
    units = fallback_units(onnx.load(pre, load_external_data=False).graph)
    trials: list[dict] = []

    def score(path: str) -> float:  # autotune's first call is the fp32 baseline, already measured
        if Path(path) == pre:
            return fp32[metric]
        model = onnx.load(path)
        kept = {n.name for n in weight_nodes(model.graph)}
        if ep == "cpu":
            cpu_graph(model, trial := work / f"{name}.trial.onnx", reduce_range)
            path = str(trial)
        trials.append({"fallback_units": [u for u, nodes in units.items() if kept.issuperset(nodes)],
                       "fp32_nodes": sorted(kept), "metrics": evaluate(_runner(path, ep))})
        return trials[-1]["metrics"][metric]

    reader = _Reader(calib)
    fmt, kwargs = FORMATS[ep]
    unit_list = list(units.values())
    configs = [config.StaticQuantConfig(nodes_to_exclude=[n for nodes in unit_list[:i] for n in nodes],
                                        per_channel=True, reduce_range=reduce_range,
                                        calibration_sampling_size=reader.batches, **kwargs)
               for i in range(min(max_trials, len(unit_list)))]
    goal = tuning.TuningConfig(configs, tolerable_loss=tolerance / fp32[metric] if fp32[metric] > 0 else 0.0,
                               max_trials=len(configs))
    try:
        with _weight_range(reduce_range), _calibrate_once():
            model = tuning.autotune(str(pre), goal, score, calibration_data_reader=reader,
                                    optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except SystemExit:  # INC exits when no configuration is left to try
        model = None
    if model is None or not trials or trials[-1]["metrics"][metric] < fp32[metric] - tolerance:
        best = max(trials, key=lambda t: t["metrics"][metric], default=None)
        reached = (f"best INT8 {metric} {best['metrics'][metric]:.2f} (static INT8 left out: "
                   f"{', '.join(best['fallback_units']) or 'nothing'})" if best else "no INT8 graph")
        raise ToolchainError(
            f"graph {name}: INT8 {metric} is not within {tolerance:g} points of fp32 {fp32[metric]:.2f} after "
            f"{len(trials)} trials; {reached}. The fp32 graph stays the answer and the bundle is unchanged "
            "(allow more trials or a larger tolerance)")
    out = work / f"{name}.int8.onnx"
    for tensor in model.graph.initializer:  # INC leaves INT8 tables in int32_data, a varint per value: store raw bytes
        if tensor.int32_data:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    if ep == "cpu":
        dynamic = cpu_graph(model, out, reduce_range)
    else:
        dynamic = []
        onnx.save(model, out)
    accepted, seconds = trials[-1], time.perf_counter() - t0
    quantization = {
        "tool": f"onnx-neural-compressor {version('onnx-neural-compressor')}", "format": fmt,
        "activations": "int8" if ep == "cuda" else "uint8",
        "weights": f"{'7-bit (reduce_range) ' if reduce_range else ''}int8 per output channel",
        "reduce_range": reduce_range,
        "embeddings": f"{'int8' if ep == 'cuda' else 'uint8'} per tensor",
        "calibration": {"method": "MinMax", "samples": len(calib["input_ids"]), "seq_len": entry["max_seq_length"],
                        "preprocess": "onnxruntime quant_pre_process"},
        "tolerance": tolerance, "metric": metric, "fallback_units": accepted["fallback_units"],
        "fallback": "dynamic int8" if ep == "cpu" else "fp32",
        "fp32_nodes": sorted(set(accepted["fp32_nodes"]) - set(dynamic)),
        "dynamic": {"op": "com.microsoft.DynamicQuantizeMatMul", "activations": "uint8 per tensor, range of each run",
                    "weights": "as the static ones", "nodes": dynamic},
        "trials": [{"fallback_units": t["fallback_units"], metric: t["metrics"][metric]} for t in trials],
        "size_ratio": round(out.stat().st_size / entry["size_bytes"], 4), "seconds": round(seconds, 1),
    }
    new = {key: entry[key] for key in ("kind", "depth", "length_config", "protect_answers", "max_seq_length", "macs",
                                       "opset", "inputs", "outputs") if key in entry}
    new.update(name=int8_name(name, ep), file=f"{int8_name(name, ep)}.onnx", precision="int8", format=fmt, ep=ep,
               metrics={**accepted["metrics"], "fp32": fp32}, latency_ms={}, parent=name,
               optimization={"method": "quantize-static", "parent_method": entry["optimization"].get("method")},
               quantization=quantization)
    return new, out


def _commit(bundle_dir: Path, staged: list[tuple[dict, Path]]) -> None:
    """Add every staged graph; on any failure restore the manifest, then remove the files already added."""
    before = load_manifest(bundle_dir, verify=False)
    added: list[Path] = []
    try:
        for entry, src in staged:
            add_graph(bundle_dir, src, entry)
            added.append(graph_path(bundle_dir, entry))
    except BaseException:
        update_manifest(bundle_dir, lambda _: before)
        for path in added:
            path.unlink(missing_ok=True)
        prune_weights(bundle_dir)
        raise


def quantize_bundle(bundle_dir: str | Path, calib_data: str | Path, eval_data: str | Path,
                    graphs: list[str] | None = None, calib_samples: int = 300, eval_examples: int | None = None,
                    tolerance: float = 1.0, ep: str = "cpu", seed: int = 0, max_trials: int = 3,
                    eval_skip: int = 0, reduce_range: bool | None = None) -> list[dict]:
    """Static INT8 of the bundle's fp32 graphs (all, or ``graphs``) for ``ep`` (``cpu`` or ``cuda``).

    ``calib_samples`` feature rows from ``calib_data`` (a train split) calibrate each graph at its own length;
    ``eval_examples`` of ``eval_data`` after the first ``eval_skip`` of its seeded permutation (a dev split
    disjoint from the search split; None = all) score it. ``reduce_range``: 7-bit weights (exact on CPUs without
    VNNI/AMX); None = on exactly when ``ep`` is cpu and this is an x86 CPU without VNNI/AMX. Up to ``max_trials``
    fallback configurations are tried per graph. Returns the new manifest entries; raises ToolchainError, leaving the bundle
    unchanged, on bad input or when a graph cannot get within ``tolerance`` F1/accuracy points of its fp32 parent.
    """
    if ep not in FORMATS:
        raise ToolchainError(f"unknown execution provider {ep!r}: choose one of {', '.join(FORMATS)}")
    if tolerance < 0 or calib_samples < 1 or max_trials < 1:
        raise ToolchainError("tolerance must be >= 0, calib_samples and max_trials >= 1")
    if reduce_range is None:
        reduce_range = ep == "cpu" and u8s8_saturates()
    elif ep == "cpu" and not reduce_range and u8s8_saturates():
        raise ToolchainError(f"this CPU ({cpu_info()['model']}, {', '.join(cpu_info()['isa']) or 'no AVX2'}) has no "
                             "VNNI or AMX: full-range U8S8 MatMuls saturate in ONNX Runtime here, so the accuracy check "
                             "would score wrong outputs; use --reduce-range (7-bit weights, exact on any CPU) or "
                             "quantize on a CPU with VNNI")
    if Path(calib_data).is_file() and Path(calib_data).resolve() == Path(eval_data).resolve():
        raise ToolchainError(f"calibration and evaluation data are the same file ({calib_data}): calibrate on the "
                             "train split, score on a held-out dev split")
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    selected = _select(manifest, bundle_dir, graphs, ep)
    task = manifest["task"]
    tokenizer = TextTokenizer.load(bundle_dir)
    data = {seq: _task_data(bundle_dir, task, tokenizer, calib_data, eval_data, seq, calib_samples, eval_examples, seed,
                            eval_skip)
            for seq in sorted({g["max_seq_length"] for g in selected})}
    logging.getLogger("onnx_neural_compressor").setLevel(logging.WARNING)  # INC logs every trial's op statistics
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # and ORT each node
    with tempfile.TemporaryDirectory(prefix=f".{bundle_dir.name}.quantize-", dir=bundle_dir.parent) as tmp, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specified provider")  # cuda format calibrates on the CPU here
        staged = [_quantize_graph(bundle_dir, g, Path(tmp), *data[g["max_seq_length"]],
                                  "f1" if task == "squad" else "accuracy", tolerance, ep, max_trials, reduce_range)
                  for g in selected]
        for entry, _ in staged:
            entry["metrics"]["data"] = str(eval_data)
            entry["quantization"]["calibration"].update(data=str(calib_data), seed=seed)
        _commit(bundle_dir, staged)
    stored = {g["name"]: g for g in load_manifest(bundle_dir, verify=False)["graphs"]}
    return [stored[entry["name"]] for entry, _ in staged]
