"""Accuracy of any runner (PyTorch model, length configuration, ONNX session) on SQuAD or classification data.

A *runner* maps a batch of model inputs (numpy int64 arrays named input_ids, attention_mask,
token_type_ids) to numpy outputs: (start_logits, end_logits) for QA, (logits,) for classification.
Keeping evaluation behind this one signature lets PyTorch, length-adaptive and ORT graphs share it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain.data.metric import squad_scores
from toolchain.data.squad import SquadExample, SquadFeatures, gold_answers, postprocess

Runner = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, ...]]


def take(items: list, n: int | None, seed: int = 0, skip: int = 0) -> list:
    """A deterministic random subset in original order: items perm[skip:skip + n] of a seeded permutation.

    Disjoint splits of one set are `take(x, a)` and `take(x, b, skip=a)`; n=None takes the rest.
    """
    if n is not None and n <= 0:
        from toolchain.errors import ToolchainError

        raise ToolchainError(f"example counts must be positive, got {n}")
    if skip == 0 and (n is None or n >= len(items)):
        return list(items)
    if n is not None and skip + n > len(items):
        from toolchain.errors import ToolchainError

        raise ToolchainError(f"asked for {n} examples after skipping {skip}, but the data has only {len(items)}")
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in np.sort(perm[skip:None if n is None else skip + n])]


def torch_runner(model: torch.nn.Module, device: torch.device | str = "cpu", **forward_kwargs) -> Runner:
    """Run an HF model (or a wrapper with the same output names) under inference mode."""
    device = torch.device(device)
    model.eval()

    def run(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}, **forward_kwargs)
        names = ("start_logits", "end_logits") if "start_logits" in out else ("logits",)
        return tuple(out[k].float().cpu().numpy() for k in names)

    return run


def run_batches(run: Runner, inputs: Callable[[slice], dict[str, np.ndarray]], n: int, batch_size: int,
                desc: str = "eval") -> tuple[np.ndarray, ...]:
    """Concatenate the runner's outputs over `n` rows taken `batch_size` at a time."""
    outs: list[tuple[np.ndarray, ...]] = []
    for b in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        outs.append(run(inputs(slice(b, b + batch_size))))
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def evaluate_squad(run: Runner, examples: list[SquadExample], features: SquadFeatures,
                   batch_size: int = 32, desc: str = "eval") -> tuple[dict[str, float], dict[str, dict]]:
    """(metrics {exact_match, f1, questions}, predictions {id: {text, score, ...}})."""
    start, end = run_batches(run, features.inputs, len(features), batch_size, desc)
    preds = postprocess(examples, features, start, end)
    metrics = squad_scores(gold_answers(examples), {k: v["text"] for k, v in preds.items()})
    metrics["questions"] = len(examples)
    return metrics, preds


def evaluate_classify(run: Runner, arrays: dict[str, np.ndarray], batch_size: int = 64,
                      desc: str = "eval") -> tuple[dict[str, float], np.ndarray]:
    """(metrics {accuracy (percent), examples}, predicted label ids)."""
    inputs = {k: v for k, v in arrays.items() if k != "labels"}
    (logits,) = run_batches(run, lambda s: {k: v[s] for k, v in inputs.items()}, len(arrays["labels"]), batch_size, desc)
    pred = logits.argmax(-1)
    return {"accuracy": 100.0 * float((pred == arrays["labels"]).mean()), "examples": len(pred)}, pred
