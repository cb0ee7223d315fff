"""GEEP early exit (Li et al., 2024): one classifier shared by every depth, trained in one step.

`GeepModel` reuses the embeddings and `BertLayer`s of a Hugging Face BERT-family encoder and adds
 * a *teacher*: one FastBERT-style head (pooling -> Linear(H, 128) -> tanh -> Linear(128, C)) shared
   by all depths, so the encoder can be truncated at any layer and still classify. Pooling is the
   masked mean of the token states by default: in sentence-embedding checkpoints such as
   all-MiniLM-L6-v2 the early layers' [CLS] state barely varies across inputs (std ~1e-3 after
   layers 1-3), so a [CLS] head there stays at chance; `cls` pooling is kept as an option;
 * per-layer *students* of the same shape, distilled from the full-depth teacher. They only profile
   exits (FastBERT's entropy rule gives each training sample its exit label) and run the FastBERT baseline.

`shared_exit_loss` trains both in one pass: label cross-entropy of the teacher at every depth
(weighted by depth by default) plus the students' KL to the detached full-depth teacher.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.finetune import check_output
from toolchain.models import default_model_dir, load_model, load_tokenizer, read_meta, save_checkpoint
from toolchain.training import TrainConfig, resolve_device, to_device, train

HEADS_FILE = "geep_heads.safetensors"
HEAD_HIDDEN = 128


POOLINGS = ("mean", "cls")


class ExitClassifier(nn.Module):
    """FastBERT-style head: pool (masked mean or [CLS]) -> dropout -> Linear(H, 128) -> tanh -> Linear(128, C)."""

    def __init__(self, hidden_size: int, num_labels: int, head_hidden: int = HEAD_HIDDEN, dropout: float = 0.1,
                 pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ToolchainError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, head_hidden)
        self.out = nn.Linear(head_hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from states [B, S, H] and the [B, S] mask (1/True = real token)."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.out(torch.tanh(self.dense(self.dropout(pooled))))


class GeepModel(nn.Module):
    """A BERT-family encoder with a shared exit classifier (teacher) and per-layer students."""

    def __init__(self, hf_model: nn.Module, num_labels: int | None = None, head_hidden: int = HEAD_HIDDEN,
                 pooling: str = "mean") -> None:
        super().__init__()
        encoder = hf_model.base_model  # BertModel itself, or the `.bert` of a *ForSequenceClassification
        if not (hasattr(encoder, "embeddings") and hasattr(encoder, "encoder")):
            raise ToolchainError(f"{type(hf_model).__name__} is not a BERT-family encoder")
        config = encoder.config
        if getattr(config, "is_decoder", False):
            raise ToolchainError("GEEP needs an encoder-only model (config.is_decoder is set)")
        num_labels = num_labels or config.num_labels
        if num_labels < 2:
            raise ToolchainError(f"GEEP classification needs at least 2 labels, got {num_labels}")
        dropout = getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
        self.encoder = encoder
        self.head_hidden = head_hidden
        self.pooling = pooling
        self.teacher = ExitClassifier(config.hidden_size, num_labels, head_hidden, dropout, pooling)
        self.students = nn.ModuleList(
            ExitClassifier(config.hidden_size, num_labels, head_hidden, dropout, pooling) for _ in range(self.num_layers))

    @property
    def config(self):
        return self.encoder.config

    @property
    def num_layers(self) -> int:
        return len(self.encoder.encoder.layer)

    @property
    def num_labels(self) -> int:
        return self.teacher.out.out_features

    def check_depth(self, depth: int | None) -> int:
        """`depth` (1-based; None = all layers) as a checked int."""
        if depth is None:
            return self.num_layers
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 1 <= depth <= self.num_layers:
            raise ToolchainError(f"depth must be an integer in [1, {self.num_layers}], got {depth!r}")
        return int(depth)

    # -- the layer loop, in steps the shrinking-batch FastBERT runtime can call one by one --
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    @staticmethod
    def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, S] 1/0 mask -> additive [B, 1, 1, S] mask (0 for real tokens, dtype-min for padding)."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run_layer(self, index: int, hidden: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        """Layer `index` (0-based) of the HF encoder."""
        return self.encoder.encoder.layer[index](hidden, attention_mask=extended_mask)[0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, depth: int | None = None) -> list[torch.Tensor]:
        """The sequence states after layers 1..depth ([B, S, H] each)."""
        depth = self.check_depth(depth)
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.extended_mask(attention_mask, hidden.dtype)
        states = []
        for i in range(depth):
            hidden = self.run_layer(i, hidden, mask)
            states.append(hidden)
        return states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                depth: int | None = None) -> torch.Tensor:
        """Teacher logits [B, C] after `depth` layers (default: all)."""
        return self.teacher(self.hidden_states(input_ids, attention_mask, token_type_ids, depth)[-1], attention_mask)

    def all_depth_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits at every depth, [num_layers, B, C], from one pass."""
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return torch.stack([self.teacher(h, attention_mask) for h in states])

    def student_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Student i's logits on layer i's output, [num_layers, B, C]."""
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return torch.stack([student(h, attention_mask) for student, h in zip(self.students, states)])

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """The encoder as a plain HF folder plus the heads in `geep_heads.safetensors` (for `save_checkpoint`)."""
        from safetensors.torch import save_file

        self.encoder.save_pretrained(path, safe_serialization=safe_serialization)
        heads = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        save_file(heads, str(Path(path) / HEADS_FILE))


class TruncatedGeep(nn.Module):
    """The encoder cut after `depth` layers plus the shared classifier; returns (logits,) for ONNX export."""

    def __init__(self, model: GeepModel, depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = model.check_depth(depth)
        self.train(model.training)  # a fresh module is in training mode; don't flip the wrapped model's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        return (self.model(input_ids, attention_mask, token_type_ids, self.depth),)


def depth_loss_weights(num_layers: int, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Per-depth weights of the teacher's label loss, normalised to sum 1.

    Default: proportional to depth (1, 2, ..., L), as in PABEE's weighted average: every depth is
    trained, but the deeper ones, which carry the full-model accuracy, count most. A weight of 0
    leaves that depth out.
    """
    w = torch.arange(1, num_layers + 1, dtype=torch.float32) if weights is None else torch.tensor(weights, dtype=torch.float32)
    if w.shape != (num_layers,) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ToolchainError(f"depth weights must be {num_layers} non-negative numbers with a positive sum, got {weights}")
    return w / w.sum()


def shared_exit_loss(model: GeepModel, batch: dict[str, torch.Tensor], weights: Sequence[float] | None = None,
                     student_weight: float = 1.0) -> torch.Tensor:
    """GEEP's one-step loss, from a single encoder pass.

    teacher: sum_d w_d * CE(teacher(h_d), label), `w` from `depth_loss_weights`;
    students: mean_d KL(softmax(teacher(h_L)).detach() || softmax(student_d(h_d))), on detached states
    h_d, so (as in FastBERT's self-distillation) the students never move the encoder or the teacher.
    """
    states = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    mask = batch["attention_mask"]
    teacher = torch.stack([model.teacher(h, mask) for h in states])  # [L, B, C]
    w = depth_loss_weights(model.num_layers, weights).to(teacher.device)
    labels = batch["labels"]
    ce = torch.stack([F.cross_entropy(logits.float(), labels) for logits in teacher])
    target = teacher[-1].detach().float().softmax(-1)
    kl = torch.stack([F.kl_div(student(h.detach(), mask).float().log_softmax(-1), target, reduction="batchmean")
                      for student, h in zip(model.students, states)])
    return (w * ce).sum() + student_weight * kl.mean()


def check_speed(speed: float) -> float:
    if not 0.0 <= speed <= 1.0:  # also rejects NaN
        raise ToolchainError(f"speed (normalized-entropy exit threshold) must be in [0, 1], got {speed}")
    return float(speed)


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) over the last axis divided by log(C): 0 = certain, 1 = uniform."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return np.clip(-(np.exp(log_p) * log_p).sum(-1) / np.log(x.shape[-1]), 0.0, 1.0)


def exit_layers(per_layer_logits: np.ndarray, speed: float) -> np.ndarray:
    """FastBERT's exit rule on [L, B, C] logits: per sample, the first layer (1-based) whose normalized
    entropy is below `speed`, else L. speed 0 never exits early; speed 1 exits at layer 1 unless uniform."""
    speed = check_speed(speed)
    confident = normalized_entropy(per_layer_logits) < speed  # [L, B]
    num_layers = confident.shape[0]
    return np.where(confident.any(0), confident.argmax(0) + 1, num_layers).astype(np.int64)


def depth_logits(model: GeepModel, inputs: dict[str, np.ndarray], batch_size: int = 64,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) logits at every depth, each [L, N, C] float32, batch by batch."""
    model.to(device).eval()
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs]
    n = len(inputs["input_ids"])
    teachers, students = [], []
    with torch.inference_mode():
        for b in range(0, n, batch_size):
            batch = to_device({k: inputs[k][b:b + batch_size] for k in keys}, torch.device(device))
            states = model.hidden_states(**batch)
            mask = batch["attention_mask"]
            teachers.append(torch.stack([model.teacher(h, mask) for h in states]).float().cpu().numpy())
            students.append(torch.stack([s(h, mask) for s, h in zip(model.students, states)]).float().cpu().numpy())
    return np.concatenate(teachers, axis=1), np.concatenate(students, axis=1)


def profile_exits(model: GeepModel, inputs: dict[str, np.ndarray], speed: float, batch_size: int = 64,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Each sample's exit label (1-based): the layer where FastBERT's students would let it exit."""
    check_speed(speed)
    return exit_layers(depth_logits(model, inputs, batch_size, device)[1], speed)


def depth_accuracy(model: GeepModel, arrays: dict[str, np.ndarray], batch_size: int = 64,
                   device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Dev accuracy (percent) of the teacher and of the students at every depth."""
    teacher, students = depth_logits(model, arrays, batch_size, device)
    return {"accuracy_by_depth": accuracy_by_depth(teacher, arrays["labels"]),
            "student_accuracy_by_depth": accuracy_by_depth(students, arrays["labels"])}


def accuracy_by_depth(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Accuracy (percent, 2 decimals) at every depth of [L, N, C] logits."""
    return [round(100.0 * float((d.argmax(-1) == labels).mean()), 2) for d in logits]


def train_geep(*, model_dir: Path | None, train_path: Path, eval_path: Path, out_dir: Path,
               columns: prepare.Columns, max_seq_length: int, max_train_examples: int | None,
               max_eval_examples: int | None, cfg: TrainConfig, device_name: str, resume: bool = False,
               force: bool = False, depth_weights: Sequence[float] | None = None,
               student_weight: float = 1.0, pooling: str = "mean") -> dict:
    """Train a GEEP classifier with the shared exit loss, save it atomically, and return dev metrics."""
    cfg.validate()
    for name, value in (("max-train-examples", max_train_examples), ("max-eval-examples", max_eval_examples)):
        if value is not None and value <= 0:
            raise ToolchainError(f"--{name} must be positive, got {value}")
    if not student_weight >= 0:
        raise ToolchainError(f"student weight must be >= 0, got {student_weight}")
    device = resolve_device(device_name)
    partial_dir = check_output(out_dir, force, resume)
    tokenizer = load_tokenizer(model_dir)

    t0 = time.time()
    labels, data = prepare.classify_split(train_path, tokenizer, max_seq_length, None, columns, max_train_examples, cfg.seed)
    torch.manual_seed(cfg.seed)  # the heads are initialised here, before training seeds anything
    model = GeepModel(load_model(model_dir, "classify", labels), pooling=pooling)
    loss_fn = partial(shared_exit_loss, weights=depth_weights, student_weight=student_weight)
    depth_loss_weights(model.num_layers, depth_weights)  # bad weights fail now, not inside the loop
    losses = train(model, data, loss_fn, cfg, device, partial_dir, resume, desc="train-geep")
    train_seconds = time.time() - t0

    _, dev = prepare.classify_split(eval_path, tokenizer, max_seq_length, labels, columns, max_eval_examples)
    by_depth = depth_accuracy(model, dev, device=device)
    meta = {
        "task": "classify", "geep": True, "labels": labels, "num_layers": model.num_layers,
        "head_hidden": model.head_hidden, "pooling": pooling, "max_seq_length": max_seq_length, "columns": asdict(columns),
        "depth_weights": None if depth_weights is None else list(depth_weights), "student_weight": student_weight,
        "base_model": str(model_dir or default_model_dir()), "train_data": str(train_path),
        "train_examples": max_train_examples, "train_rows": len(data["input_ids"]), "train": asdict(cfg),
        "device": device.type,
    }
    summary = {"accuracy": by_depth["accuracy_by_depth"][-1], **by_depth, "examples": len(dev["labels"]),
               "eval_data": str(eval_path), "train_seconds": round(train_seconds, 1), "loss_first": losses[0],
               "loss_last_20": sum(losses[-20:]) / len(losses[-20:]), "steps": len(losses)}
    save_checkpoint(model.cpu(), tokenizer, out_dir, meta, {"metrics.json": summary})
    shutil.rmtree(partial_dir, ignore_errors=True)
    return summary


def load_geep(checkpoint_dir: str | Path) -> tuple[GeepModel, object, dict]:
    """(model in eval mode, tokenizer, toolchain.json) of a `train-geep` checkpoint."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModel

    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)  # also checks the folder is an HF model folder
    meta = read_meta(checkpoint_dir)
    heads = checkpoint_dir / HEADS_FILE
    if not meta.get("geep") or not heads.is_file():
        raise ToolchainError(f"{checkpoint_dir} is not a GEEP checkpoint (no 'geep' in toolchain.json or no {HEADS_FILE}); "
                             "train one with `toolchain train-geep`")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        encoder = AutoModel.from_pretrained(checkpoint_dir)
        model = GeepModel(encoder, len(meta["labels"]), meta.get("head_hidden", HEAD_HIDDEN), meta.get("pooling", "cls"))
        missing, unexpected = model.load_state_dict(load_file(str(heads)), strict=False)
    except Exception as e:
        raise ToolchainError(f"cannot load GEEP model from {checkpoint_dir}: {type(e).__name__}: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected or model.num_layers != meta.get("num_layers"):
        raise ToolchainError(f"{checkpoint_dir}/{HEADS_FILE} does not match the encoder "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizer, meta
