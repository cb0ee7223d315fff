"""`toolchain bench`: ORT vs PyTorch latency for every graph of a bundle, BERT-base reference, Table 1, plots.

Latency is the median (and p90) of repeated runs after warm-up, with a fixed number of intra-op
threads, on real dev inputs at the graph's sequence length. Each graph is also timed in PyTorch
eager (fp32, and dynamic INT8 for fp32 graphs) at the same length configuration, and BERT-base
(random weights: latency needs no trained weights) is timed in PyTorch and ORT fp32 in the same
run, so every speedup is a ratio from one run. A roofline column divides each graph's op count
by this machine's measured GEMM peak for its precision.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from toolchain import bundle as bundles
from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError
from toolchain.files import write_json, write_text
from toolchain.hardware import cpu_info, keep_freed_memory, machine_summary, release_freed_memory
from toolchain.search import pareto_front
from toolchain.sessions import ort_session
from toolchain.timing import time_fn, time_interleaved


def real_inputs(bundle_dir: Path, meta: dict, seq: int, batch: int) -> dict[str, np.ndarray]:
    """`batch` rows of real dev inputs at length `seq` for a bundle (its tokenizer, task and doc stride)."""
    from toolchain.data.prepare import sample_inputs

    return sample_inputs(meta["task"], TextTokenizer.load(bundle_dir), seq, batch, meta.get("doc_stride", 128))


def gemm_peak(precision: str, threads: int, m: int = 1536, k: int = 1536, n: int = 1536) -> float:
    """Measured GEMM throughput of ORT on this machine, in GOP/s (1 MAC = 2 ops)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "int8":
        w = numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "w")
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
        x_type, y_type, x = TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 255, (m, k), dtype=np.uint8)
    else:
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_type, y_type, x = TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((m, k), dtype=np.float32)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", x_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort_session(model.SerializeToString(), threads)
    t = time_fn(lambda: sess.run(None, {"x": x}), warmup=3, repeats=20)["latency_ms_median"]
    return 2 * m * k * n / (t / 1000) / 1e9


def torch_source(manifest: dict, skipped: str) -> Path | None:
    """The bundle's source checkpoint, or None with a warning that ``skipped`` (the PyTorch side) cannot run."""
    source = Path(manifest.get("source_checkpoint", ""))
    if (source / "config.json").is_file():
        return source
    import click

    click.echo(f"warning: source checkpoint {source} not found; {skipped}", err=True)
    return None


def torch_models(source: Path, precisions: tuple[str, ...] = ("fp32", "int8-dynamic")) -> dict[str, torch.nn.Module]:
    """The source checkpoint's length-adaptive model in fp32 and/or PyTorch dynamic INT8, loaded once."""
    from toolchain.train_lat import load_length_adaptive

    model = load_length_adaptive(source)[0].eval()
    models = {"fp32": model}
    if "int8-dynamic" in precisions:
        models["int8-dynamic"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return {p: models[p] for p in precisions}


def torch_twin(model: torch.nn.Module, entry: dict) -> torch.nn.Module:
    """``model`` (from ``torch_models``) at a bundle graph's length configuration and answer guard."""
    from toolchain.lat import FixedLengthModel

    return FixedLengthModel(model.guarded(entry.get("protect_answers", 0)), entry["length_config"]).eval()


def check_threads(threads: int | None) -> int:
    """The intra-op thread count to use (default: all cores); above the core count is a warning."""
    cores = cpu_info()["cores"]
    threads = cores if threads is None else threads
    if threads <= 0:
        raise ToolchainError(f"threads must be positive, got {threads}")
    if threads > cores:
        import click

        click.echo(f"warning: {threads} threads on {cores} cores will oversubscribe the CPU", err=True)
    return threads


def torch_runner(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run():
        with torch.inference_mode():
            return model(**tensors)

    return run


def _then_release(after: Callable[[], object] | None) -> Callable[[], None]:
    """``after`` (when given), then hand malloc's free memory back to the system."""
    def run() -> None:
        if after is not None:
            after()
        release_freed_memory()

    return run


# (result row without timings, the function to time, what to run after each of its slices or None)
Plan = list[tuple[dict, Callable[[], object], Callable[[], object] | None]]
# BERT-base PyTorch fp32 is timed in this many slices a round, spread evenly through it: every speedup ratio of a batch
# size divides by it, so its error lands on all of them (docs/results.md, "Stability at the recipe's size")
REFERENCE_SLICES = 2


def _ort_runner(sess: ort.InferenceSession, inputs: dict[str, np.ndarray],
                small: dict[str, np.ndarray]) -> tuple[Callable[[], object], Callable[[], object]]:
    """(timed run, release): the release is an untimed batch-1 run that shrinks the session's memory arena.

    Interleaving keeps every session alive; without it each one holds its batch-32 activations (about 1 GB
    for MiniLM at 384) and a full bundle does not fit in 24 GB. The first run after a release re-grows the
    arena and is slower (lat-full INT8, batch 32: 1.00-1.03 s vs 0.83-0.85 s), so ``time_interleaved`` warms
    such a measurement up again before each slice.
    """
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return (lambda: sess.run(None, inputs)), (lambda: sess.run(None, small, shrink))


def bert_base_reference(seq: int, batches: list[int], threads: int, inputs_for, spinning: bool = False) -> Plan:
    """BERT-base QA (random weights) in PyTorch fp32 and ORT fp32, at the bundle's sequence length."""
    from transformers import BertForQuestionAnswering

    from toolchain.macs import config_for_arch, count_macs

    torch.manual_seed(0)
    config = config_for_arch("bert-base")
    model = BertForQuestionAnswering(config).eval()
    macs = count_macs(config, None, seq, "qa")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert-base.onnx"
        sample = {k: torch.from_numpy(v) for k, v in inputs_for(1).items()}
        names = list(sample)
        torch.onnx.export(model, (sample,), path, input_names=names, output_names=["start_logits", "end_logits"],
                          dynamic_axes={n: {0: "batch"} for n in names}, opset_version=17, dynamo=False)
        sess = ort_session(path, threads, spinning=spinning)
    plan = []
    for batch in batches:
        inputs = inputs_for(batch)
        for engine, (fn, after) in (("torch", (torch_runner(model, inputs), None)),
                                    ("ort", _ort_runner(sess, inputs, inputs_for(1)))):
            plan.append(({"graph": "bert-base", "engine": engine, "precision": "fp32", "batch": batch,
                          "macs": macs, "f1": None}, fn, after))
    return plan


def bench_bundle(bundle_dir: Path, batches: list[int], threads: int | None = None, repeats: int = 10,
                 torch_eager: bool = True, reference: bool = True, graphs: list[str] | None = None,
                 min_seconds: float = 1.0, rounds: int = 4, spinning: bool = False, keep_memory: bool = False) -> dict:
    """Time every graph (and its PyTorch twin) of a bundle; write the ORT latencies into the manifest.

    Every measurement (all graphs, engines, batches and the BERT-base reference) is timed round-robin in
    ``rounds`` slices, so a speedup ratio compares latencies taken over the same stretch of time. Each
    measurement takes at least ``repeats`` runs (fewer at large batches) and ``min_seconds`` in total.
    ``spinning`` lets ORT's worker threads spin between parallel sections (ORT's own default; right for a
    dedicated machine, see ``ort_session``); it is recorded with the results and the manifest latencies.
    ``keep_memory`` makes malloc keep freed memory (``keep_freed_memory``) before the first measurement, so PyTorch
    eager rows do not pay page faults for their activations on every run; after each slice the free memory goes back
    to the system (``release_freed_memory``), so peak memory is the loaded models plus one measurement's activations,
    not a heap that grows with every measurement (a bundle of 24 graphs at batch 32: 6.0 instead of 16.7 GB).
    Recorded as ``machine.malloc``. Batch 1 needs it too: glibc's default keeps batch-1 activations only once an
    earlier large free has raised its thresholds (in a fresh process PyTorch lat-full at batch 1 faulted 12-21k pages
    a run and took 105-125 ms, 79-86 ms kept; Zen 3).
    """
    if not batches or any(b <= 0 for b in batches):
        raise ToolchainError(f"batch sizes must be positive integers, got {batches}")
    if rounds <= 0:
        raise ToolchainError(f"rounds must be positive, got {rounds}")
    threads = check_threads(threads)
    torch.set_num_threads(threads)
    manifest = bundles.load_manifest(bundle_dir)
    entries = [g for g in manifest["graphs"] if g["kind"] == "lat" and g["ep"] == "cpu"
               and (graphs is None or g["name"] in graphs)]
    if not entries:
        raise ToolchainError(f"bundle {bundle_dir} has no CPU graphs to benchmark")
    meta = json.loads((bundle_dir / "toolchain.json").read_text())
    source = torch_source(manifest, "PyTorch rows skipped") if torch_eager else None
    seqs = {g["max_seq_length"] for g in entries}
    chosen = manifest.get("chosen")
    cache: dict[tuple[int, int], dict] = {}

    def inputs_for(batch: int, seq: int | None = None) -> dict[str, np.ndarray]:
        key = (seq or max(seqs), batch)
        if key not in cache:
            cache[key] = real_inputs(bundle_dir, meta, key[0], batch)
        return cache[key]

    peaks = {p: gemm_peak(p, threads) for p in ("fp32", "int8")}
    models = torch_models(source) if source else {}
    plan: Plan = []
    for entry in entries:
        sess = ort_session(bundles.graph_path(bundle_dir, entry), threads, spinning=spinning)
        score = (entry.get("metrics") or {}).get("f1", (entry.get("metrics") or {}).get("accuracy"))
        small = inputs_for(1, entry["max_seq_length"])
        variants = [("ort", entry["precision"], lambda inputs, s=sess, sm=small: _ort_runner(s, inputs, sm))]
        if entry["precision"] == "fp32":
            for precision, model in models.items():
                variants.append(("torch", precision,
                                 lambda inputs, m=torch_twin(model, entry): (torch_runner(m, inputs), None)))
        for batch in batches:
            inputs = inputs_for(batch, entry["max_seq_length"])
            for engine, precision, make in variants:
                plan.append(({"graph": entry["name"], "engine": engine, "precision": precision, "batch": batch,
                              "macs": entry["macs"], "f1": score, "length_config": entry["length_config"],
                              "size_mb": entry["size_bytes"] / 1e6,
                              "chosen": chosen is not None and chosen in (entry["name"], entry.get("parent"))},
                             *make(inputs)))
    if reference:
        plan += bert_base_reference(max(seqs), batches, threads, inputs_for, spinning)
    malloc = keep_freed_memory() if keep_memory else "system default"  # "system default" where malloc is not glibc's
    if malloc != "system default":
        malloc += ", handed back after each slice"
    results, ref = [], []
    # fewer runs at large batches; within a batch size the plan keeps the bundle's graph order
    for batch in sorted(batches):
        part = [item for item in plan if item[0]["batch"] == batch]
        afters = [after for *_, after in part]
        if malloc != "system default":  # kept memory goes back after each slice; the warm-up before the next re-grows it
            afters = [_then_release(after) for after in afters]
        weights = [REFERENCE_SLICES if (row["graph"], row["engine"]) == ("bert-base", "torch") else 1
                   for row, *_ in part]
        timings = time_interleaved([fn for _, fn, _ in part], rounds, 2, max(rounds, repeats // max(1, batch // 4)),
                                   min_seconds, desc=f"bench batch {batch}", after_slice=afters,
                                   slices_per_round=weights)
        for (row, *_), timing in zip(part, timings):
            row.update(timing)
            (ref if row["graph"] == "bert-base" else results).append(row)
    # a peak: measured again after the timing and the better kept, so a busy moment at the start cannot halve it (it
    # once did: 109 GFLOP/s fp32 against 220 in every other run on that VM)
    peaks = {p: max(peak, gemm_peak(p, threads)) for p, peak in peaks.items()}
    for row in results:
        peak = peaks["int8" if row["precision"].startswith("int8") else "fp32"]
        row["roofline_ms"] = 2 * row["macs"] * row["batch"] / (peak * 1e9) * 1000
        row["roofline_multiple"] = row["latency_ms_median"] / row["roofline_ms"]

    key_of = {b: bundles.latency_key("cpu", b) for b in batches}

    def record(m: dict) -> None:
        for g in m["graphs"]:
            for row in results:
                if row["graph"] == g["name"] and row["engine"] == "ort":
                    g["latency_ms"][key_of[row["batch"]]] = {"median": row["latency_ms_median"],
                                                             "p90": row["latency_ms_p90"], "threads": threads,
                                                             "spinning": spinning}

    bundles.update_manifest(bundle_dir, record)
    return {"machine": {**machine_summary(threads), "gemm_peak_gops": peaks, "ort_spinning": spinning, "malloc": malloc},
            "bundle": str(bundle_dir), "bundle_mb": bundles.bundle_bytes(bundle_dir, entries) / 1e6,
            "seq_length": max(seqs), "rounds": rounds, "results": results, "reference": ref}


def speedup_table(report: dict, batch: int = 1) -> str:
    """Markdown in the QuaLA-MiniLM paper's Table 1 columns, speedups vs BERT-base PyTorch fp32 in this run; the
    search's chosen configuration (and the INT8 graphs made from it) marked."""
    base = next((r for r in report["reference"] if r["engine"] == "torch" and r["batch"] == batch), None)
    lines = [f"| model | engine | precision | size (MB) | tokens per layer | F1 | latency b{batch} (ms, median) "
             f"| GMACs | speedup vs BERT-base PyTorch fp32 | x roofline |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [r for r in report["reference"] + report["results"] if r["batch"] == batch]
    for r in rows:
        speed = f"{base['latency_ms_median'] / r['latency_ms_median']:.1f}x" if base else "-"
        tokens = ",".join(map(str, r["length_config"])) if r.get("length_config") else "full"
        f1 = f"{r['f1']:.1f}" if r.get("f1") is not None else "-"
        size = f"{r['size_mb']:.0f}" if r.get("size_mb") else "-"
        roof = f"{r['roofline_multiple']:.1f}" if r.get("roofline_multiple") else "-"
        name = f"**{r['graph']}** (chosen)" if r.get("chosen") else r["graph"]
        lines.append(f"| {name} | {r['engine']} | {r['precision']} | {size} | {tokens} | {f1} | "
                     f"{r['latency_ms_median']:.1f} | {r['macs'] / 1e9:.2f} | {speed} | {roof} |")
    return "\n".join(lines) + "\n"


def speedups(report: dict) -> dict[tuple, float]:
    """Every row's speedup vs BERT-base PyTorch fp32 at its batch, keyed (graph, engine, precision, batch)."""
    base = {r["batch"]: r["latency_ms_median"] for r in report["reference"] if r["engine"] == "torch"}
    return {(r["graph"], r["engine"], r["precision"], r["batch"]): base[r["batch"]] / r["latency_ms_median"]
            for r in report["reference"] + report["results"] if r["batch"] in base}


def compare_reports(previous: dict, current: dict, tolerance: float = 0.10) -> dict:
    """Run-to-run stability: the relative change of every speedup ratio measured in both runs.

    A ratio from one run cancels a machine's speed drift, so two consecutive runs should agree on each ratio
    within ``tolerance``; ``unstable`` lists the rows that do not. A row's ``noise`` is the largest slice spread of
    the four medians behind its two ratios (the row and BERT-base PyTorch, in both runs): an unstable row whose
    change is within it moved no more than its own slices did within a run (``unstable_within_noise`` counts them).
    """
    old, new = speedups(previous), speedups(current)
    spread_old, spread_new = _spreads(previous), _spreads(current)

    def noise(k: tuple) -> float | None:
        ref = ("bert-base", "torch", "fp32", k[3])
        spreads = [d.get(key) for d in (spread_old, spread_new) for key in (k, ref)]
        return None if None in spreads else max(spreads)

    rows = [{"graph": k[0], "engine": k[1], "precision": k[2], "batch": k[3], "previous": old[k], "current": new[k],
             "change": new[k] / old[k] - 1, "noise": noise(k)} for k in sorted(old.keys() & new.keys(), key=str)]
    if not rows:
        raise ToolchainError("the two bench reports share no row with a BERT-base PyTorch reference at the same batch")
    worst = max(rows, key=lambda r: abs(r["change"]))
    unstable = [r for r in rows if abs(r["change"]) > tolerance]
    within = sum(r["noise"] is not None and abs(r["change"]) <= r["noise"] for r in unstable)
    return {"tolerance": tolerance, "compared": len(rows), "max_abs_change": abs(worst["change"]), "worst": worst,
            "unstable": unstable, "unstable_within_noise": within, "rows": rows}


def _spreads(report: dict) -> dict[tuple, float]:
    """Each row's ``slice_spread`` (absent from reports older than it), keyed like ``speedups``."""
    return {(r["graph"], r["engine"], r["precision"], r["batch"]): r["slice_spread"]
            for r in report["reference"] + report["results"] if "slice_spread" in r}


def plot_bench(report: dict, out_dir: Path, batch: int = 1) -> list[Path]:
    """F1 vs latency and F1 vs GMACs of the ORT rows with a measured F1: every graph a dot, the Pareto front (the
    graphs no other graph beats on both axes) joined by a line, per precision; the chosen configuration circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["engine"] == "ort" and r["batch"] == batch and r["f1"] is not None]
    paths = []
    for x_key, label, name in (("latency_ms_median", f"ORT latency, batch {batch} (ms)", "f1-vs-latency.png"),
                               ("macs", "GMACs", "f1-vs-macs.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for precision, marker, color in (("fp32", "o", "tab:blue"), ("int8", "s", "tab:orange")):
            pts = {r["graph"]: (r[x_key] / (1e9 if x_key == "macs" else 1), r["f1"])
                   for r in rows if r["precision"] == precision}
            if pts:
                ax.scatter(*zip(*pts.values()), marker=marker, color=color, alpha=0.4, label=f"{precision}, every graph")
                ax.plot(*zip(*(pts[g] for g in pareto_front(pts))), marker=marker, color=color,
                        label=f"{precision}, Pareto front")
        chosen = [(r[x_key] / (1e9 if x_key == "macs" else 1), r["f1"]) for r in rows if r.get("chosen")]
        if chosen:
            ax.scatter(*zip(*chosen), s=160, facecolors="none", edgecolors="black", label="chosen configuration")
        ax.set_xlabel(label)
        ax.set_ylabel("F1 / accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def size_note(report: dict) -> str:
    """One line on the benchmarked graphs' disk size together (the size column is per graph)."""
    graphs = len({r["graph"] for r in report["results"]})
    return (f"The {graphs} graphs take {report['bundle_mb']:.0f} MB on disk together (they share their weights); "
            "\"size\" is what one graph needs on its own.")


def write_outputs(report: dict, json_out: Path | None, markdown_out: Path | None, plots_dir: Path | None) -> None:
    """Write each requested output atomically; an unwritable path is a clear error."""
    if json_out:
        write_json(json_out, report)
    if markdown_out:
        batches = sorted({r["batch"] for r in report["results"]})
        write_text(markdown_out, "\n".join(f"### batch {b}\n\n{speedup_table(report, b)}" for b in batches)
                   + f"\n{size_note(report)}\n")
    if plots_dir:
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        plot_bench(report, Path(plots_dir))
