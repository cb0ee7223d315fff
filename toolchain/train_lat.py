"""`toolchain train-lat`: Drop-and-Restore training (LAT, Kim & Cho 2021) from a fine-tuned checkpoint.

Each step runs the sandwich rule: the full model learns the labels; the smallest sub-model and
`num_sandwich` random sub-models (LengthDrop configurations, with LayerDrop) learn the full model's
detached output distributions (in-place distillation, KL). One backward pass over the summed loss.
Optionally the random sub-models are confined to a band of MACs (a share of full length's), the band
a search will deploy from.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from toolchain.data import prepare
from toolchain.errors import ToolchainError
from toolchain.finetune import check_output, evaluate_checkpoint
from toolchain.lat import LengthAdaptiveModel, sample_layer_mask, sample_length_config, smallest_length_config
from toolchain.macs import count_macs
from toolchain.models import check_seq_length, load_model, load_tokenizer, read_meta, save_checkpoint
from toolchain.training import TrainConfig, resolve_device, train


@dataclass
class SandwichConfig:
    length_drop_ratio_bound: float = 0.2
    layer_drop_prob: float = 0.2
    num_sandwich: int = 2
    temperature: float = 1.0
    sub_macs_band: tuple[float, float] = (0.0, 1.0)
    drop_at: str = "padded"

    def validate(self) -> None:
        if self.drop_at not in ("padded", "real"):
            raise ToolchainError(f"drop-at must be 'padded' or 'real', got {self.drop_at!r}")
        if not 0.0 <= self.length_drop_ratio_bound < 1.0:
            raise ToolchainError(f"length-drop-ratio-bound must be in [0, 1), got {self.length_drop_ratio_bound}")
        if not 0.0 <= self.layer_drop_prob < 1.0:
            raise ToolchainError(f"layer-drop must be in [0, 1), got {self.layer_drop_prob}")
        if self.num_sandwich < 0:
            raise ToolchainError(f"num-sandwich must be >= 0, got {self.num_sandwich}")
        low, high = self.sub_macs_band
        if not 0.0 <= low < high <= 1.0:
            raise ToolchainError(f"the sub-models' MAC band must satisfy 0 <= min < max <= 1, got [{low}, {high}]")


def _outputs(out) -> list[torch.Tensor]:
    return [out.start_logits, out.end_logits] if out.start_logits is not None else [out.logits]


def _label_loss(outputs: list[torch.Tensor], batch: dict) -> torch.Tensor:
    if len(outputs) == 2:
        return (F.cross_entropy(outputs[0], batch["start_positions"]) + F.cross_entropy(outputs[1], batch["end_positions"])) / 2
    return F.cross_entropy(outputs[0], batch["labels"])


def _kl(student: list[torch.Tensor], teacher: list[torch.Tensor], t: float) -> torch.Tensor:
    return sum(F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="batchmean") * t * t
               for s, te in zip(student, teacher)) / len(student)


def sample_sub_config(model: LengthAdaptiveModel, sandwich: SandwichConfig, max_seq_length: int, rng: random.Random,
                      tries: int = 10_000) -> tuple[int, ...]:
    """A LengthDrop configuration whose MACs lie in `sandwich.sub_macs_band` of full length's (rejection
    sampling; the default band takes the first draw, so the random stream is LAT's)."""
    low, high = sandwich.sub_macs_band
    head = "qa" if model.task == "squad" else "classify"
    full = count_macs(model.config, None, max_seq_length, head)
    for _ in range(tries):
        cfg = sample_length_config(model.num_layers, max_seq_length, sandwich.length_drop_ratio_bound, rng)
        if low <= count_macs(model.config, cfg, max_seq_length, head) / full <= high:
            return cfg
    raise ToolchainError(f"no sub-model sampled at length-drop-ratio-bound {sandwich.length_drop_ratio_bound} lies "
                         f"in the MAC band [{low}, {high}] ({tries} draws): widen the band or raise the bound")


def sandwich_loss_fn(sandwich: SandwichConfig, seed: int, max_seq_length: int):
    """A `loss_fn(model, batch)` for `training.train` implementing the sandwich rule with in-place distillation.

    Length configurations are sampled at ``max_seq_length``, the length the data was padded to, as LAT does: a
    batch cut to its longest row keeps at most the tokens it has, exactly the real tokens it would keep padded.
    With ``sandwich.drop_at == "real"`` they are sampled at the batch's own length (its longest row's real tokens),
    so short windows drop real tokens too instead of only their padding.
    """
    rng = random.Random(seed)

    def loss_fn(model: LengthAdaptiveModel, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        layers = model.num_layers
        seq = max_seq_length if sandwich.drop_at == "padded" else int(inputs["attention_mask"].sum(1).max())
        full = _outputs(model(**inputs))
        teacher = [o.detach() for o in full]
        loss = _label_loss(full, batch)
        configs = [smallest_length_config(layers, seq, sandwich.length_drop_ratio_bound)]
        configs += [sample_sub_config(model, sandwich, seq, rng) for _ in range(sandwich.num_sandwich)]
        for cfg in configs:
            mask = sample_layer_mask(layers, sandwich.layer_drop_prob, rng)
            if not any(mask):
                mask = (True,) * layers
            loss = loss + _kl(_outputs(model(**inputs, length_config=cfg, layer_mask=mask)), teacher,
                              sandwich.temperature)
        return loss

    return loss_fn


def load_length_adaptive(model_dir: Path, require_lat: bool = False,
                         protect_answers: int | None = None) -> tuple[LengthAdaptiveModel, object, dict]:
    """(wrapper, tokenizer, meta) for a fine-tuned checkpoint; `require_lat` insists on a train-lat one;
    `protect_answers` sets the answer guard (None: `lat.PROTECT_ANSWERS` for QA, off for classification)."""
    meta = read_meta(model_dir)
    if not meta:
        raise ToolchainError(f"{model_dir} is not a toolchain checkpoint (no toolchain.json)")
    if require_lat and not meta.get("length_adaptive"):
        raise ToolchainError(f"{model_dir} is not length-adaptive: train it with `toolchain train-lat` first")
    model = LengthAdaptiveModel(load_model(model_dir, meta["task"]), meta.get("keep_cls"), protect_answers)
    return model, load_tokenizer(model_dir), meta


def train_lat(*, model_dir: Path, train_path: Path, eval_path: Path, out_dir: Path, max_train_examples: int | None,
              max_eval_examples: int | None, cfg: TrainConfig, sandwich: SandwichConfig, device_name: str,
              max_seq_length: int | None = None, train_skip: int = 0, min_real_tokens: int = 0,
              resume: bool = False, force: bool = False) -> dict:
    """Train, evaluate at full length, save an atomic checkpoint marked length_adaptive.

    `max_seq_length` defaults to the checkpoint's; `train_skip` skips that many questions of the seeded
    train permutation first (the ones an earlier step of the pipeline already trained on). `min_real_tokens` trains
    only on the windows with at least that many real tokens: a length configuration at `max_seq_length` drops real
    tokens from the early layers only in long windows, and a window of typical length rarely gets that practice.
    """
    cfg.validate()
    sandwich.validate()
    device = resolve_device(device_name)
    model, tokenizer, meta = load_length_adaptive(model_dir, protect_answers=0)  # the guard is for inference only
    task, seq, stride = meta["task"], max_seq_length or meta["max_seq_length"], meta.get("doc_stride", 128)
    check_seq_length(model.hf_model.config, seq)
    if not 0 <= min_real_tokens <= seq:
        raise ToolchainError(f"min-real-tokens must be in [0, {seq}] (the sequence length), got {min_real_tokens}")
    if sandwich.num_sandwich:
        sample_sub_config(model, sandwich, seq, random.Random(cfg.seed))  # a band that admits nothing fails here
    partial = check_output(out_dir, force, resume)
    columns = prepare.Columns.from_meta(meta)
    t0 = time.time()
    if task == "squad":
        _, feats = prepare.squad_split(train_path, tokenizer, seq, stride, max_train_examples, cfg.seed,
                                       split="train", skip=train_skip, balanced=False)
        data = prepare.squad_train_arrays(feats)
    else:
        _, data = prepare.classify_split(train_path, tokenizer, seq, meta["labels"], columns, max_train_examples,
                                         cfg.seed, skip=train_skip)
    if min_real_tokens:
        long = data["attention_mask"].sum(1) >= min_real_tokens
        if not long.any():
            raise ToolchainError(f"no training window has {min_real_tokens} or more real tokens: lower "
                                 "min-real-tokens or train on more examples")
        data = {k: v[long] for k, v in data.items()}
    losses = train(model, data, sandwich_loss_fn(sandwich, cfg.seed, seq), cfg, device, partial, resume, desc="train-lat")
    seconds = time.time() - t0
    metrics = evaluate_checkpoint(model, tokenizer, task, eval_path, max_eval_examples, seq, stride, device, columns,
                                  meta.get("labels"))
    new_meta = {**meta, "max_seq_length": seq, "length_adaptive": True, "keep_cls": model.keep_cls,
                "parent": str(model_dir), "train_lat": {**asdict(cfg), **asdict(sandwich),
                                                        "train_examples": max_train_examples, "train_skip": train_skip,
                                                        "min_real_tokens": min_real_tokens}}
    summary = {**metrics, "eval_data": str(eval_path), "train_seconds": round(seconds, 1),
               "train_windows": len(data["input_ids"]), "steps": len(losses),
               "loss_first": losses[0], "loss_last_20": sum(losses[-20:]) / len(losses[-20:])}
    save_checkpoint(model.hf_model.cpu(), tokenizer, out_dir, new_meta, {"metrics.json": summary})
    shutil.rmtree(partial, ignore_errors=True)
    return summary
