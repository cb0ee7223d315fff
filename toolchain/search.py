"""`toolchain search`: LAT's evolutionary search for Pareto-best length configurations (accuracy vs MACs).

Candidates are scored on a *search split* of the dev set; the final frontier is re-scored on a
disjoint *report split*, so the reported numbers are not the ones the search optimised. Every
evaluated configuration is cached on disk, so a resumed search never evaluates it again.

Choosing the best of ~150 candidates on one split picks the lucky ones (the winner's curse). With a
*selection split* (more dev questions, disjoint from both), the few best candidates at the MAC target
are scored again and the choice is made on search + selection questions together; the report split
still only reports.

Work shared between configurations is reused: with ONNX Runtime a window starts at the first layer that drops any of
its real tokens, from its full-length states (computed once a split), since the layers before it compute what full
length does (`Scorer._outputs`). Scoring a configuration at 52-54% of the MACs on 1,000 questions takes 1.4-1.7x less
time that way, with the same F1.

The cost of a configuration is LAT's MACs at max_seq_length (`cost="padded"`), or the mean MACs over the search
split's inputs cut to their real lengths (`cost="real"`, how the exported graphs run them): with padding cut,
a configuration saves only what it drops of the real tokens.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain.data import prepare
from toolchain.data.metric import question_scores
from toolchain.data.squad import gold_answers
from toolchain.errors import ToolchainError
from toolchain.evaluate import classify_metrics, run_batches, squad_metrics, torch_runner, trim_padding
from toolchain.export import ort_runner
from toolchain.files import write_text
from toolchain.finetune import check_output
from toolchain.lat import LengthAdaptiveModel, sample_length_config
from toolchain.macs import count_macs, expected_macs
from toolchain.models import check_seq_length
from toolchain.train_lat import load_length_adaptive
from toolchain.training import resolve_device

Config = tuple[int, ...]
COSTS = ("padded", "real")


@dataclass
class SearchConfig:
    """LAT's defaults: population 20, parents 10, 30 mutations + 30 crossovers per iteration, p_mut 0.5."""

    iterations: int = 30
    population: int = 20
    parents: int = 10
    mutations: int = 30
    crossovers: int = 30
    mutation_prob: float = 0.5
    length_drop_ratio_bound: float = 0.2
    min_macs_ratio: float = 0.0
    max_macs_ratio: float = 1.0
    seed: int = 42
    cost: str = "padded"  # MACs at max_seq_length (LAT's), or "real": mean over the search split's real lengths
    protect_answers: int | None = None  # the QA answer guard (None: the default, lat.PROTECT_ANSWERS)

    def validate(self) -> None:
        for name in ("iterations", "population", "parents"):
            if getattr(self, name) <= 0:
                raise ToolchainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mutations < 0 or self.crossovers < 0:
            raise ToolchainError("mutations and crossovers must be >= 0")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ToolchainError(f"mutation-prob must be in [0, 1], got {self.mutation_prob}")
        if self.cost not in COSTS:
            raise ToolchainError(f"unknown cost {self.cost!r}; choose {' or '.join(COSTS)}")
        if not 0.0 <= self.min_macs_ratio < self.max_macs_ratio:
            raise ToolchainError(f"MAC bounds [{self.min_macs_ratio}, {self.max_macs_ratio}] admit no configuration")


def pareto_front(points: dict[Config, tuple[int, float]]) -> list[Config]:
    """Configurations not dominated in (fewer MACs, higher score), sorted by MACs."""
    front, best = [], -np.inf
    for cfg, (macs, score) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if score > best:
            front.append(cfg)
            best = score
    return front


def _ranked(points: dict[Config, tuple[int, float]]) -> list[Config]:
    """Non-dominated sorting: the Pareto front first, then the front of the rest, and so on."""
    rest, order = dict(points), []
    while rest:
        front = pareto_front(rest)
        order += front
        for cfg in front:
            del rest[cfg]
    return order


def mutate(cfg: Config, prob: float, rng: random.Random, seq_len: int) -> Config:
    """Resample each layer's length with probability `prob`, between its neighbours (stays non-increasing)."""
    out = list(cfg)
    for i in range(len(out)):
        if rng.random() < prob:
            upper = out[i - 1] if i else seq_len
            lower = out[i + 1] if i + 1 < len(out) else 1
            out[i] = rng.randint(lower, upper)
    return tuple(out)


def crossover(a: Config, b: Config, rng: random.Random) -> Config:
    """Per-layer choice between two parents, then sorted to stay non-increasing."""
    return tuple(sorted((rng.choice(pair) for pair in zip(a, b)), reverse=True))


class Scorer:
    """Scores length configurations on one split with a cache persisted as JSON lines.

    Each row keeps the per-question scores (F1, or 100/0 for a right/wrong label) too, for `gap`'s paired error.
    """

    def __init__(self, model: LengthAdaptiveModel, task: str, split, device: torch.device, cache: Path | None,
                 batch_size: int = 64, engine: str = "torch"):
        self.model, self.task, self.split, self.device, self.batch_size = model, task, split, device, batch_size
        self.engine = engine
        inputs = split[1].inputs if task == "squad" else (lambda idx: {k: v[idx] for k, v in split.items() if k != "labels"})
        self._inputs: Callable[[slice | np.ndarray], dict[str, np.ndarray]] = inputs
        self._real = _real_lengths(task, split)
        self._rows, self._width = len(self._real), self._inputs(slice(0, 1))["input_ids"].shape[1]
        self._prefix_cache = None
        self.cache_path = cache
        self.cache: dict[Config, dict] = {}
        self.scores: dict[Config, np.ndarray] = {}
        if cache is not None and cache.is_file():
            *lines, cut = cache.read_text().split("\n")
            if cut:  # a line an interrupted write left unfinished: drop it, so the next append starts a fresh line
                write_text(cache, "".join(line + "\n" for line in lines))
            for i, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                    key = tuple(row["length_config"])
                    guard = row.get("protect_answers", 0)  # absent from caches written before the answer guard
                    self.cache[key] = row["metrics"]
                    if "scores" in row:  # absent from caches written before per-question scores were kept
                        self.scores[key] = np.asarray(row["scores"], dtype=np.float64)
                except (ValueError, KeyError, TypeError):
                    raise ToolchainError(f"{cache} line {i} is not a cached score: delete the file to re-score") from None
                if key and guard != model.protect_answers:  # full length drops nothing, whatever the guard
                    raise ToolchainError(f"{cache} was scored with protect-answers {guard}, this run uses "
                                         f"{model.protect_answers}: give --protect-answers {guard} or delete the file")
                if task == "squad" and row.get("windows") != "balanced":
                    raise ToolchainError(f"{cache} was scored on BERT's SQuAD windows, before windows were balanced: "
                                         "delete the file to re-score")

    def __call__(self, cfg: Config | None) -> dict:
        key = cfg or ()
        if key not in self.cache:
            outputs = self._outputs(cfg or None)
            if self.task == "squad":
                metrics, preds = squad_metrics(*self.split, *outputs)
                f1 = question_scores(gold_answers(self.split[0]), {k: v["text"] for k, v in preds.items()})[1]
                scores = 100.0 * np.asarray(f1)
            else:
                metrics, pred = classify_metrics(*outputs, self.split["labels"])
                scores = 100.0 * (pred == self.split["labels"])
            self.cache[key], self.scores[key] = metrics, scores
            if self.cache_path is not None:
                with open(self.cache_path, "a") as f:
                    windows = {"windows": "balanced"} if self.task == "squad" else {}  # see squad.build_features
                    f.write(json.dumps({"length_config": list(key), "metrics": metrics, "protect_answers":
                                        self.model.protect_answers, **windows,
                                        "scores": np.round(scores, 2).tolist()}) + "\n")
        return self.cache[key]

    def _outputs(self, cfg: Config | None) -> tuple[np.ndarray, ...]:
        """The model's outputs for every row of the split at `cfg`.

        With ONNX Runtime a row's layers before the first one that drops any of its real tokens compute what full
        length computes (padding goes first), and a window holds 178 real tokens of 384 on average: such rows start
        at that layer from their full-length states (`_prefix`, computed once), through a second graph that begins at
        the layer chosen to save the most; rows no layer cuts take full length's outputs. A configuration at 52-54% of
        the MACs scores 1.4-1.7x faster so. Other rows, and the PyTorch engine, run the whole model.
        """
        if self.engine != "ort":
            run = torch_runner(self.model, self.device, length_config=cfg)
            return run_batches(run, self._inputs, self._rows, self.batch_size, per_token=self.task == "squad")
        if cfg is None:
            return self._run_rows(ort_runner(self.model, None, self._inputs(slice(0, 2))), self._inputs,
                                  np.arange(self._rows))
        states, full = self._prefix()
        layers = len(cfg)
        starts = (np.asarray(cfg)[None, :] >= self._real[:, None]).cumprod(1).sum(1)  # leading layers cutting nothing
        inner = (starts >= 1) & (starts < layers)
        gains = [j * self._real[inner & (starts >= j)].sum() for j in range(1, layers)]  # layers x tokens skipped
        begin = 1 + int(np.argmax(gains)) if gains else layers
        outputs = [o.copy() for o in full]
        for first, rows in ((0, np.flatnonzero(starts < begin)), (begin, np.flatnonzero((starts >= begin) & inner))):
            if len(rows):
                feed = self._inputs if first == 0 else functools.partial(self._states_feed, states[first - 1])
                run = ort_runner(self.model, cfg, feed(rows[:2]), start_layer=first)
                for out, got in zip(outputs, self._run_rows(run, feed, rows)):
                    out[rows] = got
        return tuple(outputs)

    def release(self) -> None:
        """Free the full-length states (about 1.4 GB per 1,000 SQuAD questions at 384); computed again if needed."""
        self._prefix_cache = None

    def _run_rows(self, run, feed: Callable[[np.ndarray], dict[str, np.ndarray]], rows: np.ndarray
                  ) -> tuple[np.ndarray, ...]:
        """`run` over the split's `rows`, fed by `feed(rows)`, in batches; per-token outputs at the split's width."""
        outs = run_batches(run, lambda idx: feed(rows[idx]), len(rows), self.batch_size,
                           per_token=self.task == "squad", progress=False)
        return tuple(np.pad(o, ((0, 0), (0, self._width - o.shape[1])), constant_values=-np.inf) for o in outs
                     ) if self.task == "squad" else outs

    def _states_feed(self, states: list[np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Graph inputs from the full-length states of `rows` (zero-padded to the split's width, at which the graphs
        are traced so that every cutting layer cuts) and their attention mask."""
        hidden = np.zeros((len(rows), self._width, self.model.config.hidden_size), dtype=np.float32)
        for i, r in enumerate(rows):
            hidden[i, :len(states[r])] = states[r]
        return {"hidden_states": hidden, "attention_mask": self._inputs(rows)["attention_mask"]}

    def _prefix(self) -> tuple[list[list[np.ndarray]], tuple[np.ndarray, ...]]:
        """Per layer after the first, every row's full-length states entering it (cut to its real tokens), and full
        length's outputs; computed once, with PyTorch."""
        if self._prefix_cache is None:
            model, layers, qa = self.model.cpu().eval(), self.model.num_layers, self.task == "squad"
            states: list[list[np.ndarray]] = [[None] * self._rows for _ in range(layers - 1)]
            outputs = [np.full((self._rows, self._width) if qa else (self._rows, self.model.config.num_labels),
                               -np.inf if qa else 0.0, dtype=np.float32) for _ in range(2 if qa else 1)]
            order = np.argsort(-self._real, kind="stable")  # rows of similar length batched, each cut to its longest
            for b in tqdm(range(0, self._rows, self.batch_size), desc="full-length states", unit="batch", leave=False,
                          dynamic_ncols=True):
                rows = order[b:b + self.batch_size]
                with torch.inference_mode():
                    t = {k: torch.from_numpy(v) for k, v in trim_padding(self._inputs(rows)).items()}
                    per_layer = model.layer_states(**t)
                    out = model.forward_from(layers - 1, per_layer[-1], t["attention_mask"])
                for layer, hidden in enumerate(per_layer):
                    for i, r in enumerate(rows):
                        states[layer][r] = hidden[i, :self._real[r]].numpy().copy()
                for o, got in zip(outputs, (out.start_logits, out.end_logits) if qa else (out.logits,)):
                    o[rows, :got.shape[1]] = got.numpy()
            self._prefix_cache = (states, tuple(outputs))
        return self._prefix_cache

    def gap(self, cfg: Config) -> dict:
        """`cfg`'s score minus full length's on this split, and the paired standard error of that difference
        (None where a cache from before per-question scores holds either)."""
        diff = score_of(self(cfg)) - score_of(self(None))
        a, b = self.scores.get(tuple(cfg)), self.scores.get(())
        se = None if a is None or b is None else float(np.std(a - b, ddof=1) / np.sqrt(len(a)))
        return {"gap": diff, "se": se}


def resolve_engine(engine: str, device: torch.device) -> str:
    """`auto`: ONNX Runtime on CPU (2.2-2.9x faster than eager PyTorch here), PyTorch on CUDA."""
    if engine not in ("auto", "ort", "torch"):
        raise ToolchainError(f"unknown engine {engine!r}; choose auto, ort or torch")
    if engine == "ort" and device.type != "cpu":
        raise ToolchainError("--engine ort scores on the CPU; use --device cpu (or --engine torch on CUDA)")
    return engine if engine != "auto" else ("ort" if device.type == "cpu" else "torch")


def score_of(metrics: dict) -> float:
    return metrics["f1"] if "f1" in metrics else metrics["accuracy"]


def search(*, model_dir: Path, eval_path: Path, out_dir: Path, search_examples: int, report_examples: int,
           cfg: SearchConfig, device_name: str, choose_tolerance: float = 1.0, batch_size: int = 64,
           resume: bool = False, force: bool = False, target_macs_ratio: float | None = None,
           max_seq_length: int | None = None, engine: str = "auto", select_examples: int = 0,
           select_top: int = 5) -> dict:
    """Run the evolutionary search; write pareto.json, pareto.png and the evaluation caches into `out_dir`.

    Work happens in a hidden `.NAME.partial` folder beside `out_dir` (the resumable caches of every split), renamed
    to `out_dir` when the search is complete. `max_seq_length` (default: the checkpoint's) is the
    sequence length the configurations are searched, costed and later exported at. `engine` scores
    candidates with PyTorch or with ONNX Runtime graphs (see `resolve_engine`). With `select_examples`
    (and a MAC target), the `select_top` best candidates at the target are re-scored on that many
    further dev examples and the choice is made on both splits (see `select`).
    """
    cfg.validate()
    if search_examples <= 0 or report_examples <= 0:
        raise ToolchainError("search and report splits need a positive number of examples")
    if select_examples < 0 or select_top <= 0:
        raise ToolchainError(f"select-examples must be >= 0 and select-top >= 1, got {select_examples} and {select_top}")
    if select_examples and target_macs_ratio is None:
        raise ToolchainError("a selection split (--select-examples) needs --target-macs-ratio")
    partial = check_output(out_dir, force, resume)
    device = resolve_device(device_name)
    engine = resolve_engine(engine, device)
    model, tokenizer, meta = load_length_adaptive(model_dir, require_lat=True, protect_answers=cfg.protect_answers)
    model.to(device).eval()
    task, layers = meta["task"], model.num_layers
    seq = check_seq_length(model.config, max_seq_length or meta["max_seq_length"])
    head = "qa" if task == "squad" else "classify"
    num_labels = len(meta["labels"] or [None, None])

    search_split, report_split, *select_split = _splits(eval_path, tokenizer, meta, seq,
                                                        [search_examples, report_examples, select_examples])
    partial.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(model, task, search_split, device, partial / "search-cache.jsonl", batch_size, engine)
    real_lengths = _real_lengths(task, search_split)

    @functools.cache
    def macs_of(c: Config | None) -> int:
        if cfg.cost == "real":
            return round(expected_macs(model.config, c, real_lengths, head, num_labels))
        return count_macs(model.config, c, seq, head, num_labels)

    full_macs = macs_of(None)
    rng = random.Random(cfg.seed)

    def in_bounds(c: Config) -> bool:
        return cfg.min_macs_ratio <= macs_of(c) / full_macs <= cfg.max_macs_ratio

    population: list[Config] = []
    for _ in range(1000 * cfg.population):
        if len(population) == cfg.population:
            break
        c = sample_length_config(layers, seq, cfg.length_drop_ratio_bound, rng)
        if in_bounds(c) and c not in population:
            population.append(c)
    if not population:
        raise ToolchainError(f"MAC bounds [{cfg.min_macs_ratio}, {cfg.max_macs_ratio}] admit no configuration "
                             f"reachable with length-drop-ratio-bound {cfg.length_drop_ratio_bound}")

    t0 = time.time()
    # only configurations this run has reached count, so a resumed run retraces the same path
    points: dict[Config, tuple[int, float]] = {}

    def evaluate(configs: list[Config]) -> None:
        for c in tqdm(configs, desc="candidates", unit="cfg", leave=False, dynamic_ncols=True):
            points[c] = (macs_of(c), score_of(scorer(c)))

    evaluate(population)
    for _ in tqdm(range(cfg.iterations), desc="search", unit="iter", dynamic_ncols=True):
        parents = _ranked(points)[:cfg.parents]  # elitist: the best of everything evaluated so far
        children: list[Config] = []
        for _ in range(20 * (cfg.mutations + cfg.crossovers)):
            if len(children) == cfg.mutations + cfg.crossovers:
                break
            if len(children) < cfg.mutations:
                child = mutate(rng.choice(parents), cfg.mutation_prob, rng, seq)
            else:
                child = crossover(rng.choice(parents), rng.choice(parents), rng)
            if in_bounds(child) and child not in children and child not in points:
                children.append(child)
        evaluate(children)
    scorer.release()  # the search split's scores from here on are cached, or at full length (no states needed)
    front = pareto_front(points)

    full_search = scorer(None)
    reporter = Scorer(model, task, report_split, device, partial / "report-cache.jsonl", batch_size, engine)
    full_report = reporter(None)

    def entry(c: Config, **scores: dict) -> dict:
        return {"length_config": list(c), "macs": points[c][0], "macs_ratio": points[c][0] / full_macs,
                "search": scorer(c), **scores}

    frontier = [entry(c, report=reporter(c), report_gap=reporter.gap(c))
                for c in tqdm(front, desc="report split", leave=False)]
    selection = None
    if select_split:
        selector = Scorer(model, task, select_split[0], device, partial / "select-cache.jsonl", batch_size, engine)
        at_target = sorted((c for c in points if points[c][0] / full_macs <= target_macs_ratio),
                           key=lambda c: -points[c][1])[:select_top]  # the most accurate on the search split
        candidates = [entry(c, select=selector(c)) for c in tqdm(at_target, desc="selection split", leave=False)]
        chosen = select(candidates)
        if chosen is not None:
            chosen = {**chosen, "report": reporter(tuple(chosen["length_config"])),
                      "report_gap": reporter.gap(tuple(chosen["length_config"]))}
        selection = {"examples": select_examples, "top": select_top, "full": selector(None), "candidates": candidates}
    else:
        chosen = choose(frontier, score_of(full_search), choose_tolerance, target_macs_ratio)
    result = {
        "model": str(model_dir), "task": task, "max_seq_length": seq, "metric": "f1" if task == "squad" else "accuracy",
        "cost": cfg.cost, "protect_answers": model.protect_answers,
        "full": {"length_config": None, "macs": full_macs, "search": full_search, "report": full_report},
        "frontier": frontier, "chosen": chosen, "selection": selection, "evaluated": len(points),
        "splits": {"data": str(eval_path), "search_examples": search_examples, "report_examples": report_examples,
                   "select_examples": select_examples,
                   "how": "seeded permutation of the dev set; search = first part, report = the next, selection = "
                          "the next; disjoint"},
        "search_config": asdict(cfg), "engine": engine, "seconds": round(time.time() - t0, 1),
    }
    (partial / "pareto.json").write_text(json.dumps(result, indent=2))
    plot_pareto(result, points, partial / "pareto.png")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return result


def choose(frontier: list[dict], full_score: float, tolerance: float = 1.0,
           target_macs_ratio: float | None = None) -> dict | None:
    """The configuration to deploy, judged on the *search* split.

    With a MAC target: the most accurate frontier point at or below that share of full-length MACs.
    Otherwise: the cheapest frontier point within `tolerance` points of full length.
    """
    if target_macs_ratio is not None:
        ok = [p for p in frontier if p["macs_ratio"] <= target_macs_ratio]
        return max(ok, key=lambda p: score_of(p["search"])) if ok else None
    ok = [p for p in frontier if score_of(p["search"]) >= full_score - tolerance]
    return min(ok, key=lambda p: p["macs"]) if ok else None


def pooled_score(*metrics: dict) -> float:
    """The score over the union of several splits' examples (each split's score weighted by its size)."""
    sizes = [m.get("questions", m.get("examples")) for m in metrics]
    return sum(score_of(m) * n for m, n in zip(metrics, sizes)) / sum(sizes)


def select(candidates: list[dict]) -> dict | None:
    """The candidate most accurate on its search and selection splits together."""
    return max(candidates, key=lambda p: pooled_score(p["search"], p["select"]), default=None)


def _real_lengths(task: str, split) -> np.ndarray:
    """Real (unpadded) token count of every input of a split."""
    return (split[1].attention_mask if task == "squad" else split["attention_mask"]).sum(1)


def _splits(eval_path: Path, tokenizer, meta: dict, seq: int, counts: list[int]) -> list:
    """Disjoint splits of one seeded permutation of the dev set: consecutive runs of `counts` examples (0: none)."""
    return [dev_split(eval_path, tokenizer, meta, seq, n, sum(counts[:i])) for i, n in enumerate(counts) if n]


def dev_split(eval_path: Path, tokenizer, meta: dict, seq: int, n: int | None, skip: int = 0):
    """`n` examples of the dev set's seeded permutation after the first `skip`, in the form a `Scorer` takes."""
    if meta["task"] == "squad":
        return prepare.squad_split(eval_path, tokenizer, seq, meta.get("doc_stride", 128), n, skip=skip)
    return prepare.classify_split(eval_path, tokenizer, seq, meta["labels"], prepare.Columns.from_meta(meta), n,
                                  skip=skip)[1]


def plot_pareto(result: dict, evaluated: dict[Config, tuple[int, float]], path: Path) -> None:
    """Accuracy vs GMACs: every evaluated configuration, the frontier, and full length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if evaluated:
        macs, scores = zip(*evaluated.values())
        ax.scatter(np.array(macs) / 1e9, scores, s=8, c="lightgray", label="evaluated (search split)")
    front = result["frontier"]
    ax.plot([p["macs"] / 1e9 for p in front], [score_of(p["search"]) for p in front], "o-", label="frontier (search)")
    ax.plot([p["macs"] / 1e9 for p in front], [score_of(p["report"]) for p in front], "s--", label="frontier (report)")
    full = result["full"]
    ax.plot(full["macs"] / 1e9, score_of(full["search"]), "*", c="C0", ms=12, label="full length (search)")
    ax.plot(full["macs"] / 1e9, score_of(full["report"]), "*", c="C1", ms=12, label="full length (report)")
    ax.axhline(score_of(full["report"]) - 1.0, c="C1", lw=0.8, ls=":", label="full length - 1 (report)")
    if result["chosen"]:
        chosen, se = result["chosen"], (result["chosen"].get("report_gap") or {}).get("se")
        ax.errorbar(chosen["macs"] / 1e9, score_of(chosen["report"]), yerr=se, fmt="kx", ms=10, capsize=3,
                    label="chosen" + ("" if se is None else " (paired s.e. of its gap, report)"))
    ax.set_xlabel("GMACs (batch 1" + (", mean over the real lengths)" if result.get("cost") == "real" else ")"))
    ax.set_ylabel(metric.upper() if metric == "f1" else "accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
