"""GEEP inference measured: exit-sorted batching (`exit_batching`) against its baselines, on PyTorch or ONNX Runtime.

Depth runners for a PyTorch `GeepModel` (`torch_depth_runner`) or for the graphs of `export_depth_graphs` (one ONNX
Runtime session per depth, `exit_batching.ort_depth_runner`). Baselines: the full-depth model, and FastBERT's layer-by-layer
dynamic exit with a shrinking batch. `bench_geep` scores and times all three on a dev set. `profile_exits` (an
`ExitProfile`: checkpoint, splits, students' and shared classifier's logits) is where both `sweep_geep` and
`export-geep` fit exit tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.evaluate import trim_padding
from toolchain.exit_batching import (INPUT_NAMES, DepthRunner, ExitPredictor, Inputs, bucketed_predict, check_batch_size,
                                     full_depth_predict, model_inputs, ort_depth_runner, ort_exit_predictor)
from toolchain.files import write_json
from toolchain.exit_predictor import ExitTable, exit_accuracy, export_predictor_onnx, parse_aggregation
from toolchain.geep import GeepModel, TruncatedGeep, check_speed, depth_logits, exit_layers, load_geep, normalized_entropy
from toolchain.sessions import ort_session as _ort_session
from toolchain.training import resolve_device, to_device

TUNE_FOR = ("accuracy", "exits")  # what an 'auto' exit aggregation is tuned for
T = TypeVar("T")


class LayerStepper:
    """Layer-by-layer execution for FastBERT-style exit: `embed(inputs) -> (hidden, mask)` and
    `step(i, hidden, mask) -> (hidden, logits of layer i's student, or the teacher after the last layer)`."""

    def __init__(self, model: GeepModel, device: torch.device | str = "cpu") -> None:
        self.model, self.device = model.to(device).eval(), torch.device(device)
        self.num_layers, self.num_labels = model.num_layers, model.num_labels

    def embed(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        batch = to_device(inputs, self.device)
        hidden = self.model.embed(batch["input_ids"], batch.get("token_type_ids"))
        return hidden, self.model.extended_mask(batch["attention_mask"], hidden.dtype)

    def step(self, i: int, hidden, mask):
        hidden = self.model.run_layer(i, hidden, mask)
        head = self.model.teacher if i == self.num_layers - 1 else self.model.students[i]
        return hidden, head(hidden, mask[:, 0, 0] == 0).float().cpu().numpy()

    @staticmethod
    def select(x, keep: np.ndarray):
        return x[torch.from_numpy(keep).to(x.device)]


class _EmbedGraph(nn.Module):
    def __init__(self, model: GeepModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.model.embed(input_ids, token_type_ids)
        return hidden, self.model.extended_mask(attention_mask, hidden.dtype)


class _LayerGraph(nn.Module):
    def __init__(self, model: GeepModel, i: int) -> None:
        super().__init__()
        self.model, self.i = model, i

    def forward(self, hidden, mask):
        hidden = self.model.run_layer(self.i, hidden, mask)
        head = self.model.teacher if self.i == self.model.num_layers - 1 else self.model.students[self.i]
        return hidden, head(hidden, mask[:, 0, 0] == 0)


class OrtLayerStepper(LayerStepper):
    """The same steps on ONNX Runtime: an embedding graph and one graph per layer (+ its student head)."""

    def __init__(self, model: GeepModel, out_dir: Path, device: torch.device | str = "cpu") -> None:
        model = model.cpu().eval()
        self.num_layers, self.num_labels = model.num_layers, model.num_labels
        sample = tuple(torch.ones(2, 8, dtype=torch.long) for _ in range(2)) + (torch.zeros(2, 8, dtype=torch.long),)
        seq_axes = {0: "batch", 1: "sequence"}
        path = Path(out_dir) / "fastbert-embed.onnx"
        torch.onnx.export(_EmbedGraph(model).eval(), sample, str(path), dynamo=False, opset_version=17,
                          input_names=list(INPUT_NAMES), output_names=["hidden", "mask"],
                          dynamic_axes={**{n: seq_axes for n in INPUT_NAMES}, "hidden": seq_axes,
                                        "mask": {0: "batch", 3: "sequence"}})
        self.embed_session = ort_session(path, device)
        hidden, mask = _EmbedGraph(model)(*sample)
        self.layer_sessions = []
        for i in range(self.num_layers):
            path = Path(out_dir) / f"fastbert-layer{i + 1}.onnx"
            torch.onnx.export(_LayerGraph(model, i).eval(), (hidden, mask), str(path), dynamo=False, opset_version=17,
                              input_names=["hidden", "mask"], output_names=["hidden_out", "logits"],
                              dynamic_axes={"hidden": seq_axes, "mask": {0: "batch", 3: "sequence"},
                                            "hidden_out": seq_axes, "logits": {0: "batch"}})
            self.layer_sessions.append(ort_session(path, device))

    def embed(self, inputs: Inputs):
        return tuple(self.embed_session.run(None, {k: inputs[k] for k in INPUT_NAMES if k in inputs}))

    def step(self, i: int, hidden, mask):
        return tuple(self.layer_sessions[i].run(None, {"hidden": hidden, "mask": mask}))

    @staticmethod
    def select(x, keep: np.ndarray):
        return x[keep]


def fastbert_predict(stepper: LayerStepper, inputs: Inputs, speed: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: FastBERT's dynamic exit with a shrinking batch; (logits [N, C], exit depths [N]).

    Layer by layer, student i classifies the batch; samples whose normalized entropy is below `speed`
    leave with student i's logits, the rest continue. Samples reaching the last layer get the teacher's.
    Batches are formed from requests of similar length, as in `bucketed_predict`.
    """
    check_speed(speed)
    check_batch_size(batch_size)
    inputs = model_inputs(inputs)
    n, last = len(inputs["input_ids"]), stepper.num_layers - 1
    logits = np.zeros((n, stepper.num_labels), dtype=np.float32)
    depths = np.zeros(n, dtype=np.int64)
    order = np.argsort(-inputs["attention_mask"].sum(1), kind="stable")
    with torch.inference_mode():
        for b in range(0, n, batch_size):
            rows = order[b:b + batch_size]
            hidden, mask = stepper.embed(trim_padding({k: v[rows] for k, v in inputs.items()}))
            for i in range(stepper.num_layers):
                hidden, out = stepper.step(i, hidden, mask)
                done = np.ones(len(rows), bool) if i == last else normalized_entropy(out) < speed
                logits[rows[done]], depths[rows[done]] = out[done], i + 1
                if done.all():
                    break
                keep = ~done
                hidden, mask, rows = stepper.select(hidden, keep), stepper.select(mask, keep), rows[keep]
    return logits, depths


def torch_depth_runner(model: GeepModel, device: torch.device | str = "cpu") -> DepthRunner:
    """Run the PyTorch model truncated at the asked depth."""
    device = torch.device(device)
    model.to(device).eval()

    def run(depth: int, inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            return model(**to_device(inputs, device), depth=depth).float().cpu().numpy()

    return run


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
    return _ort_session(Path(path), ep=torch.device(device).type)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _scores(logits: np.ndarray, depths: np.ndarray, labels: np.ndarray, seconds: float) -> dict:
    return {"accuracy": round(100.0 * float((logits.argmax(-1) == labels).mean()), 2),
            "mean_depth": round(float(depths.mean()), 3), "seconds": round(seconds, 4),
            "examples_per_second": round(len(labels) / max(seconds, 1e-9), 1)}


def _fit_table(train: Inputs, exits: np.ndarray, num_layers: int, vocab: int, specials: list[int], aggregation: str,
               target: np.ndarray, tolerance: float = 1.0, tune: tuple[Inputs, np.ndarray] | None = None,
               tune_fraction: float = 0.2) -> tuple[ExitTable, dict | None]:
    """Fit the exit table on the training samples' exit labels; with aggregation 'auto', tune (aggregation, shift)
    first: for accuracy within `tolerance` of full depth where the tuning target is per-depth correctness
    [N, L], for agreement where it is exit labels [N]. Tuned on `tune` (inputs, target) when given, else on a
    held-out part of the training samples (`target` is theirs), which the table being tuned does not see."""
    ids, mask = train["input_ids"], train["attention_mask"]
    table = ExitTable(vocab, num_layers)
    if aggregation != "auto":
        table.set_aggregation(aggregation, 0.0)
        return table.fit(ids, mask, exits, specials), None
    if tune is None:
        held_out = max(1, int(round(len(ids) * tune_fraction)))
        if held_out >= len(ids):
            raise ToolchainError("need at least 2 training examples to tune the exit aggregation")
        order = np.random.default_rng(0).permutation(len(ids))
        fit, rows = order[held_out:], order[:held_out]
        table.fit(ids[fit], mask[fit], exits[fit], specials)
        tune = ({"input_ids": ids[rows], "attention_mask": mask[rows]}, target[rows])
    else:
        table.fit(ids, mask, exits, specials)
    feed, want = tune
    tuned = (table.tune_accuracy(feed["input_ids"], feed["attention_mask"], want, tolerance) if want.ndim == 2
             else table.tune(feed["input_ids"], feed["attention_mask"], want))
    table = ExitTable(vocab, num_layers)
    table.set_aggregation(tuned["aggregation"], tuned["shift"])
    return table.fit(ids, mask, exits, specials), tuned


def check_aggregation(aggregation: str) -> str:
    """'auto' (tune on held-out training samples) or an `ExitTable` aggregation."""
    if aggregation != "auto":
        parse_aggregation(aggregation)
    return aggregation


def check_tuning(tune_for: str, tolerance: float) -> None:
    """What 'auto' aggregation tunes for: 'accuracy' (within `tolerance` points of full depth) or 'exits'."""
    if tune_for not in TUNE_FOR:
        raise ToolchainError(f"unknown tuning target {tune_for!r}; choose {' or '.join(TUNE_FOR)}")
    if not tolerance >= 0:
        raise ToolchainError(f"tolerance must be >= 0 accuracy points, got {tolerance}")


def _same_file(a: Path | str, b: Path | str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass(frozen=True)
class ExitProfile:
    """A GEEP checkpoint, its tokenized train/dev splits (with labels), the students' logits at every depth on
    both and the shared classifier's ([L, N, C]): what exit labels, exit tables, their tuning, their dev exit
    accuracy and the per-depth dev accuracy are built from. `tune` (with its logits) is the labelled split an
    'auto' exit aggregation is tuned on, when there is one (it may be the dev split itself)."""

    model: GeepModel
    tokenizer: object
    meta: dict
    seq: int
    train: Inputs
    dev: Inputs
    train_students: np.ndarray
    train_teacher: np.ndarray
    dev_students: np.ndarray
    dev_teacher: np.ndarray
    tune: Inputs | None = None
    tune_students: np.ndarray | None = None
    tune_teacher: np.ndarray | None = None

    def fit_table(self, speed: float, aggregation: str, tune_for: str = "accuracy", tolerance: float = 1.0,
                  tune_rows: np.ndarray | None = None) -> tuple[ExitTable, dict | None]:
        """The exit table fit on the training samples' FastBERT exits at `speed` (and the tuning result for 'auto':
        for the shared classifier's accuracy within `tolerance` of full depth, or for agreement with the exits),
        tuned on the tune split (its rows `tune_rows`, default all) or, without one, on a held-out fifth of the
        training samples."""
        check_tuning(tune_for, tolerance)

        def target(split: Inputs, students: np.ndarray, teacher: np.ndarray) -> np.ndarray:
            if tune_for == "accuracy":  # [N, L]: is the shared classifier right at depth k
                return (teacher.argmax(-1) == split["labels"][None]).T
            return exit_layers(students, speed)

        tune = None
        if self.tune is not None:
            rows = np.arange(len(self.tune["labels"])) if tune_rows is None else tune_rows
            tune = ({k: self.tune[k][rows] for k in ("input_ids", "attention_mask")},
                    target(self.tune, self.tune_students, self.tune_teacher)[rows])
        return _fit_table(self.train, exit_layers(self.train_students, speed), self.model.num_layers,
                          len(self.tokenizer), self.tokenizer.all_special_ids, aggregation,
                          target(self.train, self.train_students, self.train_teacher), tolerance, tune)

    def dev_exits(self, speed: float) -> np.ndarray:
        """The dev samples' FastBERT exits at `speed`: what the predictor's exit accuracy is scored against."""
        return exit_layers(self.dev_students, speed)


def profile_exits(checkpoint_dir: Path, train_path: Path, eval_path: Path, max_train_examples: int | None,
                  max_eval_examples: int | None, device: torch.device | str = "cpu",
                  tune_path: Path | None = None) -> ExitProfile:
    """Load a GEEP checkpoint, tokenize the splits at its max_seq_length and run its students on them. A tune split
    (`tune_path`, labelled, held out from training) may be the dev split itself; it may not be the train data."""
    if tune_path is not None and _same_file(tune_path, train_path):
        raise ToolchainError(f"tune data {tune_path} is the training data; tune on a labelled split held out from it")
    model, tokenizer, meta = load_geep(checkpoint_dir)
    columns = prepare.Columns.from_meta(meta)
    seq = meta.get("max_seq_length", 128)

    def split(path: Path, limit: int | None) -> tuple[Inputs, np.ndarray, np.ndarray]:
        _, inputs = prepare.classify_split(path, tokenizer, seq, meta["labels"], columns, limit)
        return (inputs, *depth_logits(model, inputs, 64, device))

    train, train_teacher, train_students = split(train_path, max_train_examples)
    dev, dev_teacher, dev_students = split(eval_path, max_eval_examples)
    tune = None, None, None
    if tune_path is not None:
        tune = (dev, dev_teacher, dev_students) if _same_file(tune_path, eval_path) else split(tune_path, None)
    return ExitProfile(model, tokenizer, meta, seq, train, dev, train_students, train_teacher, dev_students, dev_teacher,
                       tune[0], tune[2], tune[1])


def _folds(n: int, crossfit: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(dev rows it predicts, tune rows) of each exit table: one table for every row, or two (cross-fitting, when
    the tune split is the dev split), each tuned on the other half of the dev rows."""
    if not crossfit:
        return [(np.arange(n), None)]
    if n < 2:
        raise ToolchainError("tuning on the eval data cross-fits two halves of it: need at least 2 eval examples")
    order = np.random.default_rng(0).permutation(n)
    first, second = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    return [(first, second), (second, first)]


def _folded_predictor(folds: list[tuple[np.ndarray, np.ndarray | None]], predictors: list[ExitPredictor]) -> ExitPredictor:
    """One exit predictor over all dev rows, each row's exit from the table of its fold."""
    if len(predictors) == 1:
        return predictors[0]

    def predict(inputs: Inputs) -> np.ndarray:
        depths = np.empty(len(inputs["input_ids"]), dtype=np.int64)
        for (rows, _), predictor in zip(folds, predictors):
            depths[rows] = predictor({k: v[rows] for k, v in inputs.items()})
        return depths

    return predict


def _median_time(fn: Callable[[], T], repeats: int = 3) -> tuple[T, float]:
    """(result, median seconds) over `repeats` runs after one warm-up run."""
    out = fn()
    times = []
    for _ in range(repeats):
        out, seconds = _timed(fn)
        times.append(seconds)
    return out, float(np.median(times))


def sweep_geep(*, checkpoint_dir: Path, train_path: Path, eval_path: Path, speeds: list[float], batches: list[int],
               out_dir: Path, max_train_examples: int | None = None, max_eval_examples: int | None = None,
               aggregation: str = "auto", tune_for: str = "accuracy", tolerance: float = 1.0,
               tune_path: Path | None = None, backend: str = "ort", device_name: str = "cpu", repeats: int = 3) -> dict:
    """Accuracy and throughput of full depth, GEEP and FastBERT-style exit for every (speed, batch size).

    Exit labels are the students' FastBERT exits at each speed (train: for the table; dev: to report
    the predictor's exit accuracy); an 'auto' aggregation is tuned for `tune_for` (see `ExitProfile.fit_table`) on
    `tune_path`, or without one on a held-out fifth of the training samples. Tuning on the eval data itself
    cross-fits: each half of the dev rows is predicted by a table tuned on the other half. All three methods run on
    the same backend (per-depth graphs for full/GEEP, per-layer graphs for FastBERT on ORT), padding trimmed per
    batch. Writes results.json,
    accuracy-vs-throughput.png, the exit tables and the graphs into `out_dir`.
    """
    for speed in speeds:
        check_speed(speed)
    for b in batches:
        check_batch_size(b)
    if backend not in ("torch", "ort"):
        raise ToolchainError(f"unknown backend {backend!r}; choose torch or ort")
    check_aggregation(aggregation)
    check_tuning(tune_for, tolerance)
    device = resolve_device(device_name)
    tune_path = tune_path if aggregation == "auto" else None
    profile = profile_exits(checkpoint_dir, train_path, eval_path, max_train_examples, max_eval_examples, device,
                            tune_path)
    model, dev = profile.model, profile.dev
    crossfit = tune_path is not None and _same_file(tune_path, eval_path)
    folds = _folds(len(dev["labels"]), crossfit)
    tuning = None if aggregation != "auto" else (
        "held-out fifth of the training samples" if tune_path is None
        else f"2-fold cross-fit on {eval_path}" if crossfit else str(tune_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L, labels = model.num_layers, dev["labels"]
    if backend == "ort":
        run_at_depth = ort_depth_runner({d: ort_session(p, device) for d, p in export_depth_graphs(model, out_dir).items()})
        stepper = OrtLayerStepper(model, out_dir, device)
    else:
        run_at_depth, stepper = torch_depth_runner(model, device), LayerStepper(model, device)
    inputs = {k: v for k, v in dev.items() if k != "labels"}
    rows = []
    for batch in batches:
        logits, t = _median_time(lambda: full_depth_predict(inputs, run_at_depth, L, batch), repeats)
        rows.append({"method": "full", "speed": None, "batch": batch, **_scores(logits, np.full(len(labels), L), labels, t)})
    for speed in speeds:
        tables, predictors = [], []
        for i, (_, tune_rows) in enumerate(folds, start=1):
            table, tuned = profile.fit_table(speed, aggregation, tune_for, tolerance, tune_rows)
            name = f"speed{speed}" + (f"-fold{i}" if crossfit else "")
            table.save(out_dir / f"exit_table-{name}.npz")
            graph = export_predictor_onnx(table, out_dir / f"exit_predictor-{name}.onnx")
            predictors.append(ort_exit_predictor(ort_session(graph)))
            tables.append({"aggregation": table.aggregation, "shift": table.shift, "tuned": tuned})
        predictor = _folded_predictor(folds, predictors)
        dev_exits = profile.dev_exits(speed)
        for batch in batches:
            (g_logits, g_depths), t = _median_time(lambda: bucketed_predict(inputs, predictor, run_at_depth, batch), repeats)
            rows.append({"method": "geep", "speed": speed, "batch": batch, **_scores(g_logits, g_depths, labels, t),
                         "exit_accuracy": exit_accuracy(g_depths, dev_exits),
                         "exit_tables": tables, "tuning": tuning})
            (f_logits, f_depths), t = _median_time(lambda: fastbert_predict(stepper, inputs, speed, batch), repeats)
            rows.append({"method": "fastbert", "speed": speed, "batch": batch, **_scores(f_logits, f_depths, labels, t)})
    report = {"checkpoint": str(checkpoint_dir), "backend": backend, "device": device.type, "num_layers": L,
              "examples": len(labels), "eval_data": str(eval_path), "rows": rows, "summary": _summary(rows)}
    write_json(out_dir / "results.json", report)
    _plot(rows, out_dir / "accuracy-vs-throughput.png")
    return report


def _summary(rows: list[dict], tolerance: float = 1.0) -> dict:
    """Per batch size: the fastest GEEP and FastBERT points within `tolerance` accuracy points of full depth."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        full = next(r for r in rows if r["method"] == "full" and r["batch"] == batch)

        def best(method: str) -> dict | None:
            ok = [r for r in rows if r["method"] == method and r["batch"] == batch
                  and r["accuracy"] >= full["accuracy"] - tolerance]
            return max(ok, key=lambda r: r["examples_per_second"]) if ok else None

        geep, fast = best("geep"), best("fastbert")
        out[f"batch{batch}"] = {
            "full": {k: full[k] for k in ("accuracy", "examples_per_second")},
            "geep": geep and {k: geep[k] for k in ("speed", "accuracy", "mean_depth", "examples_per_second", "exit_accuracy")},
            "fastbert": fast and {k: fast[k] for k in ("speed", "accuracy", "mean_depth", "examples_per_second")},
            "geep_vs_full": geep and round(geep["examples_per_second"] / full["examples_per_second"], 2),
            "geep_vs_fastbert": geep and fast and round(geep["examples_per_second"] / fast["examples_per_second"], 2),
        }
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        full = next(r for r in rows if r["method"] == "full" and r["batch"] == batch)
        ax.axhline(full["accuracy"] - 1.0, c="r", lw=0.8, ls=":", label="full depth - 1")
        for method, style in (("full", "r*"), ("geep", "o"), ("fastbert", "s")):
            pts = [r for r in rows if r["method"] == method and r["batch"] == batch]
            ax.plot([r["examples_per_second"] for r in pts], [r["accuracy"] for r in pts], style, label=method,
                    ms=10 if method == "full" else 5)
            for r in pts if method != "full" else []:  # each point labelled with its speed
                ax.annotate(f"{r['speed']:g}", (r["examples_per_second"], r["accuracy"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("examples / s")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
