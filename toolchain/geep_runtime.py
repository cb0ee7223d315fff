"""GEEP inference: predict each request's exit first, bucket requests by exit, run each bucket truncated.

A *depth runner* `run_at_depth(depth, inputs) -> logits [B, C]` hides the backend: a PyTorch `GeepModel`
(`torch_depth_runner`) or one ONNX Runtime session per depth (`ort_depth_runner`, graphs from
`export_depth_graphs`). An *exit predictor* maps inputs to 1-based depths [N] (`ExitTable.predict` or the
predictor's ONNX graph, `ort_exit_predictor`). Baselines: the full-depth model, and FastBERT's layer-by-layer
dynamic exit with a shrinking batch. `bench_geep` scores and times all three on a dev set.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.exit_predictor import ExitTable, exit_accuracy, export_predictor_onnx, parse_aggregation
from toolchain.geep import GeepModel, TruncatedGeep, check_speed, load_geep, normalized_entropy, profile_exits
from toolchain.training import resolve_device, to_device

Inputs = dict[str, np.ndarray]
DepthRunner = Callable[[int, Inputs], np.ndarray]
ExitPredictor = Callable[[Inputs], np.ndarray]
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
T = TypeVar("T")


def _model_inputs(inputs: Inputs) -> Inputs:
    """The model inputs (int64) of a batch, without labels; there must be at least one request."""
    out = {k: np.asarray(inputs[k], dtype=np.int64) for k in INPUT_NAMES if k in inputs}
    if "input_ids" not in out or "attention_mask" not in out:
        raise ToolchainError("requests need input_ids and attention_mask")
    if not len(out["input_ids"]):
        raise ToolchainError("no requests to run")
    return out


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ToolchainError(f"batch size must be a positive integer, got {batch_size}")


def bucketed_predict(inputs: Inputs, predict_exit: ExitPredictor, run_at_depth: DepthRunner,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """GEEP batch inference: (logits [N, C], predicted depths [N]), both in request order.

    Requests are grouped by predicted exit; each group runs in chunks of `batch_size` through the
    model truncated at that depth, so a batch never waits on its deepest member.
    """
    _check_batch_size(batch_size)
    inputs = _model_inputs(inputs)
    n = len(inputs["input_ids"])
    depths = np.asarray(predict_exit(inputs), dtype=np.int64)
    if depths.shape != (n,):
        raise ToolchainError(f"the exit predictor returned shape {depths.shape} for {n} requests")
    logits = None
    for depth in np.unique(depths):
        bucket = np.flatnonzero(depths == depth)
        for b in range(0, len(bucket), batch_size):
            rows = bucket[b:b + batch_size]
            out = np.asarray(run_at_depth(int(depth), {k: v[rows] for k, v in inputs.items()}))
            if logits is None:
                logits = np.empty((n, out.shape[-1]), dtype=out.dtype)
            logits[rows] = out
    return logits, depths


def full_depth_predict(inputs: Inputs, run_at_depth: DepthRunner, num_layers: int, batch_size: int) -> np.ndarray:
    """Baseline: every request through all `num_layers` layers; logits [N, C]."""
    _check_batch_size(batch_size)
    inputs = _model_inputs(inputs)
    n = len(inputs["input_ids"])
    return np.concatenate([run_at_depth(num_layers, {k: v[b:b + batch_size] for k, v in inputs.items()})
                           for b in range(0, n, batch_size)])


def fastbert_predict(model: GeepModel, inputs: Inputs, speed: float, batch_size: int,
                     device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Baseline: FastBERT's dynamic exit with a shrinking batch; (logits [N, C], exit depths [N]).

    Layer by layer, student i classifies the batch; samples whose normalized entropy is below `speed`
    leave with student i's logits, the rest continue. Samples reaching the last layer get the teacher's.
    """
    check_speed(speed)
    _check_batch_size(batch_size)
    inputs = _model_inputs(inputs)
    device = torch.device(device)
    model.to(device).eval()
    n, last = len(inputs["input_ids"]), model.num_layers - 1
    logits = np.zeros((n, model.num_labels), dtype=np.float32)
    depths = np.zeros(n, dtype=np.int64)
    with torch.inference_mode():
        for b in range(0, n, batch_size):
            batch = to_device({k: v[b:b + batch_size] for k, v in inputs.items()}, device)
            rows = np.arange(b, b + len(batch["input_ids"]))
            hidden = model.embed(batch["input_ids"], batch.get("token_type_ids"))
            mask = model.extended_mask(batch["attention_mask"], hidden.dtype)
            for i in range(model.num_layers):
                hidden = model.run_layer(i, hidden, mask)
                head = model.teacher if i == last else model.students[i]
                out = head(hidden).float().cpu().numpy()
                done = np.ones(len(rows), bool) if i == last else normalized_entropy(out) < speed
                logits[rows[done]], depths[rows[done]] = out[done], i + 1
                if done.all():
                    break
                keep = torch.from_numpy(~done).to(device)
                hidden, mask, rows = hidden[keep], mask[keep], rows[~done]
    return logits, depths


def torch_depth_runner(model: GeepModel, device: torch.device | str = "cpu") -> DepthRunner:
    """Run the PyTorch model truncated at the asked depth."""
    device = torch.device(device)
    model.to(device).eval()

    def run(depth: int, inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            return model(**to_device(inputs, device), depth=depth).float().cpu().numpy()

    return run


def ort_depth_runner(sessions: dict[int, object]) -> DepthRunner:
    """Run the ONNX Runtime session of the asked depth (sessions: depth -> InferenceSession)."""

    def run(depth: int, inputs: Inputs) -> np.ndarray:
        if depth not in sessions:
            raise ToolchainError(f"no ONNX graph for depth {depth}; have depths {sorted(sessions)}")
        session = sessions[depth]
        return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]

    return run


def ort_exit_predictor(session) -> ExitPredictor:
    """Exit predictions from the predictor graph of `export_predictor_onnx`."""
    return lambda inputs: session.run(None, {"input_ids": inputs["input_ids"],
                                             "attention_mask": inputs["attention_mask"]})[0]


def export_depth_graphs(model: GeepModel, out_dir: str | Path, depths: list[int] | None = None) -> dict[int, Path]:
    """One ONNX graph per depth (default: all), `geep-depth<d>.onnx`: opset 17, dynamic batch and length.

    Exports from the CPU: the model is moved there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    sample = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long),
              torch.zeros(2, 8, dtype=torch.long))
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES} | {"logits": {0: "batch"}}
    paths = {}
    for depth in depths or range(1, model.num_layers + 1):
        path = out_dir / f"geep-depth{depth}.onnx"
        # legacy TorchScript exporter: still available (deprecated) in torch 2.13, and fast on small graphs
        torch.onnx.export(TruncatedGeep(model, depth).eval(), sample, str(path), dynamo=False, opset_version=17,
                          input_names=list(INPUT_NAMES), output_names=["logits"], dynamic_axes=axes)
        paths[depth] = path
    return paths


def ort_session(path: str | Path, device: torch.device | str = "cpu"):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _scores(logits: np.ndarray, depths: np.ndarray, labels: np.ndarray, seconds: float) -> dict:
    return {"accuracy": round(100.0 * float((logits.argmax(-1) == labels).mean()), 2),
            "mean_depth": round(float(depths.mean()), 3), "seconds": round(seconds, 4),
            "examples_per_second": round(len(labels) / max(seconds, 1e-9), 1)}


def bench_geep(*, checkpoint_dir: Path, train_path: Path, eval_path: Path, speed: float,
               out_dir: Path | None = None, columns: prepare.Columns | None = None, max_seq_length: int | None = None,
               max_train_examples: int | None = None, max_eval_examples: int | None = None, batch_size: int = 32,
               aggregation: str = "auto", shift: float = 0.0, backend: str = "torch", device_name: str = "cpu",
               tune_fraction: float = 0.2) -> dict:
    """Fit the exit table, then score and time full depth, GEEP (bucketed) and FastBERT on the dev set.

    Exit labels are the students' FastBERT exits at `speed`, on the training data (table) and the dev
    data (exit accuracy). `aggregation="auto"` tunes (aggregation, shift) on a random `tune_fraction` of
    the training rows (table fitted on the rest), then refits on all of them; otherwise `shift` is used.
    backend "ort" exports one graph per depth plus the predictor graph (into `out_dir`, else a temp
    folder); FastBERT always runs in PyTorch. With `out_dir`, the table (exit_table.npz), the predictor
    graph (exit_predictor.onnx) and any depth graphs are kept there. Each timing follows one warm-up batch.
    """
    check_speed(speed)
    _check_batch_size(batch_size)
    if backend not in ("torch", "ort"):
        raise ToolchainError(f"unknown backend {backend!r}; choose torch or ort")
    if not 0.0 < tune_fraction < 1.0:
        raise ToolchainError(f"tune fraction must be in (0, 1), got {tune_fraction}")
    if aggregation != "auto":
        parse_aggregation(aggregation)
    device = resolve_device(device_name)
    model, tokenizer, meta = load_geep(checkpoint_dir)
    if columns is None:
        saved = meta.get("columns") or {}
        columns = prepare.Columns(tuple(saved.get("text", ("sentence",))), saved.get("label", "label"),
                                  saved.get("header", True))
    max_seq_length = max_seq_length or meta.get("max_seq_length", 128)
    _, train = prepare.classify_split(train_path, tokenizer, max_seq_length, meta["labels"], columns, max_train_examples)
    _, dev = prepare.classify_split(eval_path, tokenizer, max_seq_length, meta["labels"], columns, max_eval_examples)
    train_exits = profile_exits(model, train, speed, batch_size, device)
    dev_exits = profile_exits(model, dev, speed, batch_size, device)

    table = ExitTable(len(tokenizer), model.num_layers)
    ids, mask, specials = train["input_ids"], train["attention_mask"], tokenizer.all_special_ids
    tuned = None
    if aggregation == "auto":
        held_out = max(1, int(round(len(ids) * tune_fraction)))
        if held_out >= len(ids):
            raise ToolchainError("need at least 2 training examples to tune the exit aggregation")
        order = np.random.default_rng(0).permutation(len(ids))
        fit, tune = order[held_out:], order[:held_out]
        tuned = table.fit(ids[fit], mask[fit], train_exits[fit], specials).tune(ids[tune], mask[tune], train_exits[tune])
        aggregation, shift = tuned["aggregation"], tuned["shift"]
        table = ExitTable(len(tokenizer), model.num_layers)
    table.set_aggregation(aggregation, shift)
    table.fit(ids, mask, train_exits, specials)

    with tempfile.TemporaryDirectory() as tmp:
        graphs = Path(out_dir) if out_dir else Path(tmp)
        if out_dir:
            table.save(graphs / "exit_table.npz")
        if backend == "ort":
            sessions = {d: ort_session(p, device) for d, p in export_depth_graphs(model, graphs).items()}
            run_at_depth = ort_depth_runner(sessions)
            predict_exit = ort_exit_predictor(ort_session(export_predictor_onnx(table, graphs / "exit_predictor.onnx")))
        else:
            run_at_depth = torch_depth_runner(model, device)
            predict_exit = lambda inputs: table.predict(inputs["input_ids"], inputs["attention_mask"])  # noqa: E731
            if out_dir:
                export_predictor_onnx(table, graphs / "exit_predictor.onnx")
        inputs = {k: v for k, v in dev.items() if k != "labels"}
        warm = {k: v[:batch_size] for k, v in inputs.items()}
        L = model.num_layers
        full_depth_predict(warm, run_at_depth, L, batch_size)  # warm-up: first-run allocations and graph setup
        full_logits, t_full = _timed(lambda: full_depth_predict(inputs, run_at_depth, L, batch_size))
        bucketed_predict(warm, predict_exit, run_at_depth, batch_size)
        (geep_logits, geep_depths), t_geep = _timed(lambda: bucketed_predict(inputs, predict_exit, run_at_depth, batch_size))
        fastbert_predict(model, warm, speed, batch_size, device)
        (fb_logits, fb_depths), t_fb = _timed(lambda: fastbert_predict(model, inputs, speed, batch_size, device))

    labels = dev["labels"]
    return {
        "speed": speed, "backend": backend, "device": device.type, "num_layers": L, "examples": len(labels),
        "exit_table": {"aggregation": aggregation, "shift": shift, "tuned": tuned, "train_rows": len(ids)},
        "full": _scores(full_logits, np.full(len(labels), L), labels, t_full),
        "geep": {**_scores(geep_logits, geep_depths, labels, t_geep), "exit_accuracy": exit_accuracy(geep_depths, dev_exits)},
        "fastbert": {**_scores(fb_logits, fb_depths, labels, t_fb), "backend": "torch"},
    }
