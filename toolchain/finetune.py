"""`toolchain finetune`: fine-tune a base encoder for extractive QA (SQuAD) or classification."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.evaluate import evaluate_classify, evaluate_squad, torch_runner
from toolchain.lat import LengthConfig
from toolchain.models import check_seq_length, check_task, default_model_dir, load_model, load_tokenizer, save_checkpoint
from toolchain.training import TrainConfig, resolve_device, train


def default_seq_length(task: str) -> int:
    return 384 if task == "squad" else 128


def check_output(out_dir: Path, force: bool, resume: bool) -> Path:
    """The resume-state folder for `out_dir`; refuses to overwrite a finished output unless forced."""
    if out_dir.exists() and not force:
        raise ToolchainError(f"output {out_dir} already exists (use --force to replace it)")
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    return partial


def hf_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def evaluate_checkpoint(model, tokenizer, task: str, eval_path: Path, max_eval_examples: int | None,
                        max_seq_length: int, doc_stride: int, device: torch.device,
                        columns: prepare.Columns, labels: list[str] | None, skip: int = 0,
                        length_config: LengthConfig = None) -> dict:
    """Accuracy of an HF model (or a `LengthAdaptiveModel` at `length_config`) on `max_eval_examples` questions of a
    dev set's seeded permutation, after skipping `skip` (the search's report split is skip 1000, 2000 questions)."""
    check_seq_length(model.config, max_seq_length)
    run = torch_runner(model.to(device), device, **({} if length_config is None else {"length_config": length_config}))
    if task == "squad":
        examples, features = prepare.squad_split(eval_path, tokenizer, max_seq_length, doc_stride, max_eval_examples,
                                                 skip=skip)
        metrics, _ = evaluate_squad(run, examples, features)
    else:
        _, arrays = prepare.classify_split(eval_path, tokenizer, max_seq_length, labels, columns, max_eval_examples,
                                           skip=skip)
        metrics, _ = evaluate_classify(run, arrays)
    return metrics


def finetune(*, task: str, model_dir: Path | None, train_path: Path, eval_path: Path, out_dir: Path,
             max_train_examples: int | None, max_eval_examples: int | None, max_seq_length: int | None,
             doc_stride: int, cfg: TrainConfig, device_name: str, columns: prepare.Columns,
             resume: bool = False, force: bool = False) -> dict:
    """Train, save the checkpoint atomically, evaluate, and write metrics.json into the checkpoint."""
    check_task(task)
    cfg.validate()
    for name, value in (("max-train-examples", max_train_examples), ("max-eval-examples", max_eval_examples)):
        if value is not None and value <= 0:
            raise ToolchainError(f"--{name} must be positive, got {value}")
    max_seq_length = max_seq_length or default_seq_length(task)
    device = resolve_device(device_name)
    partial = check_output(out_dir, force, resume)
    tokenizer = load_tokenizer(model_dir)

    t0 = time.time()
    if task == "squad":
        _, features = prepare.squad_split(train_path, tokenizer, max_seq_length, doc_stride, max_train_examples,
                                          cfg.seed, split="train", balanced=False)
        data, labels = prepare.squad_train_arrays(features), None
    else:
        labels, data = prepare.classify_split(train_path, tokenizer, max_seq_length, None, columns,
                                              max_train_examples, cfg.seed)
    torch.manual_seed(cfg.seed)  # the task head is initialised here, before training seeds anything
    model = load_model(model_dir, task, labels)
    check_seq_length(model.config, max_seq_length)
    losses = train(model, data, hf_loss, cfg, device, partial, resume, desc=f"finetune {task}")
    train_seconds = time.time() - t0

    metrics = evaluate_checkpoint(model, tokenizer, task, eval_path, max_eval_examples, max_seq_length, doc_stride,
                                  device, columns, labels)
    meta = {
        "task": task, "labels": labels, "max_seq_length": max_seq_length, "doc_stride": doc_stride,
        "columns": asdict(columns) if task == "classify" else None,
        "base_model": str(model_dir or default_model_dir()), "train_data": str(train_path),
        "train_examples": max_train_examples, "train_rows": len(data["input_ids"]), "train": asdict(cfg),
        "device": device.type, "length_adaptive": False,
    }
    summary = {**metrics, "eval_data": str(eval_path), "train_seconds": round(train_seconds, 1),
               "loss_first": losses[0], "loss_last_20": sum(losses[-20:]) / len(losses[-20:]), "steps": len(losses)}
    save_checkpoint(model.cpu(), tokenizer, out_dir, meta, {"metrics.json": summary})
    shutil.rmtree(partial, ignore_errors=True)
    return summary
