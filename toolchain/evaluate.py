"""Accuracy of any runner (PyTorch model, length configuration, ONNX session) on SQuAD or classification data.

A *runner* maps a batch of model inputs (numpy int64 arrays named input_ids, attention_mask,
token_type_ids) to numpy outputs: (start_logits, end_logits) for QA, (logits,) for classification.
Keeping evaluation behind this one signature lets PyTorch, length-adaptive and ORT graphs share it.
Batches are formed from rows of similar length and cut to their longest row (`run_batches`): every model here
takes any length up to the one it was built for, and a SQuAD window at 384 holds about 178 real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from toolchain.data.metric import squad_scores
from toolchain.data.squad import SquadExample, SquadFeatures, gold_answers, postprocess
from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    import torch

Runner = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, ...]]
PER_TOKEN = ("start_logits", "end_logits")  # QA outputs, one value per token


def take(items: list, n: int | None, seed: int = 0, skip: int = 0) -> list:
    """A deterministic random subset in original order: items perm[skip:skip + n] of a seeded permutation.

    Disjoint splits of one set are `take(x, a)` and `take(x, b, skip=a)`; n=None takes the rest.
    """
    if n is not None and n <= 0:
        raise ToolchainError(f"example counts must be positive, got {n}")
    if skip == 0 and (n is None or n >= len(items)):
        return list(items)
    if skip >= len(items):
        raise ToolchainError(f"nothing left after skipping {skip} examples: the data has only {len(items)}")
    if n is not None and skip + n > len(items):
        raise ToolchainError(f"asked for {n} examples after skipping {skip}, but the data has only {len(items)}")
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in np.sort(perm[skip:None if n is None else skip + n])]


def torch_runner(model: torch.nn.Module, device: torch.device | str = "cpu", **forward_kwargs) -> Runner:
    """Run an HF model (or a wrapper with the same output names) under inference mode."""
    import torch  # here, not above: serving evaluates ORT sessions only, without PyTorch

    device = torch.device(device)
    model.eval()

    def run(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}, **forward_kwargs)
        names = ("start_logits", "end_logits") if "start_logits" in out else ("logits",)
        return tuple(out[k].float().cpu().numpy() for k in names)

    return run


def session_runner(session, names: Sequence[str] | None = None) -> Runner:
    """Runner over an ONNX Runtime session, feeding `names` (default: all the graph's inputs).

    A graph with a fixed sequence length (exported before graphs took any length) gets shorter batches padded up
    to it (attention mask 0) and its per-token outputs cut back.
    """
    names = list(names or (i.name for i in session.get_inputs()))
    fixed = session.get_inputs()[0].shape[1]  # an int for a fixed-length graph, a dimension name otherwise
    per_token = [o.name in PER_TOKEN for o in session.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        feed = {k: feed[k] for k in names}
        width = feed["attention_mask"].shape[1]
        if not isinstance(fixed, int) or width == fixed:
            return tuple(session.run(None, feed))
        outs = session.run(None, {k: np.pad(v, ((0, 0), (0, fixed - width))) for k, v in feed.items()})
        return tuple(o[:, :width] if token else o for o, token in zip(outs, per_token))

    return run


def trim_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch cut to its longest row: the padding columns every row shares dropped from each per-token array
    (token axis 1, as wide as the attention mask: ids, or hidden states); other arrays (labels, answer positions)
    pass through."""
    mask = batch["attention_mask"]
    length = max(1, int(mask.sum(1).max()))
    return {k: np.ascontiguousarray(v[:, :length]) if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v
            for k, v in batch.items()}


def run_batches(run: Runner, inputs: Callable[[slice | np.ndarray], dict[str, np.ndarray]], n: int, batch_size: int,
                desc: str = "eval", per_token: bool = False, progress: bool = True) -> tuple[np.ndarray, ...]:
    """The runner's outputs over `n` rows in row order, run `batch_size` rows at a time.

    Rows are batched longest first, each batch cut to its longest row (attention mask); with `per_token` (QA:
    start/end logits) every output is padded back to the full width with -inf.
    """
    full = inputs(slice(None))
    width = full["attention_mask"].shape[1]
    order = np.argsort(-full["attention_mask"].sum(1), kind="stable")
    outs: list[np.ndarray] | None = None
    for b in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                  disable=not progress):
        rows = order[b:b + batch_size]
        got = run(trim_padding({k: v[rows] for k, v in full.items()}))
        if outs is None:
            outs = [np.full((n, width) if per_token else (n, *o.shape[1:]), -np.inf if per_token else 0, dtype=o.dtype)
                    for o in got]
        for out, o in zip(outs, got):
            out[rows, :o.shape[1]] = o
    return tuple(outs or ())


def evaluate_squad(run: Runner, examples: list[SquadExample], features: SquadFeatures,
                   batch_size: int = 32, desc: str = "eval") -> tuple[dict[str, float], dict[str, dict]]:
    """(metrics {exact_match, f1, questions}, predictions {id: {text, score, ...}})."""
    start, end = run_batches(run, features.inputs, len(features), batch_size, desc, per_token=True)
    return squad_metrics(examples, features, start, end)


def squad_metrics(examples: list[SquadExample], features: SquadFeatures, start: np.ndarray,
                  end: np.ndarray) -> tuple[dict[str, float], dict[str, dict]]:
    """`evaluate_squad`'s result from the start/end logits of every window."""
    preds = postprocess(examples, features, start, end)
    metrics = squad_scores(gold_answers(examples), {k: v["text"] for k, v in preds.items()})
    metrics["questions"] = len(examples)
    return metrics, preds


def evaluate_classify(run: Runner, arrays: dict[str, np.ndarray], batch_size: int = 64,
                      desc: str = "eval") -> tuple[dict[str, float], np.ndarray]:
    """(metrics {accuracy (percent), examples}, predicted label ids)."""
    inputs = {k: v for k, v in arrays.items() if k != "labels"}
    (logits,) = run_batches(run, lambda s: {k: v[s] for k, v in inputs.items()}, len(arrays["labels"]), batch_size, desc)
    return classify_metrics(logits, arrays["labels"])


def classify_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """`evaluate_classify`'s result from the logits of every row."""
    pred = logits.argmax(-1)
    return {"accuracy": 100.0 * float((pred == labels).mean()), "examples": len(pred)}, pred
