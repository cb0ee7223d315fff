"""`toolchain export`: one ONNX graph per length configuration, verified against PyTorch, in a deployable bundle.

Each graph is a traced ``FixedLengthModel`` at ``max_seq_length``: which layers drop and how many tokens each keeps
are constants, batch and sequence length are dynamic (a shorter input, cut to its longest row, keeps at most as many
tokens as it has: the same answers as padded to full length, at less cost), and only standard-domain ONNX ops are
emitted. An optional graph optimization is chosen by measuring on the first graph. Every graph is checked against
PyTorch on dev inputs, one row cut to its own length and PARITY_BATCH rows at full length, before anything is
written.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from toolchain.bundle import machine_id, update_manifest, write_bundle
from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.evaluate import PER_TOKEN, Runner, session_runner
from toolchain.lat import FixedLengthModel, LengthAdaptiveModel, LengthConfig, parse_length_config
from toolchain.macs import count_macs
from toolchain.models import check_seq_length
from toolchain.train_lat import load_length_adaptive

OPSET = 17
ATOL = 1e-4  # max |ONNX Runtime - PyTorch| over logits
PARITY_BATCH = 8
OPTIMIZATIONS = ("none", "ort-basic", "ort-extended", "fusion")
PORTABLE = ("none", "ort-basic")  # standard ONNX domain only: what --optimize auto may pick
ORT_LEVELS = {"ort-basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "ort-extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
TIMING_THREADS = 2
TIMING_RUNS = 7
MIN_GAIN = 0.05  # an optimization is kept only when its median latency is this much below the plain graph's

Cases = list[tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]]


def graph_name(length_config: LengthConfig) -> str:
    """``lat-full`` or ``lat-315-251-242-159-142-33``."""
    return "lat-full" if length_config is None else "lat-" + "-".join(map(str, length_config))


def _export_graph(fixed: FixedLengthModel, inputs: dict[str, np.ndarray], outputs: Sequence[str], path: Path) -> None:
    names = list(inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(fixed, tuple(torch.from_numpy(v[:2]) for v in inputs.values()), str(path), dynamo=False,
                          opset_version=OPSET, input_names=names, output_names=list(outputs),
                          dynamic_axes={n: {0: "batch", 1: "sequence"} if n in names or n in PER_TOKEN else {0: "batch"}
                                        for n in [*names, *outputs]})


def _inline_weight_identities(path: Path) -> None:
    """Point the readers of ``Identity(initializer)`` at the initializer itself. The exporter writes such an
    Identity for each further use of a weight (the QA head, which the answer guard also applies inside the
    encoder), and quantization only recognises a weight read straight from its initializer."""
    model = onnx.load(str(path))
    graph = model.graph
    inits, outputs = {t.name for t in graph.initializer}, {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if alias:
        nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
        for node in nodes:
            node.input[:] = [alias.get(x, x) for x in node.input]
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))


def ort_runner(model: LengthAdaptiveModel, length_config: LengthConfig, sample: dict[str, np.ndarray],
               threads: int | None = None, start_layer: int = 0) -> Runner:
    """Score one configuration through ONNX Runtime: trace it to a temporary graph and load a CPU session.

    For evaluating many candidates (the search): ORT fp32 runs these graphs 2.2-2.9x faster than PyTorch
    eager on CPU, and tracing one costs about a second. `sample` holds model inputs (two rows suffice): token ids,
    or with `start_layer` the hidden states entering that layer and the attention mask.
    """
    from toolchain.sessions import ort_session

    outputs = ("start_logits", "end_logits") if model.task == "qa" else ("logits",)
    with tempfile.TemporaryDirectory(prefix="toolchain-score-") as tmp:
        path = Path(tmp) / "graph.onnx"
        _export_graph(FixedLengthModel(model.cpu().eval(), length_config, start_layer=start_layer), sample, outputs,
                      path)
        return session_runner(ort_session(path, threads))


def parity_cases(fixed: FixedLengthModel, inputs: dict[str, np.ndarray]) -> Cases:
    """(feed, PyTorch outputs) for the most padded row cut to its real length, and PARITY_BATCH rows at full length."""
    lengths = inputs["attention_mask"].sum(1)
    one = int(lengths.argmin())
    cases = []
    for rows, width in ((slice(one, one + 1), int(lengths[one])), (slice(0, PARITY_BATCH), None)):
        feed = {k: v[rows, :width] for k, v in inputs.items()}
        with torch.inference_mode():
            cases.append((feed, tuple(o.numpy() for o in fixed(*(torch.from_numpy(v) for v in feed.values())))))
    return cases


def check_parity(session: ort.InferenceSession, cases: Cases) -> dict:
    """Max |logit difference| <= ATOL and identical argmaxes (best start/end, or label) per row, else ToolchainError."""
    worst = 0.0
    for feed, want in cases:
        got = session.run(None, feed)
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        same = all(np.array_equal(g.argmax(-1), w.argmax(-1)) for g, w in zip(got, want))
        if not (diff <= ATOL and same):
            raise ToolchainError(
                f"ONNX Runtime and PyTorch disagree at batch {len(feed['input_ids'])}: max |logit difference| "
                f"{diff:.3g} (tolerance {ATOL:g}), best {'spans' if len(got) == 2 else 'labels'} "
                f"{'identical' if same else 'differ'}")
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "atol": ATOL, "batches": [len(feed["input_ids"]) for feed, _ in cases]}


def _session(path: Path, threads: int = 0, level: ort.GraphOptimizationLevel | None = None,
             save_to: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = level
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _optimize(method: str, raw: Path, dst: Path, config) -> Path:
    """The graph after ``method``: ``ort-basic``/``ort-extended`` save ORT's offline-optimized graph at that level;
    ``fusion`` applies onnxruntime.transformers' Gelu/LayerNorm/SkipLayerNorm/bias fusions, attention fusion off."""
    if method == "none":
        return raw
    dst.parent.mkdir(parents=True, exist_ok=True)
    if method in ORT_LEVELS:
        _session(raw, level=ORT_LEVELS[method], save_to=dst)
        return dst
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = options.enable_embed_layer_norm = options.enable_rotary_embeddings = False
    options.enable_qordered_matmul = False
    optimize_model(str(raw), "bert", config.num_attention_heads, config.hidden_size, options,
                   opt_level=0).save_model_to_file(str(dst))
    return dst


def _median_ms(paths: dict[str, Path], feed: dict[str, np.ndarray]) -> dict[str, dict]:
    """Batch-1 latency of each graph with TIMING_THREADS threads; runs interleave so load changes hit all alike."""
    sessions, load_ms = {}, {}
    for method, path in paths.items():
        t0 = time.perf_counter()
        sessions[method] = _session(path, TIMING_THREADS)
        load_ms[method] = 1e3 * (time.perf_counter() - t0)
        sessions[method].run(None, feed)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in sessions}
    for _ in range(TIMING_RUNS):
        for method, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            times[method].append(1e3 * (time.perf_counter() - t0))
    return {m: {"median_ms": round(statistics.median(t), 2), "load_ms": round(load_ms[m], 1)} for m, t in times.items()}


def choose_optimization(raw: Path, work: Path, config, cases: Cases, name: str) -> dict:
    """Try every method on one graph; keep the fastest *portable* one that passes parity (when MIN_GAIN faster
    than none). Portable methods keep the standard ONNX domain, so the graph quantizes with Neural Compressor and
    runs on every execution provider; the others are measured and recorded for information only."""
    check_parity(_session(raw), cases)  # the plain export must pass: a failure here is a real parity failure
    candidates: dict[str, dict] = {}
    paths = {"none": raw}
    for method in OPTIMIZATIONS[1:]:
        try:
            paths[method] = _optimize(method, raw, work / f"{method}.onnx", config)
            check_parity(_session(paths[method]), cases)
        except Exception as e:  # an optimizer that fails or breaks the custom TopK graph is skipped, with the reason
            candidates[method] = {"error": f"{type(e).__name__}: {e}"}
            paths.pop(method, None)
    candidates.update(_median_ms(paths, cases[0][0]))
    best = min((m for m in paths if m in PORTABLE), key=lambda m: candidates[m]["median_ms"])
    if candidates[best]["median_ms"] > (1 - MIN_GAIN) * candidates["none"]["median_ms"]:
        best = "none"
    return {"method": best, "selected": "auto", "measured_on": name, "machine": machine_id("cpu"), "batch": 1,
            "threads": TIMING_THREADS, "runs": TIMING_RUNS, "min_gain": MIN_GAIN, "candidates": candidates}


def _domains(path: Path) -> list[str]:
    return sorted({node.domain or "ai.onnx" for node in onnx.load(str(path)).graph.node})


def export(model_dir: str | Path, out_dir: str | Path, length_configs: Sequence[LengthConfig | str],
           max_seq_length: int | None = None, force: bool = False, optimize: str = "auto",
           protect_answers: int | None = None) -> Path:
    """Export one graph per length configuration (``None``/``"full"`` = no dropping) of a fine-tuned or
    length-adaptive checkpoint into a bundle at ``out_dir``; returns ``out_dir``. ``protect_answers``: the QA answer
    guard baked into the graphs (None: the default), recorded per graph.

    ``optimize``: ``auto`` measures every method in OPTIMIZATIONS on the first graph, or name one of them.
    Nothing is written unless every graph passes the PyTorch parity check.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if optimize not in ("auto", *OPTIMIZATIONS):
        raise ToolchainError(f"unknown optimization {optimize!r}: choose auto, {', '.join(OPTIMIZATIONS)}")
    if out_dir.exists() and not force:
        raise ToolchainError(f"output {out_dir} already exists (use --force to replace it)")
    if not model_dir.is_dir():
        raise ToolchainError(f"checkpoint not found: {model_dir}")
    wrapper, tokenizer, meta = load_length_adaptive(model_dir, protect_answers=protect_answers)
    wrapper.eval()
    config, task = wrapper.config, meta["task"]
    seq_len = check_seq_length(config, max_seq_length or meta.get("max_seq_length"))
    configs = list(dict.fromkeys(parse_length_config(c, wrapper.num_layers, seq_len) for c in length_configs))
    if not configs:
        raise ToolchainError("nothing to export: give at least one length configuration")
    inputs = prepare.sample_inputs(task, tokenizer, seq_len, PARITY_BATCH, meta.get("doc_stride", 128))
    outputs = ("start_logits", "end_logits") if wrapper.task == "qa" else ("logits",)

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.stage-",
                                     dir=out_dir.parent if out_dir.parent.is_dir() else None) as tmp:
        stage = Path(tmp)
        files: dict[str, Path] = {"config.json": model_dir / "config.json", "toolchain.json": model_dir / "toolchain.json"}
        entries, record = [], None
        for cfg in configs:
            name = graph_name(cfg)
            fixed = FixedLengthModel(wrapper, cfg).eval()
            raw = stage / "raw" / f"{name}.onnx"
            _export_graph(fixed, inputs, outputs, raw)
            _inline_weight_identities(raw)
            cases = parity_cases(fixed, inputs)
            try:
                if record is None:
                    record = (choose_optimization(raw, stage / "candidates", config, cases, name)
                              if optimize == "auto" else {"method": optimize, "selected": "user"})
                path = _optimize(record["method"], raw, stage / f"{name}.onnx", config)
                parity = check_parity(_session(path), cases)
            except ToolchainError as e:
                raise ToolchainError(f"graph {name} (optimization {record['method'] if record else 'none'}): {e}") from None
            files[f"{name}.onnx"] = path
            entries.append({
                "name": name, "file": f"{name}.onnx", "kind": "lat", "length_config": None if cfg is None else list(cfg),
                "max_seq_length": seq_len, "protect_answers": wrapper.protect_answers,
                "macs": count_macs(config, cfg, seq_len, wrapper.task, config.num_labels),
                "precision": "fp32", "format": "fp32", "ep": "cpu", "opset": OPSET, "inputs": list(inputs),
                "outputs": list(outputs), "metrics": {}, "latency_ms": {},
                "optimization": {**record, "domains": _domains(path)}, "parity": parity,
            })
        tokenizer.save_pretrained(stage / "tokenizer")
        files.update({p.name: p for p in (stage / "tokenizer").iterdir()})
        return write_bundle(out_dir, entries, files, force, task=task, source_checkpoint=model_dir.resolve())


def read_pareto(path: str | Path) -> list[list[int] | None]:
    """The length configurations of a pareto.json frontier (``{"frontier": [{"length_config": [...]}, ...]}``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolchainError(f"cannot read pareto file {path}: {e}") from None
    frontier = data.get("frontier") if isinstance(data, dict) else None
    if not isinstance(frontier, list) or not frontier:
        raise ToolchainError(f"{path}: expected an object with a non-empty 'frontier' list")
    for i, point in enumerate(frontier):
        if not isinstance(point, dict) or "length_config" not in point:
            raise ToolchainError(f"{path}: frontier entry {i} is not an object with a 'length_config'")
        if point["length_config"] is not None and not isinstance(point["length_config"], list):
            raise ToolchainError(f"{path}: frontier entry {i}: length_config must be a list of ints or null")
    return [point["length_config"] for point in frontier]


def chosen_config(path: str | Path) -> list[int]:
    """The configuration a pareto.json's search chose (`chosen`), checked like `read_pareto`."""
    read_pareto(path)
    chosen = json.loads(Path(path).read_text(encoding="utf-8")).get("chosen")
    if not isinstance(chosen, dict) or not isinstance(chosen.get("length_config"), list):
        raise ToolchainError(f"{path}: the search chose no configuration (none met its target)")
    return chosen["length_config"]


def searched_guard(path: str | Path, protect_answers: int | None) -> int:
    """The answer guard to use with a pareto.json's configurations: the one its search scored them with (0 for a
    search from before the guard); a different explicit value is refused, since the search's scores would not hold."""
    searched = json.loads(Path(path).read_text(encoding="utf-8")).get("protect_answers", 0)
    if protect_answers is not None and protect_answers != searched:
        raise ToolchainError(f"{path} was searched with protect-answers {searched}, not {protect_answers}: "
                             f"search again to use another guard")
    return searched


def export_pareto(model_dir: str | Path, pareto_json: str | Path, out_dir: str | Path,
                  max_seq_length: int | None = None, force: bool = False, optimize: str = "auto",
                  protect_answers: int | None = None) -> Path:
    """Export the full model, every configuration on a pareto.json frontier and the chosen one into one bundle.

    The search's report-split accuracy of each configuration (measured in PyTorch, which the graphs
    match) becomes the graph's `metrics`, and the manifest's `chosen` names the search's chosen graph
    (off the frontier when a selection split chose it). The graphs are exported at the sequence length the search ran at.
    """
    configs = read_pareto(pareto_json)
    pareto = json.loads(Path(pareto_json).read_text(encoding="utf-8"))
    chosen = pareto.get("chosen")
    if chosen and chosen["length_config"] not in configs:
        configs.append(chosen["length_config"])
    searched = pareto.get("max_seq_length")
    if max_seq_length and searched and max_seq_length != searched:
        raise ToolchainError(f"{pareto_json} was searched at max_seq_length {searched}; "
                             f"its configurations cannot be exported at {max_seq_length}")
    guard = searched_guard(pareto_json, protect_answers)
    out = export(model_dir, out_dir, [None, *configs], max_seq_length or searched, force, optimize, guard)
    points = {graph_name(None): pareto.get("full")}
    points.update({graph_name(tuple(p["length_config"])): p for p in [*pareto["frontier"], chosen or {}]
                   if p.get("length_config")})

    def record(manifest: dict) -> None:
        for entry in manifest["graphs"]:
            report = (points.get(entry["name"]) or {}).get("report")
            if report:
                entry["metrics"] = {**report, "split": "search report split", "data": pareto.get("splits", {}).get("data")}
        if chosen:
            manifest["chosen"] = graph_name(tuple(chosen["length_config"]))

    update_manifest(out, record)
    return out
