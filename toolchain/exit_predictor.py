"""GEEP's exit-layer predictor: a token-level table that predicts a sample's exit depth before the model runs.

Table. `counts[v, k - 1]` counts the occurrences of token `v` (real, non-special tokens only) in training
samples whose exit label is `k`. A token's statistic is its expected exit
`e_v = sum_k k * counts[v, k-1] / sum_k counts[v, k-1]`; unseen tokens use `default`, the mean exit label of
the training samples (the last layer for an empty table).

Prediction. Over a sample's real, non-special tokens, aggregate the tokens' expected exits with
  * ``mean``       - their average,
  * ``max``        - the largest (conservative: the hardest token decides),
  * ``quantile:q`` - their q-quantile (numpy's linear interpolation; q=0.5 is the median),
then add `shift`, round half up and clip to [1, num_layers]. A sample without such tokens gets `default`.
Arithmetic is float32, and "half up" means floor(x + 0.5 + 1e-4), so that the ONNX graph of
`export_predictor_onnx` (other summation order) rounds exact ties such as 2.5 the same way.

Tuning picks (aggregation, shift) on held-out samples, either for agreement with their exit labels (`tune`)
or for speed at a given accuracy (`tune_accuracy`: the smallest mean exit whose accuracy stays within a
tolerance of the last layer's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.files import atomic_path

Candidate = tuple[str, float]  # (aggregation, shift)
HALF_UP = 0.5 + 1e-4
AGGREGATIONS = ("mean", "max", "quantile:0.5", "quantile:0.75", "quantile:0.9")
DEFAULT_CANDIDATES: tuple[Candidate, ...] = tuple(
    (agg, shift) for agg in AGGREGATIONS for shift in (-1.0, -0.5, 0.0, 0.5, 1.0))
# accuracy tuning trades depth for accuracy, so it needs the finer and wider shift grid
ACCURACY_CANDIDATES: tuple[Candidate, ...] = tuple(
    (agg, shift / 4) for agg in AGGREGATIONS for shift in range(-12, 13))


def parse_aggregation(aggregation: str) -> tuple[str, float | None]:
    """'mean' | 'max' | 'quantile:<q>' (0 <= q <= 1) -> (kind, q)."""
    if aggregation in ("mean", "max"):
        return aggregation, None
    kind, _, q = aggregation.partition(":")
    try:
        value = float(q)
    except ValueError:
        value = -1.0
    if kind != "quantile" or not 0.0 <= value <= 1.0:
        raise ToolchainError(f"unknown exit aggregation {aggregation!r}; use mean, max or quantile:<q> with q in [0, 1]")
    return kind, value


class ExitTable:
    """Dense [vocab_size, num_layers] exit-label counts per token, and the sample-level prediction rule."""

    def __init__(self, vocab_size: int, num_layers: int, aggregation: str = "mean", shift: float = 0.0) -> None:
        if vocab_size <= 0 or num_layers <= 0:
            raise ToolchainError(f"exit table needs a positive vocab size and layer count, got {vocab_size}, {num_layers}")
        self.counts = np.zeros((vocab_size, num_layers), dtype=np.int64)
        self.exit_histogram = np.zeros(num_layers, dtype=np.int64)  # training samples per exit label
        self.special_ids = np.zeros(0, dtype=np.int64)
        self.set_aggregation(aggregation, shift)

    @property
    def vocab_size(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    def set_aggregation(self, aggregation: str, shift: float = 0.0) -> None:
        parse_aggregation(aggregation)
        self.aggregation, self.shift = aggregation, float(shift)

    def _check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ToolchainError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal [N, S] arrays")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ToolchainError(f"token ids must lie in [0, {self.vocab_size}) (the exit table's vocab size)")
        return ids, mask

    def fit(self, input_ids: np.ndarray, attention_mask: np.ndarray, exit_labels: np.ndarray,
            special_ids: Sequence[int] = ()) -> ExitTable:
        """Add samples: +1 at (token, exit label) for every real token not in `special_ids`."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        exits = np.asarray(exit_labels, dtype=np.int64)
        if exits.shape != (len(ids),):
            raise ToolchainError(f"need one exit label per sample: {len(ids)} samples, labels of shape {exits.shape}")
        if exits.size and (exits.min() < 1 or exits.max() > self.num_layers):
            raise ToolchainError(f"exit labels must be layers 1..{self.num_layers}")
        self.special_ids = np.union1d(self.special_ids, np.asarray(special_ids, dtype=np.int64))
        keep = (mask > 0) & ~np.isin(ids, self.special_ids)
        layer = np.broadcast_to(exits[:, None] - 1, ids.shape)
        np.add.at(self.counts, (ids[keep], layer[keep]), 1)
        self.exit_histogram += np.bincount(exits - 1, minlength=self.num_layers)
        return self

    @property
    def default(self) -> float:
        """The fallback exit: mean training exit label (the last layer before any fit)."""
        total = self.exit_histogram.sum()
        return float(np.arange(1, self.num_layers + 1) @ self.exit_histogram / total) if total else float(self.num_layers)

    def token_exits(self) -> np.ndarray:
        """Expected exit per token id, [vocab_size] float32 (unseen tokens: `default`)."""
        seen = self.counts.sum(1)
        expected = self.counts @ np.arange(1, self.num_layers + 1) / np.maximum(seen, 1)
        return np.where(seen > 0, expected, self.default).astype(np.float32)

    def token_weights(self) -> np.ndarray:
        """1 for tokens that take part in the aggregation, 0 for special tokens; [vocab_size] float32."""
        weights = np.ones(self.vocab_size, dtype=np.float32)
        weights[self.special_ids[self.special_ids < self.vocab_size]] = 0.0
        return weights

    def predict(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Predicted exit layer (1-based, int64 [N]) of every sample."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        kind, q = parse_aggregation(self.aggregation)
        values = self.token_exits()[ids]
        weight = self.token_weights()[ids] * (mask > 0).astype(np.float32)
        count = weight.sum(1)
        default = np.float32(self.default)
        if kind == "mean":
            agg = (values * weight).sum(1) / np.maximum(count, np.float32(1e-9))
        elif kind == "max":
            agg = np.where(weight > 0, values, -np.inf).max(1, initial=-np.inf)
        else:
            rows = np.where(count[:, None] > 0, np.where(weight > 0, values, np.nan), default)
            agg = np.nanquantile(rows, q, axis=1).astype(np.float32)
        shifted = np.where(count > 0, agg, default) + np.float32(self.shift + HALF_UP)  # as the ONNX graph does
        return np.clip(np.floor(shifted), 1, self.num_layers).astype(np.int64)

    def tune(self, input_ids: np.ndarray, attention_mask: np.ndarray, true_exits: np.ndarray,
             candidates: Sequence[Candidate] = DEFAULT_CANDIDATES) -> dict:
        """Keep the (aggregation, shift) with the best within-1 exit accuracy on held-out samples.

        Ties go to the better exact accuracy, then to the smaller mean predicted exit (faster).
        Returns {"aggregation", "shift", "exact", "within_1"}.
        """
        def rank(pred: np.ndarray) -> tuple[tuple, dict]:
            acc = exit_accuracy(pred, true_exits)
            return (acc["within_1"], acc["exact"], -float(pred.mean())), acc

        return self._select(input_ids, attention_mask, candidates, rank)

    def tune_accuracy(self, input_ids: np.ndarray, attention_mask: np.ndarray, correct: np.ndarray,
                      tolerance: float = 1.0, candidates: Sequence[Candidate] = ACCURACY_CANDIDATES) -> dict:
        """Keep the (aggregation, shift) with the smallest mean predicted exit whose accuracy on held-out samples
        is within `tolerance` points of the last layer's; if none is, the most accurate one.

        `correct[n, k - 1]` says whether the classifier at depth k gets sample n right. Ties go to the more
        accurate candidate. Returns {"aggregation", "shift", "accuracy", "mean_exit", "full_accuracy", "within_tolerance"}.
        """
        correct = np.asarray(correct, dtype=bool)
        if correct.shape != (len(input_ids), self.num_layers):
            raise ToolchainError(f"need [samples, layers] = [{len(input_ids)}, {self.num_layers}] correctness, "
                                 f"got {correct.shape}")
        if not tolerance >= 0:
            raise ToolchainError(f"tolerance must be >= 0 accuracy points, got {tolerance}")
        full = 100.0 * float(correct[:, -1].mean())

        def rank(pred: np.ndarray) -> tuple[tuple, dict]:
            accuracy, mean_exit = 100.0 * float(correct[np.arange(len(pred)), pred - 1].mean()), float(pred.mean())
            ok = accuracy >= full - tolerance - 1e-9
            return ((ok, -mean_exit, accuracy) if ok else (ok, accuracy, -mean_exit),
                    {"accuracy": accuracy, "mean_exit": mean_exit, "full_accuracy": full, "within_tolerance": ok})

        return self._select(input_ids, attention_mask, candidates, rank)

    def _select(self, input_ids: np.ndarray, attention_mask: np.ndarray, candidates: Sequence[Candidate],
                rank: Callable[[np.ndarray], tuple[tuple, dict]]) -> dict:
        """Set and return the candidate whose predictions rank highest (first one on ties)."""
        if not candidates:
            raise ToolchainError("no (aggregation, shift) candidates to tune over")
        best, best_key = None, None
        for aggregation, shift in candidates:
            self.set_aggregation(aggregation, shift)
            key, info = rank(self.predict(input_ids, attention_mask))
            if best_key is None or key > best_key:
                best, best_key = {"aggregation": aggregation, "shift": float(shift), **info}, key
        self.set_aggregation(best["aggregation"], best["shift"])
        return best

    def save(self, path: str | Path) -> Path:
        """Write the table as .npz (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, counts=self.counts, exit_histogram=self.exit_histogram, special_ids=self.special_ids,
                     aggregation=np.array(self.aggregation), shift=np.array(self.shift))
        return path

    @classmethod
    def load(cls, path: str | Path, tokenizer_vocab_size: int | None = None) -> ExitTable:
        """Read a saved table; its vocab size must equal the tokenizer's (`len(tokenizer)`) when given."""
        path = Path(path)
        if not path.is_file():
            raise ToolchainError(f"exit table not found: {path}")
        try:
            with np.load(path) as data:
                counts, hist, special = data["counts"], data["exit_histogram"], data["special_ids"]
                aggregation, shift = str(data["aggregation"]), float(data["shift"])
        except (OSError, ValueError, KeyError) as e:
            raise ToolchainError(f"unreadable exit table {path}: {e}") from None
        if counts.ndim != 2 or hist.shape != (counts.shape[1],):
            raise ToolchainError(f"{path} is not an exit table (counts {counts.shape}, histogram {hist.shape})")
        if tokenizer_vocab_size is not None and counts.shape[0] != tokenizer_vocab_size:
            raise ToolchainError(f"exit table {path} was built for a vocabulary of {counts.shape[0]} tokens, "
                                 f"but the tokenizer has {tokenizer_vocab_size}")
        table = cls(counts.shape[0], counts.shape[1], aggregation, shift)
        table.counts, table.exit_histogram = counts.astype(np.int64), hist.astype(np.int64)
        table.special_ids = special.astype(np.int64)
        return table


def exit_accuracy(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Percent of samples whose predicted exit equals the true one, and within one layer of it."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 1 or not pred.size:
        raise ToolchainError(f"predicted {pred.shape} and true {true.shape} exits must be equal, non-empty vectors")
    diff = np.abs(pred.astype(np.int64) - true.astype(np.int64))
    return {"exact": 100.0 * float((diff == 0).mean()), "within_1": 100.0 * float((diff <= 1).mean())}


def export_predictor_onnx(table: ExitTable, path: str | Path) -> Path:
    """The table's `predict` as a small standard-domain ONNX graph (opset 17).

    inputs input_ids, attention_mask: int64 [batch, sequence]; output exit_layer: int64 [batch].
    Gather per-token expected exits and weights -> masked mean, max or quantile over the sequence -> default
    where no token counts -> + shift -> round half up (Floor) -> Clip to [1, L] -> Cast int64. A quantile sorts
    the counted values ascending (TopK over the whole sequence, uncounted tokens as +inf at the end) and
    interpolates linearly between the two values around position q * (n - 1), as numpy does.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kind, q = parse_aggregation(table.aggregation)

    def const(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    f32 = np.float32
    initializers = [
        const("token_exits", table.token_exits()), const("token_weights", table.token_weights()),
        const("axes", np.array([1], np.int64)), const("zero", f32(0)), const("default", f32(table.default)),
        const("shift", f32(table.shift + HALF_UP)), const("min_layer", f32(1)), const("max_layer", f32(table.num_layers)),
        const("eps", f32(1e-9)), const("neg_inf", f32(-np.inf)), const("pos_inf", f32(np.inf)),
        const("one", f32(1)), const("q", f32(q or 0.0)),
    ]
    nodes = [
        helper.make_node("Gather", ["token_exits", "input_ids"], ["values"]),
        helper.make_node("Gather", ["token_weights", "input_ids"], ["token_w"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["token_w", "mask_f"], ["w"]),
        helper.make_node("ReduceSum", ["w", "axes"], ["count"], keepdims=0),
        helper.make_node("Greater", ["count", "zero"], ["has_tokens"]),
    ]
    if kind == "mean":
        nodes += [
            helper.make_node("Mul", ["values", "w"], ["weighted"]),
            helper.make_node("ReduceSum", ["weighted", "axes"], ["total"], keepdims=0),
            helper.make_node("Max", ["count", "eps"], ["safe_count"]),
            helper.make_node("Div", ["total", "safe_count"], ["agg"]),
        ]
    elif kind == "max":
        nodes += [
            helper.make_node("Greater", ["w", "zero"], ["counted"]),
            helper.make_node("Where", ["counted", "values", "neg_inf"], ["masked"]),
            helper.make_node("ReduceMax", ["masked"], ["agg"], axes=[1], keepdims=0),  # an attribute up to opset 17
        ]
    else:  # quantile: sorted[lo] + frac * (sorted[hi] - sorted[lo]), pos = q * (n - 1), lo = floor(pos)
        nodes += [
            helper.make_node("Greater", ["w", "zero"], ["counted"]),
            helper.make_node("Where", ["counted", "values", "pos_inf"], ["masked"]),
            helper.make_node("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
            helper.make_node("TopK", ["masked", "seq_len"], ["sorted", "_order"], axis=1, largest=0, sorted=1),
            helper.make_node("Sub", ["count", "one"], ["last"]),
            helper.make_node("Max", ["last", "zero"], ["last_safe"]),
            helper.make_node("Mul", ["last_safe", "q"], ["pos"]),
            helper.make_node("Floor", ["pos"], ["lo_f"]),
            helper.make_node("Sub", ["pos", "lo_f"], ["frac"]),
            helper.make_node("Add", ["lo_f", "one"], ["lo_next"]),
            helper.make_node("Min", ["lo_next", "last_safe"], ["hi_f"]),
            helper.make_node("Unsqueeze", ["lo_f", "axes"], ["lo_col"]),
            helper.make_node("Unsqueeze", ["hi_f", "axes"], ["hi_col"]),
            helper.make_node("Cast", ["lo_col"], ["lo_idx"], to=TensorProto.INT64),
            helper.make_node("Cast", ["hi_col"], ["hi_idx"], to=TensorProto.INT64),
            helper.make_node("GatherElements", ["sorted", "lo_idx"], ["v_lo_col"], axis=1),
            helper.make_node("GatherElements", ["sorted", "hi_idx"], ["v_hi_col"], axis=1),
            helper.make_node("Squeeze", ["v_lo_col", "axes"], ["v_lo"]),
            helper.make_node("Squeeze", ["v_hi_col", "axes"], ["v_hi"]),
            helper.make_node("Sub", ["v_hi", "v_lo"], ["span"]),
            helper.make_node("Mul", ["span", "frac"], ["step"]),
            helper.make_node("Add", ["v_lo", "step"], ["agg"]),
        ]
    nodes += [
        helper.make_node("Where", ["has_tokens", "agg", "default"], ["sample_exit"]),
        helper.make_node("Add", ["sample_exit", "shift"], ["shifted"]),  # shift + HALF_UP
        helper.make_node("Floor", ["shifted"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "min_layer", "max_layer"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["exit_layer"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes, "geep_exit_predictor",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("exit_layer", TensorProto.INT64, ["batch"])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="toolchain")  # IR 8 goes with opset 17
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
