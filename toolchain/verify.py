"""`toolchain verify`: check on a real QA bundle that the runtime selects, answers and serves as it should.

Three checks, each with ``passed`` in the report:

- ``selection``: for every batch size at which the manifest records this machine's latency of every usable graph,
  ``Bundle.select(budget_ms=...)`` over budgets from half the fastest to twice the slowest graph (geometric, plus
  each recorded latency) against a brute force written out here: the most accurate usable graph within the budget
  (ties: the faster), else the fastest.
- ``answers``: each graph, run by the bundle's own ONNX Runtime session, against the length-adaptive PyTorch model
  at the graph's length configuration, on the same dev features. An fp32 graph passes when every answer text is
  identical; an int8 graph when its F1 is at most ``tolerance`` points below PyTorch fp32 (the tolerance its
  quantization recorded in the manifest, else the one given).
- ``concurrency``: one QAPredictor answers ``requests`` dev questions one by one, then ``threads`` threads send
  all of them at once; it passes with no errors and every thread's answers identical to the sequential ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain.bundle import latency_key
from toolchain.data.squad import SquadExample, build_features, load_squad
from toolchain.errors import ToolchainError
from toolchain.evaluate import evaluate_squad, session_runner, take, torch_runner
from toolchain.runtime import Bundle, QAPredictor, accuracy
from toolchain.train_lat import load_length_adaptive

CHECKS = ("selection", "answers", "concurrency")
BUDGETS = 40
SHOWN = 5  # differing answers listed per graph


def brute_force(graphs: Sequence[tuple[Mapping, float]], budget_ms: float) -> tuple[str, bool]:
    """(name, fits) by definition over (entry, latency ms) pairs: the most accurate graph within the budget
    (unmeasured accuracy last; ties: lower latency, fewer MACs, name), else the fastest."""

    def rank(graph: tuple[Mapping, float]) -> tuple:
        entry, ms = graph
        acc = accuracy(entry)
        return acc is None, -(acc or 0.0), ms, entry["macs"], entry["name"]

    fitting = [(e, ms) for e, ms in graphs if ms <= budget_ms]
    if fitting:
        return min(fitting, key=rank)[0]["name"], True
    return min(graphs, key=lambda g: (g[1], g[0]["macs"], g[0]["name"]))[0]["name"], False


def check_selection(bundle: Bundle) -> dict:
    """The selector against ``brute_force`` over a budget sweep at each batch size measured here."""
    ep = bundle.hardware.resolve_ep(bundle.ep)[0]
    usable = [e for e in bundle.manifest["graphs"] if bundle.hardware.unusable(e, ep) is None]
    prefix = latency_key(ep, 1)[:-1]  # "<ep>:<machine>:b"
    batches = sorted({int(k[len(prefix):]) for e in usable for k in e["latency_ms"]
                      if k.startswith(prefix) and k[len(prefix):].isdigit()})
    report: dict = {"ep": ep, "batches": [], "skipped": {}, "checked": 0, "mismatches": []}
    for batch in batches:
        timed = [(e, e["latency_ms"].get(latency_key(ep, batch), {}).get("median")) for e in usable]
        missing = [e["name"] for e, ms in timed if ms is None]
        if missing:
            report["skipped"][str(batch)] = f"no manifest latency for {', '.join(missing)}"
            continue
        lats = [ms for _, ms in timed]
        budgets = sorted({*np.geomspace(0.5 * min(lats), 2 * max(lats), BUDGETS).tolist(), *lats})
        for budget in budgets:
            sel = bundle.select(budget_ms=budget, batch=batch)
            want = brute_force(timed, budget)
            if (sel.entry["name"], sel.fits) != want:
                report["mismatches"].append({"budget_ms": budget, "batch": batch, "selected": sel.entry["name"],
                                             "fits": sel.fits, "expected": want[0], "expected_fits": want[1]})
        report["batches"].append(batch)
        report["checked"] += len(budgets)
    if not report["checked"]:
        report["error"] = (f"no batch size has a manifest latency of every usable graph for {prefix}*: "
                           "run `toolchain bench` on this machine")
    report["passed"] = bool(report["checked"]) and not report["mismatches"]
    return report


def check_answers(bundle: Bundle, entries: Sequence[Mapping], model: torch.nn.Module, examples: list[SquadExample],
                  tolerance: float) -> dict:
    """Each graph's answers and F1/EM against the PyTorch model's at the graph's length configuration."""
    ep = bundle.hardware.resolve_ep(bundle.ep)[0]
    features, pytorch, graphs = {}, {}, []
    for entry in tqdm(entries, desc="verify graphs", unit="graph", dynamic_ncols=True):
        seq, config = entry["max_seq_length"], entry["length_config"]
        if seq not in features:
            features[seq] = build_features(examples, bundle.tokenizer, seq, bundle.doc_stride(seq))
        onnx_metrics, onnx_preds = evaluate_squad(session_runner(bundle.session(entry, ep), entry["inputs"]), examples,
                                                  features[seq], desc=entry["name"])
        bundle.release(entry, ep)  # one session at a time: a bundle's sessions together outgrow the memory
        guard = entry.get("protect_answers", 0)  # absent from bundles exported before the answer guard
        key = (seq, None if config is None else tuple(config), guard)
        if key not in pytorch:
            pytorch[key] = evaluate_squad(torch_runner(model.guarded(guard), length_config=config), examples,
                                          features[seq], desc=f"{entry['name']} pytorch")
        torch_metrics, torch_preds = pytorch[key]
        differ = [{"id": ex.id, "onnx": onnx_preds[ex.id]["text"], "pytorch": torch_preds[ex.id]["text"]}
                  for ex in examples if onnx_preds[ex.id]["text"] != torch_preds[ex.id]["text"]]
        result = {"name": entry["name"], "precision": entry["precision"], "length_config": config,
                  "max_seq_length": seq, "unusable_here": bundle.hardware.unusable(entry, ep),
                  "questions": len(examples), "answers_equal": len(examples) - len(differ),
                  "differences": differ[:SHOWN],
                  "onnx": {k: onnx_metrics[k] for k in ("f1", "exact_match")},
                  "pytorch": {k: torch_metrics[k] for k in ("f1", "exact_match")}}
        if entry["precision"] == "int8":
            allowed = (entry.get("quantization") or {}).get("tolerance", tolerance)
            drop = torch_metrics["f1"] - onnx_metrics["f1"]
            result.update(f1_drop=drop, tolerance=allowed, passed=drop <= allowed)
        else:
            result["passed"] = not differ
        graphs.append(result)
    return {"passed": all(g["passed"] for g in graphs), "graphs": graphs}


def check_concurrency(bundle: Bundle, examples: list[SquadExample], budget_ms: float | None, requests: int,
                      threads: int) -> dict:
    """One predictor's answers from ``threads`` concurrent callers against its sequential answers."""
    predictor = QAPredictor(bundle, budget_ms=budget_ms)
    items = [(ex.question, ex.context) for ex in itertools.islice(itertools.cycle(examples), requests)]
    want = [predictor.predict(q, c) for q, c in items]
    errors: list[str] = []

    def client(_: int) -> list[dict | None]:
        answers = []
        for q, c in items:
            try:
                answers.append(predictor.predict(q, c))
            except Exception as e:  # every failure under concurrency is a finding, whatever its type
                errors.append(f"{type(e).__name__}: {e}")
                answers.append(None)
        return answers

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(client, range(threads)))
    identical = all(got == want for got in results)
    return {"graph": predictor.entry["name"], "reason": predictor.selection.reason, "budget_ms": budget_ms,
            "threads": threads, "requests": requests, "errors": len(errors),
            "first_error": errors[0] if errors else None, "identical": identical, "passed": identical and not errors}


def _lat_graphs(bundle: Bundle, names: Sequence[str] | None) -> list[Mapping]:
    lat = {g["name"]: g for g in bundle.manifest["graphs"] if g["kind"] == "lat"}
    if not lat:
        raise ToolchainError(f"bundle {bundle.path} has no lat graphs")
    unknown = [n for n in names or () if n not in lat]
    if unknown:
        raise ToolchainError(f"no lat graph named {', '.join(map(repr, unknown))} in bundle {bundle.path}; "
                             f"choose from {', '.join(lat)}")
    return [lat[n] for n in dict.fromkeys(names or lat)]


def verify(bundle: Bundle, model_dir: str | Path | None, eval_data: str | Path, examples: int = 200, skip: int = 0,
           graphs: Sequence[str] | None = None, tolerance: float = 1.0, budget_ms: float | None = None,
           requests: int = 100, threads: int = 8) -> dict:
    """Run the three checks on a QA bundle; the report's ``failed`` lists the checks that did not pass.

    ``model_dir``: the length-adaptive checkpoint the bundle was exported from (default: the manifest's
    ``source_checkpoint``); ``examples`` dev questions of ``eval_data`` after ``skip`` of its seeded permutation;
    ``graphs``: names to compare with PyTorch (default: every lat graph). Bad input raises ToolchainError.
    """
    if bundle.task != "squad":
        raise ToolchainError(f"bundle {bundle.path} is a {bundle.task} bundle: verify checks QA (squad) bundles only")
    for name, value in (("examples", examples), ("requests", requests), ("threads", threads)):
        if value <= 0:
            raise ToolchainError(f"{name} must be positive, got {value}")
    if skip < 0 or tolerance < 0:
        raise ToolchainError(f"skip and tolerance must be >= 0, got {skip} and {tolerance}")
    entries = _lat_graphs(bundle, graphs)
    model_dir = Path(model_dir or bundle.manifest.get("source_checkpoint") or "")
    if not model_dir.is_dir():
        raise ToolchainError(f"checkpoint not found: {model_dir} (give --model, the checkpoint the bundle came from)")
    model, _, meta = load_length_adaptive(model_dir, require_lat=True)
    if meta["task"] != "squad":
        raise ToolchainError(f"{model_dir} is a {meta['task']} checkpoint, not squad")
    dev = take(load_squad(eval_data), examples, skip=skip)
    report = {"bundle": str(bundle.path), "model": str(model_dir), "eval_data": str(eval_data), "examples": len(dev),
              "skip": skip, "selection": check_selection(bundle),
              "answers": check_answers(bundle, entries, model, dev, tolerance),
              "concurrency": check_concurrency(bundle, dev, budget_ms, requests, threads)}
    report["failed"] = [c for c in CHECKS if not report[c]["passed"]]
    return report


def summary(report: Mapping) -> str:
    """A few lines for people: one per check, one per compared graph."""
    mark = lambda ok: "ok" if ok else "FAILED"  # noqa: E731
    s = report["selection"]
    lines = [f"selection: {mark(s['passed'])}: {s['checked']} budgets at batch "
             f"{', '.join(map(str, s['batches'])) or 'none'}, {len(s['mismatches'])} mismatches"
             + (f" ({s['error']})" if "error" in s else "")]
    for g in report["answers"]["graphs"]:
        lines.append(f"answers {g['name']}: {mark(g['passed'])}: {g['answers_equal']}/{g['questions']} identical to "
                     f"PyTorch, F1 {g['onnx']['f1']:.2f} (PyTorch {g['pytorch']['f1']:.2f})"
                     + (f", drop {g['f1_drop']:.2f} (tolerance {g['tolerance']:g})" if "f1_drop" in g else ""))
    c = report["concurrency"]
    lines.append(f"concurrency: {mark(c['passed'])}: {c['graph']}, {c['threads']} threads x {c['requests']} requests, "
                 f"{c['errors']} errors, answers {'identical' if c['identical'] else 'DIFFER'}"
                 + (f" (first error: {c['first_error']})" if c["first_error"] else ""))
    return "\n".join(lines)
