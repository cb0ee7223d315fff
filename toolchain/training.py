"""A small, resumable training loop shared by fine-tuning, Drop-and-Restore and GEEP training.

The caller supplies the batches (numpy arrays) and a `loss_fn(model, batch) -> loss`; this module
owns devices, mixed precision, gradient accumulation, the LR schedule, progress and resume state.
Every batch is cut to its longest row, and by default batches are drawn from rows of similar length
(`epoch_order`), so little of a step is spent on padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain.errors import ToolchainError
from toolchain.evaluate import trim_padding
from toolchain.files import atomic_path

PRECISIONS = ("fp32", "bf16", "fp16")
GROUP_BATCHES = 50  # length grouping sorts rows within windows of this many batches (Hugging Face's mega-batches)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "fp32"
    save_steps: int = 100
    group_by_length: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "save_steps"):
            if getattr(self, name) <= 0:
                raise ToolchainError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0:
                raise ToolchainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ToolchainError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when a GPU is usable, else CPU; asking for CUDA without one is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise ToolchainError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolchainError("--device cuda was asked for, but no CUDA GPU is available to PyTorch here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool) -> np.ndarray:
    """One epoch's row order: a seeded permutation. With ``group_by_length`` each window of GROUP_BATCHES batches
    of it is sorted longest first and the full batches cut from the windows are shuffled (a short last batch stays
    last): every batch holds rows of similar length, the batch order stays random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return order
    window = batch_size * GROUP_BATCHES
    order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                            for w in np.split(order, range(window, len(order), window))])
    full = len(order) // batch_size
    batches = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), order[full * batch_size:]])


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def train(model: torch.nn.Module, data: dict[str, np.ndarray], loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
          cfg: TrainConfig, device: torch.device, state_dir: Path, resume: bool = False,
          desc: str = "train") -> list[float]:
    """Train in place; returns the loss of every optimizer step (resumed runs include earlier steps).

    Every `save_steps` optimizer steps the model, optimizer, schedule and step are saved to
    `state_dir/state.pt`; with `resume` the run continues from there, with the same data order.
    """
    cfg.validate()
    if precision_needs_cuda(cfg.precision) and device.type != "cuda":
        raise ToolchainError(f"precision {cfg.precision} needs --device cuda; use fp32 on CPU")
    n = len(next(iter(data.values())))
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    total_micro = max(1, int(round(micro_per_epoch * cfg.epochs)))
    total_steps = max(1, total_micro // cfg.grad_accum)

    torch.manual_seed(cfg.seed)
    model.to(device).train()
    decay = [p for n_, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n_, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warmup = int(cfg.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.pt"
    step, losses = 0, []
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != asdict(cfg) or state["n"] != n:
            raise ToolchainError(f"cannot resume from {state_dir}: it was started with other settings or data")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])

    def save() -> None:
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step, "losses": losses, "n": n,
                        "config": asdict(cfg), "torch_rng": torch.get_rng_state()}, tmp)

    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    micro = step * cfg.grad_accum
    lengths = data["attention_mask"].sum(1)
    order = None
    accumulated = 0.0
    while micro < total_micro:
        epoch, pos = divmod(micro, micro_per_epoch)
        if pos == 0 or order is None:
            order = epoch_order(lengths, cfg.batch_size, cfg.seed + epoch, cfg.group_by_length)
        idx = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        batch = to_device(trim_padding({k: v[idx] for k, v in data.items()}), device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model, batch) / cfg.grad_accum
        scaler.scale(loss).backward()
        accumulated += loss.item()
        micro += 1
        if micro % cfg.grad_accum == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            losses.append(accumulated)
            accumulated = 0.0
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)  # shown at the bar's next redraw:
            bar.update(1)  # a redraw every step flooded logs at 38 steps/s on a GPU
            if step % cfg.save_steps == 0 or step == total_steps:
                save()
            if step == total_steps:
                break
    bar.close()
    model.eval()
    return losses


def precision_needs_cuda(precision: str) -> bool:
    return precision in ("bf16", "fp16")
