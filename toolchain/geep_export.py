"""`toolchain export-geep`: a GEEP checkpoint as a deployable bundle, served by `runtime.GeepPredictor`.

The bundle holds one ONNX graph per exit depth (the encoder truncated there plus the shared classifier), each
checked against PyTorch on dev rows, and the exit-predictor graph of the exit table fit at one `speed` exactly as
`bench-geep` fits it (`ExitProfile.fit_table`: the training samples' FastBERT exits at that entropy threshold; with
aggregation `auto` the aggregation and shift are tuned, on a labelled tune split or else a held-out fifth of the
training samples, by default for the fewest layers at an accuracy within `tolerance` of full depth). Layout and manifest: graphs/README.md.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
from transformers import PretrainedConfig

from toolchain.bundle import write_bundle
from toolchain.errors import ToolchainError
from toolchain.exit_batching import INPUT_NAMES, bucketed_predict, ort_depth_runner, ort_exit_predictor
from toolchain.exit_predictor import exit_accuracy, export_predictor_onnx
from toolchain.export import OPSET, check_parity, parity_cases
from toolchain.geep import TruncatedGeep, accuracy_by_depth, check_speed
from toolchain.geep_runtime import check_aggregation, check_tuning, export_depth_graphs, ort_session, profile_exits
from toolchain.macs import count_macs

PREDICTOR = "geep-predictor"
BATCH = 64  # rows per graph run when scoring the exported graphs on the dev split


def depth_macs(config: PretrainedConfig, depth: int, seq: int, num_labels: int) -> int:
    """MACs at batch 1 of the encoder cut after `depth` layers plus a classification head, at `seq` tokens."""
    truncated = copy.deepcopy(config)
    truncated.num_hidden_layers = depth
    return count_macs(truncated, None, seq, "classify", num_labels)


def export_geep_bundle(checkpoint_dir: str | Path, train_path: str | Path, eval_path: str | Path,
                       out_dir: str | Path, speed: float, max_train_examples: int | None = None,
                       max_eval_examples: int | None = None, aggregation: str = "auto", tune_for: str = "accuracy",
                       tolerance: float = 1.0, tune_path: str | Path | None = None, force: bool = False) -> Path:
    """Write the bundle of a `train-geep` checkpoint at `out_dir` (replacing an existing one only with `force`).

    Nothing is written unless every depth graph matches PyTorch (max |logit difference| <= 1e-4, same labels)
    and the predictor graph reproduces the exit table's predictions on the dev split. Tuned on the eval data itself
    (`tune_path` = `eval_path`), the manifest's pipeline accuracy is measured on the rows it was tuned on.
    """
    speed = check_speed(speed)
    check_aggregation(aggregation)
    check_tuning(tune_for, tolerance)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.exists() and not force:
        raise ToolchainError(f"output {out_dir} already exists (use --force to replace it)")
    tune_path = Path(tune_path) if tune_path is not None and aggregation == "auto" else None
    profile = profile_exits(checkpoint_dir, train_path, eval_path, max_train_examples, max_eval_examples,
                            tune_path=tune_path)
    model, seq, dev = profile.model, profile.seq, profile.dev
    inputs = {k: dev[k] for k in INPUT_NAMES}
    table, tuned = profile.fit_table(speed, aggregation, tune_for, tolerance)
    accuracy = accuracy_by_depth(profile.dev_teacher, dev["labels"])
    scored = {"examples": len(dev["labels"]), "data": str(eval_path)}
    common = {"length_config": None, "max_seq_length": seq, "precision": "fp32", "format": "fp32", "ep": "cpu",
              "opset": OPSET, "latency_ms": {}, "optimization": {"method": "none"}}

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.stage-",
                                     dir=out_dir.parent if out_dir.parent.is_dir() else None) as tmp:
        stage = Path(tmp)
        paths = export_depth_graphs(model, stage)
        entries, files = [], {"config.json": checkpoint_dir / "config.json",
                              "toolchain.json": checkpoint_dir / "toolchain.json"}
        for depth, path in paths.items():
            try:
                parity = check_parity(ort_session(path), parity_cases(TruncatedGeep(model, depth), inputs))
            except ToolchainError as e:
                raise ToolchainError(f"graph {path.stem}: {e}") from None
            files[path.name] = path
            entries.append({"name": path.stem, "file": path.name, "kind": "geep-exit", "depth": depth, **common,
                            "macs": depth_macs(model.config, depth, seq, model.num_labels), "inputs": list(INPUT_NAMES),
                            "outputs": ["logits"], "metrics": {"accuracy": accuracy[depth - 1], **scored},
                            "parity": parity})

        predictor = export_predictor_onnx(table, stage / f"{PREDICTOR}.onnx")
        logits, exits = bucketed_predict(inputs, ort_exit_predictor(ort_session(predictor)),
                                         ort_depth_runner({d: ort_session(p) for d, p in paths.items()}), BATCH)
        want = table.predict(inputs["input_ids"], inputs["attention_mask"])
        if not np.array_equal(exits, want):
            raise ToolchainError(f"the exit predictor graph disagrees with its table on {int((exits != want).sum())} "
                                 f"of {len(want)} dev rows")
        files[predictor.name] = predictor
        entries.append({
            "name": PREDICTOR, "file": predictor.name, "kind": "geep-predictor", **common, "macs": 0,
            "inputs": ["input_ids", "attention_mask"], "outputs": ["exit_layer"],
            "speed": speed, "aggregation": table.aggregation, "shift": table.shift, "tuned": tuned,
            "tune_data": tune_path and str(tune_path),
            "vocab_size": table.vocab_size, "num_layers": table.num_layers, "train_examples": len(profile.train["labels"]),
            "metrics": {**exit_accuracy(exits, profile.dev_exits(speed)), "mean_exit": round(float(exits.mean()), 3),
                        "accuracy": round(100.0 * float((logits.argmax(-1) == dev["labels"]).mean()), 2), **scored},
            "parity": {"matches_table": True, "rows": len(want)},
        })
        profile.tokenizer.save_pretrained(stage / "tokenizer")
        files.update({p.name: p for p in (stage / "tokenizer").iterdir()})
        return write_bundle(out_dir, entries, files, force, task="classify", source_checkpoint=checkpoint_dir.resolve())
