"""Serving: pick a bundle's graph for a latency, accuracy or MAC budget on this machine, and answer requests with it.

Selection happens in two steps. The *hardware filter* keeps the graphs this machine can run well: the execution
provider is CUDA only when ``ep="cuda"`` or ``ep="auto"`` and CUDA really works (``hardware.cuda_usable``), else
the CPU, with a note saying why CUDA is not used. On the CPU, INT8 graphs (U8S8, ``format`` qoperator or qdq,
``ep`` cpu) are kept on an x86 CPU without VNNI/AMX only when their weights are 7-bit (``reduce_range``): there
full-range U8S8 GEMMs saturate (wrong outputs). On CUDA the candidates are the ``ep`` cuda INT8 graphs (S8S8 QDQ) and
the fp32 graphs. GEEP bundles are served by ``GeepPredictor`` (per-request exit depth, no selection policy).

The *policy* then ranks the survivors (at most one of the three may be given):

- ``budget_ms``: the most accurate graph whose latency at ``batch`` fits the budget (ties: the faster). When none
  fits, the fastest graph, with ``fits=False`` and a reason saying so.
- ``min_f1``: the fastest graph whose accuracy metric (F1 for QA, accuracy for classification, in percent) is at
  least ``min_f1``. When none is, a ToolchainError naming the best measured value: a latency miss only costs time,
  while serving below an accuracy floor would give answers the caller declared unacceptable.
- ``max_macs``: the most accurate graph with at most ``max_macs`` MACs (ties: the faster). When none fits, the
  cheapest, with ``fits=False``.
- none given: the most accurate graph (ties: the faster).

Accuracy is the entry's ``metrics["f1"]`` or ``metrics["accuracy"]``; graphs without one rank below every measured
graph and never satisfy ``min_f1``. Latency is the median from ``latency_ms[latency_key(ep, batch)]`` in the
manifest (the key embeds the machine id, so numbers from other hardware are ignored); missing that, the median from
``latency-cache.json`` beside the manifest (same keys, per graph checksum and thread count); missing that, a short
probe (``probe_runs`` timed runs on real dev inputs at that batch), stored in the cache with an atomic write so the
next load does not probe again. With ``probe_runs=0`` graphs without a latency cannot satisfy ``budget_ms`` or
``min_f1``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.bundle import EPS, graph_path, latency_key, load_manifest
from toolchain.data import prepare
from toolchain.data.classify import encode_texts
from toolchain.data.squad import SquadExample, build_features, postprocess
from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError
from toolchain.evaluate import run_batches, session_runner
from toolchain.exit_batching import INPUT_NAMES, bucketed_predict, ort_depth_runner, ort_exit_predictor
from toolchain.files import write_json
from toolchain.hardware import cpu_info, cuda_usable, u8s8_saturates
from toolchain.models import check_task, read_meta
from toolchain.sessions import ort_session
from toolchain.timing import time_fn

log = logging.getLogger(__name__)
CACHE = "latency-cache.json"
PROBE_RUNS = 5
CUDA = "CUDAExecutionProvider"
LatencySource = Callable[[Mapping, str, int], tuple[float, str] | None]  # (entry, ep, batch) -> (ms, source)


def _check_ep(ep: str) -> None:
    if ep not in ("auto", *EPS):
        raise ToolchainError(f"unknown execution provider {ep!r}: choose auto, {', '.join(EPS)}")


@dataclass(frozen=True)
class Hardware:
    """What the selector may use: CPU ISA names (as in ``cpu_info``) and architecture, ONNX Runtime providers, and
    why CUDA fails (``None`` when it works). Tests build one by hand; ``detect()`` reads this machine."""

    isa: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cuda_error: str | None = None
    arch: str = "x86_64"

    @classmethod
    def detect(cls) -> Hardware:
        import onnxruntime as ort

        ok, why = cuda_usable()
        return cls(tuple(cpu_info()["isa"]), tuple(ort.get_available_providers()), None if ok else why,
                   platform.machine())

    def resolve_ep(self, ep: str) -> tuple[str, list[str]]:
        """(execution provider to use, notes): ``auto`` takes CUDA only when it works, with a note when it does not."""
        _check_ep(ep)
        why = (f"onnxruntime has no {CUDA} (install the 'cuda' extra: onnxruntime-gpu)" if CUDA not in self.providers
               else self.cuda_error)
        if ep == "cpu":
            return "cpu", []
        if why is None:
            return "cuda", []
        if ep == "cuda":
            raise ToolchainError(f"the CUDA execution provider is not usable: {why}")
        return "cpu", [f"CUDA not used: {why}; running on the CPU"]

    def unusable(self, entry: Mapping, ep: str, kind: str = "lat") -> str | None:
        """Why ``entry`` is not a candidate on ``ep`` here, or None; only graphs of ``kind`` are candidates
        (``lat`` for the selector, ``geep-exit`` for ``GeepPredictor``)."""
        if entry["kind"] != kind:
            return (f"{entry['kind']} graphs are served by the GEEP runtime, not this selector" if kind == "lat"
                    else f"not a {kind} graph")
        if entry["precision"] != "int8":
            return None
        if entry["ep"] != ep:
            return f"int8 graph made for the {entry['ep']} execution provider"
        if entry["format"] not in (("qoperator", "qdq") if ep == "cpu" else ("qdq",)):
            return f"int8 format {entry['format']!r} does not run on the {ep} execution provider"
        exact_anywhere = entry.get("quantization", {}).get("reduce_range", False)
        if ep == "cpu" and u8s8_saturates(list(self.isa), self.arch) and not exact_anywhere:
            return "full-range int8 on a CPU without VNNI/AMX: its U8S8 GEMMs saturate (only reduce-range graphs are exact)"
        return None


@dataclass
class Candidate:
    """One manifest graph as the selector saw it; ``rejected`` says why it was not chosen (None for the choice)."""

    entry: Mapping
    accuracy: float | None
    latency_ms: float | None = None
    latency_source: str | None = None  # manifest, cache or probe
    rejected: str | None = None

    @property
    def name(self) -> str:
        return self.entry["name"]


@dataclass(frozen=True)
class Selection:
    """The chosen graph, why (``reason``), whether it met the limit (``fits``), notes about the hardware, the policy
    and its ``limit``, the execution provider and batch it was chosen for, and every candidate (see ``explain``)."""

    entry: Mapping
    reason: str
    fits: bool
    notes: list[str]
    policy: str  # budget_ms, min_f1, max_macs or most_accurate
    limit: float | None
    ep: str
    batch: int
    latency_key: str
    candidates: list[Candidate] = field(repr=False)


def accuracy(entry: Mapping) -> float | None:
    """The entry's F1 (QA) or accuracy (classification) in percent, or None when not measured."""
    metrics = entry.get("metrics") or {}
    value = metrics.get("f1", metrics.get("accuracy"))
    return float(value) if isinstance(value, (int, float)) else None


def manifest_latency(entry: Mapping, ep: str, batch: int) -> tuple[float, str] | None:
    """Median latency recorded in the manifest for this machine, ``ep`` and ``batch``."""
    timing = entry["latency_ms"].get(latency_key(ep, batch))
    return (float(timing["median"]), "manifest") if timing else None


def _policy(budget_ms: float | None, min_f1: float | None, max_macs: float | None, batch: int) -> tuple[str, float | None]:
    if not isinstance(batch, int) or batch <= 0:
        raise ToolchainError(f"batch must be a positive integer, got {batch!r}")
    given = {k: v for k, v in (("budget_ms", budget_ms), ("min_f1", min_f1), ("max_macs", max_macs)) if v is not None}
    if len(given) > 1:
        raise ToolchainError(f"give at most one of budget_ms, min_f1, max_macs (got {', '.join(given)})")
    if not given:
        return "most_accurate", None
    (policy, limit), = given.items()
    if policy == "min_f1" and not 0 <= limit <= 100:
        raise ToolchainError(f"min_f1 must be within 0..100 (percent), got {limit}")
    if policy != "min_f1" and not limit > 0:
        raise ToolchainError(f"{policy} must be positive, got {limit}")
    return policy, float(limit)


def select(entries: Sequence[Mapping], budget_ms: float | None = None, min_f1: float | None = None,
           max_macs: float | None = None, batch: int = 1, *, ep: str = "auto", hardware: Hardware | None = None,
           latency: LatencySource = manifest_latency) -> Selection:
    """Pick one graph of ``entries`` (manifest graph entries) by the module's policies; see the module docstring.

    ``latency(entry, ep, batch)`` gives (median ms, source) or None; the default reads the manifest only.
    ToolchainError when no graph can run here, no candidate has a latency for a latency policy, or ``min_f1`` is
    above every graph.
    """
    policy, limit = _policy(budget_ms, min_f1, max_macs, batch)
    hardware = hardware or Hardware.detect()
    ep, notes = hardware.resolve_ep(ep)
    key = latency_key(ep, batch)
    cands = [Candidate(e, accuracy(e), rejected=hardware.unusable(e, ep)) for e in entries]
    usable = [c for c in cands if c.rejected is None]
    if not usable:
        why = "; ".join(f"{c.name}: {c.rejected}" for c in cands) or "the bundle lists no graphs"
        raise ToolchainError(f"no graph of this bundle can run on the {ep} execution provider here ({why})")
    for c in usable:
        c.latency_ms, c.latency_source = latency(c.entry, ep, batch) or (None, None)
    if policy in ("budget_ms", "min_f1"):
        for c in usable:
            if c.latency_ms is None:
                c.rejected = f"no latency for {key} (not in the manifest or cache, and probing is off)"
        usable = [c for c in usable if c.latency_ms is not None]
        if not usable:
            raise ToolchainError(f"no graph has a latency for {key}: run `toolchain bench` or allow probing")

    def faster(c: Candidate) -> tuple:
        return (math.inf if c.latency_ms is None else c.latency_ms, c.entry["macs"], c.name)

    def better(c: Candidate) -> tuple:
        return (c.accuracy is None, -(c.accuracy or 0.0), *faster(c))

    if policy == "min_f1":
        for c in usable:
            if c.accuracy is None or c.accuracy < limit:
                c.rejected = "no measured accuracy" if c.accuracy is None else f"accuracy {c.accuracy:g} < {limit:g}"
        ok = [c for c in usable if c.rejected is None]
        if not ok:
            best = max((c.accuracy for c in usable if c.accuracy is not None), default=None)
            raise ToolchainError(f"no graph reaches accuracy {limit:g} on {ep} (best measured: "
                                 f"{'none' if best is None else f'{best:g}'})")
        chosen, fits, reason = min(ok, key=faster), True, f"fastest graph with accuracy >= {limit:g}"
    else:
        cost = {"budget_ms": lambda c: c.latency_ms, "max_macs": lambda c: c.entry["macs"],
                "most_accurate": lambda c: 0.0}[policy]
        unit = "ms" if policy == "budget_ms" else "MACs"
        for c in usable:
            if limit is not None and cost(c) > limit:
                c.rejected = f"{cost(c):.4g} {unit} over the budget of {limit:.4g} {unit}"
        ok = [c for c in usable if c.rejected is None]
        fits = bool(ok)
        if ok:
            chosen = min(ok, key=better)
            reason = ("most accurate graph" + (f" within {limit:.4g} {unit}" if limit is not None else "")
                      + " (ties: the faster)")
        else:
            chosen = min(usable, key=lambda c: (cost(c), *faster(c)))
            chosen.rejected = None
            cheapest = "fastest" if policy == "budget_ms" else "cheapest"
            reason = f"no graph fits {limit:.4g} {unit} at batch {batch}: using the {cheapest} ({cost(chosen):.4g} {unit})"
    for c in ok:
        if c is not chosen:
            c.rejected = ("no measured accuracy: ranks below measured graphs" if c.accuracy is None is not chosen.accuracy
                          else f"slower than {chosen.name}" if policy == "min_f1" or c.accuracy == chosen.accuracy
                          else f"less accurate than {chosen.name}")
    return Selection(chosen.entry, reason, fits, notes, policy, limit, ep, batch, key, cands)


def explain(selection: Selection) -> dict:
    """JSON-ready account of a selection: the choice, the policy, and every candidate with why it was rejected."""
    return {
        "graph": selection.entry["name"], "fits": selection.fits, "reason": selection.reason,
        "policy": selection.policy, "limit": selection.limit, "ep": selection.ep, "batch": selection.batch,
        "latency_key": selection.latency_key, "notes": selection.notes,
        "candidates": [{"name": c.name, "precision": c.entry["precision"], "format": c.entry["format"],
                        "ep": c.entry["ep"], "macs": c.entry["macs"], "accuracy": c.accuracy,
                        "latency_ms": c.latency_ms, "latency_source": c.latency_source,
                        "chosen": c.entry is selection.entry, "rejected": c.rejected}
                       for c in selection.candidates],
    }


class Bundle:
    """A verified bundle with its tokenizer, shared ONNX Runtime sessions and latency cache (thread-safe)."""

    def __init__(self, path: Path, manifest: dict, tokenizer, ep: str, hardware: Hardware | None, threads: int,
                 probe_runs: int):
        self.path, self.manifest, self.tokenizer = path, manifest, tokenizer
        self.meta = read_meta(path)
        self.task: str = check_task(manifest.get("task", self.meta.get("task")))
        self.ep, self._hardware, self.threads, self.probe_runs = ep, hardware, threads, probe_runs
        self.lock = threading.RLock()  # guards sessions, the cache and the tokenizer (fast tokenizers are not re-entrant)
        self._sessions: dict[tuple[str, str], object] = {}
        self._cache = self._read_cache()

    @classmethod
    def load(cls, path: str | Path, ep: str = "auto", *, hardware: Hardware | None = None, threads: int | None = None,
             probe_runs: int = PROBE_RUNS) -> Bundle:
        """Open a bundle, verifying every graph's checksum. ``ep``: auto, cpu or cuda; ``threads``: intra-op threads
        (default: all usable cores); ``probe_runs``: timed runs per missing latency (0: never probe)."""
        _check_ep(ep)
        path = Path(path)
        manifest = load_manifest(path, verify=True)
        if not manifest["graphs"]:
            raise ToolchainError(f"bundle {path} has no graphs")
        threads = threads or cpu_info()["cores"]
        if threads <= 0 or probe_runs < 0:
            raise ToolchainError(f"threads must be positive and probe_runs >= 0, got {threads} and {probe_runs}")
        return cls(path, manifest, TextTokenizer.load(path), ep, hardware, threads, probe_runs)

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            self._hardware = Hardware.detect()
        return self._hardware

    def select(self, budget_ms: float | None = None, min_f1: float | None = None, max_macs: float | None = None,
               batch: int = 1) -> Selection:
        """``select`` over this bundle's graphs, with manifest, cached or probed latencies."""
        return select(self.manifest["graphs"], budget_ms, min_f1, max_macs, batch, ep=self.ep, hardware=self.hardware,
                      latency=self.latency)

    def session(self, entry: Mapping, ep: str):
        """The shared ONNX Runtime session of a graph on ``ep`` (created once)."""
        with self.lock:
            key = (entry["name"], ep)
            if key not in self._sessions:
                self._sessions[key] = ort_session(graph_path(self.path, entry), self.threads, ep)
            return self._sessions[key]

    def release(self, entry: Mapping, ep: str) -> None:
        """Drop a graph's shared session and with it its memory arena (a batch-32 arena is about 1 GB)."""
        with self.lock:
            self._sessions.pop((entry["name"], ep), None)

    def doc_stride(self, seq: int) -> int:
        return min(int(self.meta.get("doc_stride", 128)), seq // 2)

    def latency(self, entry: Mapping, ep: str, batch: int) -> tuple[float, str] | None:
        """(median ms, source): from the manifest, else the cache, else a probe (when ``probe_runs`` > 0)."""
        found = manifest_latency(entry, ep, batch)
        if found:
            return found
        key = latency_key(ep, batch)
        with self.lock:
            record = self._cache.get(entry["name"], {})
            timing = record.get("latency_ms", {}).get(key) if record.get("sha256") == entry["sha256"] else None
            if timing and timing.get("threads") == self.threads:
                return float(timing["median"]), "cache"
            if not self.probe_runs:
                return None
            timing = self.probe(entry, ep, batch)
            if record.get("sha256") != entry["sha256"]:
                record = {"sha256": entry["sha256"], "latency_ms": {}}
            record["latency_ms"][key] = timing
            self._cache[entry["name"]] = record
            try:
                write_json(self.path / CACHE, self._cache)
            except OSError as e:
                log.warning("latency cache not written (%s): the next load will probe again", e)
            return timing["median"], "probe"

    def probe(self, entry: Mapping, ep: str, batch: int) -> dict:
        """Time a graph here: ``probe_runs`` runs (after one warm-up) on real dev inputs at ``batch``."""
        session = self.session(entry, ep)
        rows = prepare.sample_inputs(self.task, self.tokenizer, entry["max_seq_length"], batch,
                                     self.meta.get("doc_stride", 128))
        feed = {k: rows[k] for k in entry["inputs"]}
        t = time_fn(lambda: session.run(None, feed), warmup=1, repeats=self.probe_runs)
        return {"median": t["latency_ms_median"], "p90": t["latency_ms_p90"], "threads": self.threads, "runs": t["runs"]}

    def _read_cache(self) -> dict:
        path = self.path / CACHE
        if not path.is_file():
            return {}
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(cache, dict):
                return cache
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        log.warning("ignoring unreadable latency cache %s", path)
        return {}


def _text(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ToolchainError(f"{where}: empty or missing {what}")
    return value


class _Predictor:
    """Selects a graph at construction and serves it; one instance may serve concurrent callers."""

    TASK: str
    FIELDS: tuple[str, ...]  # request fields, the required ones first
    REQUIRED: int

    def __init__(self, bundle: Bundle | str | Path, budget_ms: float | None = None, min_f1: float | None = None,
                 max_macs: float | None = None, batch: int = 1, **load_kw):
        """``bundle``: a Bundle or a bundle folder (opened with ``Bundle.load(path, **load_kw)``); the policy
        arguments go to ``Bundle.select``; ``batch`` is also the number of rows per graph run."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, **load_kw)
        if self.bundle.task != self.TASK:
            raise ToolchainError(f"bundle {self.bundle.path} is a {self.bundle.task} bundle, not {self.TASK}")
        self.selection = self.bundle.select(budget_ms, min_f1, max_macs, batch)
        self.entry = self.selection.entry
        self.session = self.bundle.session(self.entry, self.selection.ep)
        self._runner = session_runner(self.session, self.entry["inputs"])

    def _run(self, rows: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """The graph's outputs over all rows in row order, ``selection.batch`` rows per run (rows of similar length
        together, each run cut to its longest row)."""
        return run_batches(self._runner, lambda idx: {k: v[idx] for k, v in rows.items()}, len(rows["input_ids"]),
                           self.selection.batch, per_token=self.TASK == "squad", progress=False)


class QAPredictor(_Predictor):
    """Extractive QA: contexts longer than the graph's length are split into ``doc_stride`` windows and the best span
    over all windows is returned. ``score`` is start + end logit (None when no window had a valid span)."""

    TASK, FIELDS, REQUIRED = "squad", ("question", "context"), 2

    def predict(self, question: str, context: str) -> dict:
        """{"answer", "score", "start", "end", "graph"}; ``context[start:end] == answer``."""
        return self.predict_batch([(question, context)])[0]

    def predict_batch(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        if not items:
            return []
        examples = [SquadExample(str(i), _text(q, "question", f"request {i}").strip(), _text(c, "context", f"request {i}"),
                                 (), ()) for i, (q, c) in enumerate(items)]
        seq = self.entry["max_seq_length"]
        with self.bundle.lock:
            features = build_features(examples, self.bundle.tokenizer, seq, self.bundle.doc_stride(seq))
        start, end = self._run(features.inputs(slice(None)))
        preds = postprocess(examples, features, start, end)
        return [{"answer": p["text"], "score": p["score"] if math.isfinite(p["score"]) else None, "start": p["start"],
                 "end": p["end"], "graph": self.entry["name"]} for p in (preds[ex.id] for ex in examples)]


def _encode_texts(bundle: Bundle, items: Sequence[str | tuple[str, str | None]], seq: int,
                  names: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts or (text, text_pair) items as int64 arrays ``names`` padded to ``seq`` tokens; empty texts are refused."""
    texts: list[str | tuple[str, str]] = []
    for i, item in enumerate(items):
        text, pair = item if isinstance(item, tuple) else (item, None)
        text = _text(text, "text", f"request {i}")
        texts.append(text if pair is None else (text, _text(pair, "text_pair", f"request {i}")))
    with bundle.lock:
        arrays = encode_texts(bundle.tokenizer, texts, seq)
    return {k: arrays[k] for k in names if k in arrays}


def _labelled(bundle: Bundle, logits: np.ndarray) -> list[dict]:
    """{"label", "score"} per row: the argmax label and its softmax probability."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = bundle.meta.get("labels") or [str(i) for i in range(logits.shape[-1])]
    return [{"label": labels[int(i)], "score": float(p[i])} for p, i in zip(probs, probs.argmax(-1))]


class ClassifyPredictor(_Predictor):
    """Text (pair) classification: ``score`` is the softmax probability of the predicted label."""

    TASK, FIELDS, REQUIRED = "classify", ("text", "text_pair"), 1

    def predict(self, text: str, text_pair: str | None = None) -> dict:
        """{"label", "score", "graph"}."""
        return self.predict_batch([(text, text_pair)])[0]

    def predict_batch(self, items: Sequence[str | tuple[str, str | None]]) -> list[dict]:
        if not items:
            return []
        (logits,) = self._run(_encode_texts(self.bundle, items, self.entry["max_seq_length"], self.entry["inputs"]))
        return [{**r, "graph": self.entry["name"]} for r in _labelled(self.bundle, logits)]


def is_geep(bundle: Bundle) -> bool:
    """Whether the bundle holds GEEP graphs (served by ``GeepPredictor``)."""
    return any(g["kind"].startswith("geep-") for g in bundle.manifest["graphs"])


class GeepPredictor:
    """GEEP early-exit classification from a ``toolchain export-geep`` bundle; one instance may serve concurrent callers.

    The predictor graph gives every request its exit depth before the encoder runs; requests are grouped by depth
    and each group runs, ``batch`` rows at a time, through the graph of the encoder truncated there. Per depth the
    graph is the one this hardware runs best: an INT8 variant (``toolchain quantize``) where ``Hardware.unusable``
    accepts it on the execution provider in use, else the fp32 graph.
    """

    FIELDS, REQUIRED = ("text", "text_pair"), 1

    def __init__(self, bundle: Bundle | str | Path, batch: int = 32, **load_kw):
        """``bundle``: a Bundle or a bundle folder (opened with ``Bundle.load(path, **load_kw)``)."""
        if not isinstance(batch, int) or batch <= 0:
            raise ToolchainError(f"batch must be a positive integer, got {batch!r}")
        self.bundle, self.batch = (bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, **load_kw)), batch
        graphs, where = self.bundle.manifest["graphs"], self.bundle.path
        self.predictor = next((g for g in graphs if g["kind"] == "geep-predictor"), None)
        if self.predictor is None:
            raise ToolchainError(f"bundle {where} has no GEEP predictor graph (export it with `toolchain export-geep`)")
        vocab = self.bundle.tokenizer.vocab_size
        if self.predictor.get("vocab_size") != vocab:
            raise ToolchainError(f"the GEEP predictor of bundle {where} was built for a vocabulary of "
                                 f"{self.predictor.get('vocab_size')} tokens, but the bundle's tokenizer has {vocab}")
        self.ep, self.notes = self.bundle.hardware.resolve_ep(self.bundle.ep)
        usable = [g for g in graphs if self.bundle.hardware.unusable(g, self.ep, "geep-exit") is None]
        self.graphs: dict[int, Mapping] = {}
        for depth in range(1, self.predictor["num_layers"] + 1):
            found = [g for g in usable if g.get("depth") == depth]
            if not found:
                raise ToolchainError(f"bundle {where} has no geep-exit graph for depth {depth} that runs on {self.ep} here")
            self.graphs[depth] = min(found, key=lambda g: (g["precision"] != "int8", g["name"]))
        self._predict_exit = ort_exit_predictor(self.bundle.session(self.predictor, "cpu"))
        self._run_at_depth = ort_depth_runner({d: self.bundle.session(g, self.ep) for d, g in self.graphs.items()})

    def predict(self, text: str, text_pair: str | None = None) -> dict:
        """{"label", "score", "exit_layer", "graph"}."""
        return self.predict_batch([(text, text_pair)])[0]

    def predict_batch(self, items: Sequence[str | tuple[str, str | None]]) -> list[dict]:
        """One result per item, in request order: label, softmax score, exit depth and the graph that answered."""
        if not items:
            return []
        inputs = _encode_texts(self.bundle, items, self.predictor["max_seq_length"], INPUT_NAMES)
        logits, depths = bucketed_predict(inputs, self._predict_exit, self._run_at_depth, self.batch)
        return [{**r, "exit_layer": int(d), "graph": self.graphs[int(d)]["name"]}
                for r, d in zip(_labelled(self.bundle, logits), depths)]


PREDICTORS: dict[str, type[_Predictor]] = {"squad": QAPredictor, "classify": ClassifyPredictor}


def read_requests(path: str | Path, fields: tuple[str, ...], required: int) -> list[tuple]:
    """JSON Lines requests: one object per non-blank line with ``fields`` (the first ``required`` non-empty
    strings, the rest optional strings); returned as tuples in ``fields`` order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    except UnicodeDecodeError as e:
        raise ToolchainError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ToolchainError(f"cannot read requests file {path}: {e.strerror}") from None
    requests = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ToolchainError(f"{path}:{no}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ToolchainError(f"{path}:{no}: expected a JSON object with {', '.join(fields[:required])}")
        requests.append(tuple(_text(obj.get(f), f, f"{path}:{no}") if i < required or obj.get(f) is not None else None
                              for i, f in enumerate(fields)))
    if not requests:
        raise ToolchainError(f"{path} holds no requests")
    return requests
