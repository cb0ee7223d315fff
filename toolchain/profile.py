"""`toolchain profile`: where one graph's time goes, in ONNX Runtime and in PyTorch eager at the same configuration.

ORT's profiler times every node's kernel and ``torch.profiler`` every aten op (self time, on the calling thread, so
intra-op parallel work counts once, as wall time); both are summed per op over ``repeats`` runs after warm-up and
grouped into categories the two engines share (GEMM, softmax, elementwise, ...); what no op accounts for in a
profiled run is ``framework``. The wall medians come from unprofiled runs of both engines, timed round-robin as the
bench times them. An fp32 graph is compared with PyTorch fp32, an INT8 graph with PyTorch dynamic INT8 (the bench's
rows).

The point is the bound it prints: both engines do the same matrix multiplications, so ORT's lead over PyTorch can be
at most the measured ratio over ORT's GEMM share (PyTorch's time over ORT's GEMM time), reached only if everything
else in ORT took no time. Where the GEMMs run near this machine's peak in both engines, that bound, not the graph,
limits the ratio. Shares are of profiled runs, which are slower (ORT's INT8 graph at 337,255,... batch 1 on a Zen 3:
33-41 ms profiled against 25-31 ms not); the profiler's cost per node weighs most on the many small ops, so the GEMM
share it shows is if anything low and the bound high.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from toolchain import bundle as bundles
from toolchain.bench import check_threads, real_inputs, torch_models, torch_runner, torch_source, torch_twin
from toolchain.errors import ToolchainError
from toolchain.files import atomic_path, write_json
from toolchain.hardware import keep_freed_memory, machine_summary
from toolchain.sessions import ort_session
from toolchain.timing import time_interleaved

# each engine's op names per category; an op in none of them is "other"
CATEGORIES = {
    "gemm": {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
             "QLinearMatMul", "QGemm", "MatMulNBits", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
             "aten::matmul", "aten::linear", "quantized::linear_dynamic"},
    "softmax": {"Softmax", "aten::softmax", "aten::_softmax"},
    "layernorm": {"LayerNormalization", "SkipLayerNormalization", "aten::layer_norm", "aten::native_layer_norm"},
    "activation": {"Gelu", "BiasGelu", "FastGelu", "Erf", "aten::gelu"},
    "elementwise": {"Add", "Sub", "Mul", "Div", "Where", "Equal", "Greater", "GreaterOrEqual", "Max", "IsInf", "Cast",
                    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::div", "aten::where",
                    "aten::eq", "aten::ge", "aten::gt", "aten::maximum", "aten::isinf", "aten::to", "aten::_to_copy",
                    "aten::masked_fill", "aten::masked_fill_"},
    "layout": {"Transpose", "Reshape", "Gather", "GatherElements", "ScatterND", "Concat", "Slice", "Split", "Squeeze",
               "Unsqueeze", "Expand", "aten::copy_", "aten::contiguous", "aten::clone", "aten::index", "aten::index_select",
               "aten::index_put_", "aten::gather", "aten::cat", "aten::embedding"},
    "token selection": {"TopK", "ReduceSum", "ReduceMin", "CumSum", "aten::sort", "aten::argsort", "aten::topk",
                        "aten::sum", "aten::amin", "aten::cumsum"},
    "quantize": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "aten::quantize_per_tensor"},
}
CATEGORY_OF = {op: name for name, ops in CATEGORIES.items() for op in ops}


def category(op: str) -> str:
    """The shared category of an ORT op type or aten op name."""
    return CATEGORY_OF.get(op, "other")


def _ort_profile(path: Path, inputs: dict[str, np.ndarray], threads: int, warmup: int, repeats: int,
                 spinning: bool) -> tuple[float, dict[str, float]]:
    """(mean wall ms, ms per run of each op type) over the last ``repeats`` of ``warmup + repeats`` profiled runs,
    from ORT's run and node kernel times."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, threads, spinning=spinning, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(warmup + repeats):
            sess.run(None, inputs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")[-repeats:]
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0][0]:
            ops[e["args"]["op_name"]] += e["dur"] / 1000 / repeats
    return statistics.fmean(d / 1000 for _, d in runs), dict(ops)


def _torch_profile(model: torch.nn.Module, inputs: dict[str, np.ndarray], repeats: int) -> tuple[float, dict[str, float]]:
    """(mean wall ms, ms per run of each aten op's self time) over ``repeats`` profiled runs (warm from the timing)."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    walls = []
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            start = time.perf_counter()
            model(**tensors)
            walls.append(1000 * (time.perf_counter() - start))
    ops = {e.key: e.self_cpu_time_total / 1000 / repeats for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return statistics.fmean(walls), ops


def _engine_row(engine: str, precision: str, wall_ms: float, profiled: tuple[float, dict[str, float]],
                flops: float) -> dict:
    """One engine's row: unprofiled median, and the profiled runs' mean split by category (``framework``: the part
    of a profiled run no op accounts for)."""
    profiled_ms, ops = profiled
    by_category: dict[str, float] = defaultdict(float)
    for op, ms in ops.items():
        by_category[category(op)] += ms
    by_category["framework"] = max(0.0, profiled_ms - sum(ops.values()))
    gemm = by_category.get("gemm", 0.0)
    return {"engine": engine, "precision": precision, "latency_ms_median": wall_ms, "profiled_ms_mean": profiled_ms,
            "categories_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "gemm_ms": gemm,
            "gemm_share": gemm / profiled_ms, "gemm_gops": flops / (gemm / 1000) / 1e9 if gemm else None}


def profile_graph(bundle_dir: Path, graph: str, batch: int = 1, threads: int | None = None, repeats: int = 10,
                  warmup: int = 2, torch_eager: bool = True, spinning: bool = False, keep_memory: bool = False,
                  rounds: int = 4, int8: bool = False) -> dict:
    """Per-op time of one length-adaptive CPU graph in ORT and of its PyTorch twin, at ``batch`` rows of real dev
    inputs at the graph's sequence length. ``graph`` may be ``chosen`` (the search's choice); ``int8`` takes the
    INT8 CPU graph quantized from it. The engines' wall medians are timed round-robin in ``rounds`` slices of
    ``repeats`` runs in all (``time_interleaved``), the profiles after. ``keep_memory``: malloc keeps freed memory
    (``keep_freed_memory``), so PyTorch does not fault its activations in afresh on every run (in a fresh process
    even at batch 1: lat-full 12-21k faults and 105-125 ms a run against 80-120 faults and 79-86 ms kept, Zen 3)."""
    if min(batch, repeats, rounds) <= 0:
        raise ToolchainError(f"batch, repeats and rounds must be positive, got {batch}, {repeats} and {rounds}")
    threads = check_threads(threads)
    manifest = bundles.load_manifest(bundle_dir)
    if graph == "chosen":
        graph = bundles.chosen_graph(manifest, bundle_dir)
    entry = next((g for g in manifest["graphs"] if g["name"] == graph), None)
    if entry is None:
        names = ", ".join(g["name"] for g in manifest["graphs"])
        raise ToolchainError(f"bundle {bundle_dir} has no graph {graph!r} (it has: {names})")
    if int8:
        entry = next((g for g in manifest["graphs"] if g.get("parent") == graph and g["precision"] == "int8"
                      and g["ep"] == "cpu"), None)
        if entry is None:
            raise ToolchainError(f"graph {graph} has no INT8 CPU graph in bundle {bundle_dir} (toolchain quantize "
                                 "makes one)")
        graph = entry["name"]
    if entry["kind"] != "lat" or entry["ep"] != "cpu":
        raise ToolchainError(f"graph {graph} is a {entry['kind']} graph for {entry['ep']}: profile takes the "
                             "length-adaptive CPU graphs")
    torch.set_num_threads(threads)
    malloc = keep_freed_memory() if keep_memory else "system default"
    meta = json.loads((bundle_dir / "toolchain.json").read_text())
    inputs = real_inputs(bundle_dir, meta, entry["max_seq_length"], batch)
    flops = 2.0 * entry["macs"] * batch
    path = bundles.graph_path(bundle_dir, entry)
    sess = ort_session(path, threads, spinning=spinning)
    engines = [("ort", entry["precision"], lambda: sess.run(None, inputs))]
    source = torch_source(manifest, "no PyTorch profile") if torch_eager else None
    if source:
        precision = "fp32" if entry["precision"] == "fp32" else "int8-dynamic"
        model = torch_twin(torch_models(source, (precision,))[precision], entry)
        engines.append(("torch", precision, torch_runner(model, inputs)))
    # unprofiled medians timed round-robin (as the bench does), so the ratio compares the same stretch of time
    walls = time_interleaved([run for *_, run in engines], rounds, warmup, repeats, desc=f"time {graph}")
    profiled = [_ort_profile(path, inputs, threads, warmup, repeats, spinning)]
    if source:
        profiled.append(_torch_profile(model, inputs, repeats))
    rows = [_engine_row(engine, precision, wall["latency_ms_median"], prof, flops)
            for (engine, precision, _), wall, prof in zip(engines, walls, profiled)]
    report = {"machine": {**machine_summary(threads), "ort_spinning": spinning, "malloc": malloc},
              "bundle": str(bundle_dir), "graph": graph, "length_config": entry["length_config"],
              "precision": entry["precision"], "batch": batch, "seq_length": entry["max_seq_length"],
              "macs": entry["macs"], "repeats": repeats, "engines": rows}
    if len(rows) == 2:
        ort_row, torch_row = rows
        report["ort_vs_torch"] = torch_row["latency_ms_median"] / ort_row["latency_ms_median"]
        report["ort_vs_torch_bound"] = report["ort_vs_torch"] / ort_row["gemm_share"] if ort_row["gemm_ms"] else None
    return report


def profile_table(report: dict, top: int = 6) -> str:
    """Markdown: ms per run of each category, one column per engine, then the GEMM share, rate and the bound, and
    each engine's ``top`` most expensive ops."""
    rows = report["engines"]
    names = sorted({c for r in rows for c in r["categories_ms"]},
                   key=lambda c: -max(r["categories_ms"].get(c, 0.0) for r in rows))
    head = "| ms per run | " + " | ".join(f"{r['engine']} {r['precision']}" for r in rows) + " |"
    lines = [head, "|" + " --- |" * (len(rows) + 1)]
    lines += [f"| {c} | " + " | ".join(f"{r['categories_ms'].get(c, 0.0):.2f}" for r in rows) + " |" for c in names]
    lines.append("| profiled run (mean) | " + " | ".join(f"{r['profiled_ms_mean']:.2f}" for r in rows) + " |")
    lines.append("| **unprofiled run (median)** | " + " | ".join(f"**{r['latency_ms_median']:.2f}**" for r in rows) + " |")
    lines.append("| GEMM share of a profiled run | " + " | ".join(f"{100 * r['gemm_share']:.0f}%" for r in rows) + " |")
    lines.append("| GEMM GOP/s (graph MACs x 2 / GEMM time) | "
                 + " | ".join(f"{r['gemm_gops']:.0f}" if r["gemm_gops"] else "-" for r in rows) + " |")
    text = "\n".join(lines) + "\n"
    if report.get("ort_vs_torch_bound"):
        text += (f"\nORT is {report['ort_vs_torch']:.2f}x PyTorch eager; with the same GEMMs, at most "
                 f"{report['ort_vs_torch_bound']:.2f}x (everything but ORT's GEMMs at zero cost: the ratio over ORT's "
                 "GEMM share).\n")
    for r in rows:
        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in list(r["ops_ms"].items())[:top])
        text += f"\n{r['engine']} {r['precision']}, most expensive ops (ms per run): {ops}"
    return text + "\n"


def plot_profile(report: dict, path: Path) -> Path:
    """A stacked horizontal bar per engine: ms per run by category, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["engines"]
    names = sorted({c for r in rows for c in r["categories_ms"]},
                   key=lambda c: -statistics.fmean(r["categories_ms"].get(c, 0.0) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.5 * len(rows)))
    labels = [f"{r['engine']} {r['precision']}" for r in rows]
    left = np.zeros(len(rows))
    for i, name in enumerate(names):
        widths = np.array([r["categories_ms"].get(name, 0.0) for r in rows])
        ax.barh(labels, widths, left=left, label=name, color=plt.get_cmap("tab10")(i % 10))
        left += widths
    ax.set_title(f"{report['graph']}, batch {report['batch']}, seq {report['seq_length']}, "
                 f"{report['machine']['threads']} threads", fontsize=9)
    ax.set_xlabel("ms per profiled run")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_report(report: dict, json_out: Path | None, plot_out: Path | None) -> None:
    """Write the JSON and the PNG, each atomically."""
    if json_out:
        write_json(json_out, report)
    if plot_out:
        plot_profile(report, plot_out)
