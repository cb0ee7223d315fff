"""GEEP's exit-sorted batching: predict each request's exit first, group requests by it, run each group truncated.

A *depth runner* ``run_at_depth(depth, inputs) -> logits [B, C]`` hides the backend (one ONNX Runtime session per
depth: ``ort_depth_runner``; PyTorch: ``geep_runtime.torch_depth_runner``); an *exit predictor* maps inputs to 1-based
depths [N] (``ExitTable.predict`` or the predictor's ONNX graph: ``ort_exit_predictor``). Needs neither PyTorch nor
transformers, so a served GEEP bundle does not either.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.evaluate import run_batches

Inputs = dict[str, np.ndarray]
DepthRunner = Callable[[int, Inputs], np.ndarray]
ExitPredictor = Callable[[Inputs], np.ndarray]
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(inputs: Inputs) -> Inputs:
    """The model inputs (int64) of a batch, without labels; there must be at least one request."""
    out = {k: np.asarray(inputs[k], dtype=np.int64) for k in INPUT_NAMES if k in inputs}
    if "input_ids" not in out or "attention_mask" not in out:
        raise ToolchainError("requests need input_ids and attention_mask")
    if not len(out["input_ids"]):
        raise ToolchainError("no requests to run")
    return out


def check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ToolchainError(f"batch size must be a positive integer, got {batch_size}")


def bucketed_predict(inputs: Inputs, predict_exit: ExitPredictor, run_at_depth: DepthRunner,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """GEEP batch inference: (logits [N, C], predicted depths [N]), both in request order.

    Requests are grouped by predicted exit; each group runs in chunks of `batch_size` through the
    model truncated at that depth, so a batch never waits on its deepest member (within a group, requests of
    similar length share a batch, cut to its longest: `run_batches`).
    """
    check_batch_size(batch_size)
    inputs = model_inputs(inputs)
    n = len(inputs["input_ids"])
    depths = np.asarray(predict_exit(inputs), dtype=np.int64)
    if depths.shape != (n,):
        raise ToolchainError(f"the exit predictor returned shape {depths.shape} for {n} requests")
    logits = None
    for depth in np.unique(depths):
        bucket = np.flatnonzero(depths == depth)
        (out,) = _batched(partial(run_at_depth, int(depth)), {k: v[bucket] for k, v in inputs.items()}, batch_size)
        if logits is None:
            logits = np.empty((n, out.shape[-1]), dtype=out.dtype)
        logits[bucket] = out
    return logits, depths


def _batched(run_at: Callable[[Inputs], np.ndarray], inputs: Inputs, batch_size: int) -> tuple[np.ndarray]:
    return run_batches(lambda feed: (np.asarray(run_at(feed)),), lambda idx: {k: v[idx] for k, v in inputs.items()},
                       len(inputs["input_ids"]), batch_size, progress=False)


def full_depth_predict(inputs: Inputs, run_at_depth: DepthRunner, num_layers: int, batch_size: int) -> np.ndarray:
    """Baseline: every request through all `num_layers` layers; logits [N, C]."""
    check_batch_size(batch_size)
    return _batched(partial(run_at_depth, num_layers), model_inputs(inputs), batch_size)[0]


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
