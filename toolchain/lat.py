"""Length-adaptive drop-and-restore forward (LAT, Kim & Cho, ACL 2021) for Hugging Face BERT-family models.

The wrapper reuses every submodule of a ``*ForQuestionAnswering`` / ``*ForSequenceClassification`` model
(embeddings, per-layer Q/K/V, attention output, feed-forward, heads) and only re-implements the layer loop:
eager attention (so the probabilities are at hand), PoWER-BERT significance, TopK token selection after the
attention block, and a final scatter that restores every dropped token's last state to its position.

For QA, the answer guard (ours, inference only) keeps each drop from taking the likeliest answer tokens: the QA head
scores the states entering the layer (the states a token dropped there keeps, which Restore trains the head on), and
the top ``protect_answers`` start and end positions outrank every other token. It costs 2 x hidden MACs a token per
dropping layer (not counted, like the significance itself).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from toolchain.errors import ToolchainError

LengthConfig = tuple[int, ...] | None
Rng = random.Random | np.random.Generator
PROTECT_ANSWERS = 32  # QA default: start and end positions the answer guard keeps at every drop


def parse_length_config(value: str | Sequence[int] | None, num_layers: int, max_seq_length: int) -> LengthConfig:
    """Parse ``"269,253,..."``, a sequence of ints, or ``"full"``/``None`` (no dropping) into a checked tuple.

    Entries are tokens kept after each layer: positive, non-increasing, at most ``max_seq_length``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("()[]").strip()
        if text.lower() == "full":
            return None
        if not text:
            raise ToolchainError(f"length config is empty: give {num_layers} comma-separated token counts or 'full'")
        entries: list[int] = []
        for part in text.split(","):
            try:
                entries.append(int(part.strip()))
            except ValueError:
                raise ToolchainError(f"length config {value!r}: entry {part.strip()!r} is not an integer") from None
    else:
        try:
            entries = list(value)
        except TypeError:
            raise ToolchainError(f"length config must be a comma-separated string or a sequence of ints, got {value!r}") from None
        for entry in entries:
            if isinstance(entry, bool) or not isinstance(entry, (int, np.integer)):
                raise ToolchainError(f"length config {value!r}: entry {entry!r} is not an integer")
        entries = [int(e) for e in entries]
    if len(entries) != num_layers:
        raise ToolchainError(f"length config has {len(entries)} entries, expected {num_layers} (one per layer)")
    for i, n in enumerate(entries):
        if n <= 0:
            raise ToolchainError(f"length config entry {i} is {n}: token counts must be positive")
        if n > max_seq_length:
            raise ToolchainError(f"length config entry {i} is {n}: above max_seq_length {max_seq_length}")
        if i and n > entries[i - 1]:
            raise ToolchainError(
                f"length config must be non-increasing: entry {i} ({n}) > entry {i - 1} ({entries[i - 1]})"
            )
    return tuple(entries)


def _check_bound(name: str, value: float, upper_inclusive: bool) -> None:
    if not (0.0 <= value < 1.0 or (upper_inclusive and value == 1.0)):
        raise ToolchainError(f"{name} must be in [0, 1{']' if upper_inclusive else ')'}, got {value}")


def _randint(rng: Rng, low: int, high: int) -> int:
    """Uniform integer in [low, high] for either a ``random.Random`` or a numpy ``Generator``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def _shrunk(length: int, ratio: float) -> int:
    return math.ceil(length * (1.0 - ratio) - 1e-9)  # epsilon: 100 * (1 - 0.2) must give 80, not 81


def sample_length_config(
    num_layers: int, seq_len: int, length_drop_ratio_bound: float, rng: Rng, min_len: int = 1
) -> tuple[int, ...]:
    """LAT ``sample_length_configuration``: each layer keeps U{ceil(prev * (1 - bound)), ..., prev} tokens."""
    _check_bound("length_drop_ratio_bound", length_drop_ratio_bound, upper_inclusive=False)
    length, out = seq_len, []
    for _ in range(num_layers):
        length = max(_randint(rng, _shrunk(length, length_drop_ratio_bound), length), min_len)
        out.append(length)
    return tuple(out)


def smallest_length_config(
    num_layers: int, seq_len: int, length_drop_ratio_bound: float, min_len: int = 1
) -> tuple[int, ...]:
    """The sandwich rule's smallest sub-model: every layer drops the maximal ratio."""
    _check_bound("length_drop_ratio_bound", length_drop_ratio_bound, upper_inclusive=False)
    length, out = seq_len, []
    for _ in range(num_layers):
        length = max(_shrunk(length, length_drop_ratio_bound), min_len)
        out.append(length)
    return tuple(out)


def sample_layer_mask(num_layers: int, layer_drop_prob: float, rng: Rng) -> tuple[bool, ...]:
    """LayerDrop: keep each layer independently with probability ``1 - layer_drop_prob`` (as in LAT)."""
    _check_bound("layer_drop_prob", layer_drop_prob, upper_inclusive=True)
    return tuple(float(rng.random()) >= layer_drop_prob for _ in range(num_layers))


@dataclass
class LATOutput(ModelOutput):
    """QA: ``start_logits``/``end_logits``; classification: ``logits``.

    ``kept_positions`` holds the original positions of the tokens that reached the last layer ([B, n], ascending),
    or None when nothing was dropped.
    """

    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    kept_positions: torch.Tensor | None = None


class LengthAdaptiveModel(nn.Module):
    """Drop-and-restore wrapper around a BERT/RoBERTa QA or sequence-classification model."""

    def __init__(self, hf_model: nn.Module, keep_cls: bool | None = None, protect_answers: int | None = None) -> None:
        super().__init__()
        config = hf_model.config
        if hasattr(hf_model, "qa_outputs"):
            task = "qa"
        elif hasattr(hf_model, "classifier"):
            task = "classify"
        else:
            raise ToolchainError(
                f"{type(hf_model).__name__} is not supported: expected a *ForQuestionAnswering or "
                "*ForSequenceClassification model"
            )
        base = hf_model.base_model
        if not (hasattr(base, "embeddings") and hasattr(base, "encoder")):
            raise ToolchainError(f"{type(hf_model).__name__} is not a BERT-family encoder")
        if getattr(config, "is_decoder", False):
            raise ToolchainError("length-adaptive inference needs an encoder-only model (config.is_decoder is set)")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ToolchainError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        if task == "classify" and isinstance(hf_model.classifier, nn.Linear) and base.pooler is None:
            raise ToolchainError(f"{type(hf_model).__name__} has a linear classifier but no pooler")
        self.model = hf_model
        self._task = task
        self.keep_cls = (task == "classify") if keep_cls is None else bool(keep_cls)
        self.protect_answers = (PROTECT_ANSWERS if task == "qa" else 0) if protect_answers is None else protect_answers
        if not isinstance(self.protect_answers, int) or self.protect_answers < 0:
            raise ToolchainError(f"protect-answers must be a whole number >= 0, got {protect_answers!r}")
        if self.protect_answers and task != "qa":
            raise ToolchainError("protect-answers needs a question-answering model (it keeps the QA head's best spans)")

    def guarded(self, protect_answers: int) -> LengthAdaptiveModel:
        """The same weights with another answer guard (a bundle's graph records the guard it was exported with)."""
        return LengthAdaptiveModel(self.model, self.keep_cls, protect_answers)

    @property
    def hf_model(self) -> nn.Module:
        return self.model

    @property
    def task(self) -> str:
        return self._task

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.model.base_model.encoder.layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        length_config: str | Sequence[int] | None = None,
        layer_mask: Sequence[bool] | None = None,
    ) -> LATOutput:
        hidden = self.model.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.forward_from(0, hidden, attention_mask, length_config, layer_mask)

    def forward_from(
        self,
        start_layer: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        length_config: str | Sequence[int] | None = None,
        layer_mask: Sequence[bool] | None = None,
    ) -> LATOutput:
        """The layers from ``start_layer`` on (``length_config`` still has an entry for every layer) and the head,
        from the hidden states [B, L, H] that enter that layer (the embeddings for layer 0). A search starts a
        window at the first layer that drops any of its real tokens, from its full-length states (`layer_states`)."""
        lengths = parse_length_config(length_config, self.num_layers, self.config.max_position_embeddings)
        if layer_mask is not None and len(layer_mask) != self.num_layers:
            raise ToolchainError(f"layer mask has {len(layer_mask)} entries, expected {self.num_layers}")
        if not 0 <= start_layer <= self.num_layers:
            raise ToolchainError(f"start layer {start_layer} is outside 0..{self.num_layers}")
        mask = attention_mask.to(hidden.dtype)  # 1 = real token, 0 = padding, for the current tokens
        # `seq` and `n` are the token counts at trace time (Python ints: which layers drop is fixed in an export);
        # every shape below is taken from the tensors, so an exported graph takes any length up to the traced one
        seq, width = _num_tokens(hidden), self.config.hidden_size
        b = attention_mask.shape[0]  # traced: reshapes below keep the batch and infer the token count (-1)
        # Dropping moves whole rows of the flattened [B * n, H] states: `rows` [B, n] holds each current token's row
        # in the [B * L, H] input (b * L + position), the index of the final restore. (The layers themselves run on
        # [B, n, H]: a 2-D Linear exports as Gemm, faster in fp32 here but slower once quantized: QGemm, no GELU
        # fusion.)
        full = rows = rank = batch = None  # restore buffer [B * L, H], rows [B, n], significance rank [B, n], b [B, 1]
        n = seq
        for i, layer in enumerate(self.model.base_model.encoder.layer):
            if i < start_layer or (layer_mask is not None and not layer_mask[i]):
                continue
            attn_out, probs = self._attention(layer, hidden, mask, b)
            keep = None if lengths is None else lengths[i]
            if keep is not None and keep < n:
                if full is None:
                    full = hidden.reshape(-1, width)
                    rows = (torch.ones_like(attention_mask, dtype=torch.long).reshape(-1).cumsum(0) - 1).view(b, -1)
                    rank = self._pad_rank(mask, rows)
                    batch = torch.ones_like(attention_mask[:, :1], dtype=torch.long).cumsum(0) - 1
                else:  # tokens dropped here keep their state from the previous layer
                    full = full.index_put((rows.reshape(-1),), hidden.reshape(-1, width))
                guarded = self._guarded(hidden, mask, rank) if self.protect_answers else None
                idx = self._keep_indices(probs, mask, rank, keep, guarded)
                rows, mask, rank = rows.gather(1, idx), mask.gather(1, idx), rank.gather(1, idx)
                attn_out = attn_out.reshape(-1, width)[(idx + batch * hidden.shape[1]).reshape(-1)].view(b, -1, width)
                n = keep
            hidden = layer.output(layer.intermediate(attn_out), attn_out)
        positions = None
        if full is not None:
            hidden = full.index_put((rows.reshape(-1),), hidden.reshape(-1, width)).view(b, -1, width)
            positions = rows % attention_mask.shape[1]
        return self._head(hidden, positions)

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The full-length hidden states entering layers 1, 2, ... (each layer's output but the last's)."""
        base = self.model.base_model
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask, states = attention_mask.to(hidden.dtype), []
        for layer in base.encoder.layer[:-1]:
            attn_out, _ = self._attention(layer, hidden, mask, attention_mask.shape[0])
            hidden = layer.output(layer.intermediate(attn_out), attn_out)
            states.append(hidden)
        return states

    @staticmethod
    def _attention(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager multi-head self-attention + output dense/LayerNorm on [B, n, H] states; returns (output, probs
        [B, heads, n, n])."""
        sa = layer.attention.self

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, sa.num_attention_heads, sa.attention_head_size).transpose(1, 2)

        q, k, v = heads(sa.query(hidden)), heads(sa.key(hidden)), heads(sa.value(hidden))
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        scores = q @ k.transpose(-1, -2) / math.sqrt(sa.attention_head_size) + additive
        probs = scores.softmax(dim=-1)
        context = (sa.dropout(probs) @ v).transpose(1, 2).reshape(b, -1, sa.num_attention_heads * sa.attention_head_size)
        return layer.attention.output(context, hidden), probs

    def _pad_rank(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Added to significance before TopK: 0 for real tokens, -1 - row for padding (below every real token,
        distinct, earliest kept first), +inf for [CLS] when it is always kept."""
        rank = (mask - 1.0) * (rows + 1).to(mask.dtype)
        if self.keep_cls:
            rank = torch.cat([torch.full_like(rank[:, :1], math.inf), rank[:, 1:]], dim=1)
        return rank

    def _guarded(self, hidden: torch.Tensor, mask: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """[B, n]: 1 for the real tokens among the QA head's top `protect_answers` start or end positions on the
        states entering the layer (and for an always-kept [CLS]), else 0."""
        logits = self.model.qa_outputs(hidden).masked_fill(mask[..., None] == 0, -math.inf)  # [B, n, 2]
        # the m-th best logit by a descending sort cut at m (Slice clamps: a shorter input guards all its tokens);
        # a threshold, not TopK indices, so ORT and PyTorch guard the same tokens whatever their tie order
        threshold = logits.sort(dim=1, descending=True).values[:, : self.protect_answers].amin(dim=1, keepdim=True)
        guarded = (logits >= threshold).any(dim=-1).to(mask.dtype) * mask
        return torch.maximum(guarded, torch.isinf(rank).to(mask.dtype))

    @staticmethod
    def _keep_indices(probs: torch.Tensor, mask: torch.Tensor, rank: torch.Tensor, keep: int,
                      guarded: torch.Tensor | None = None) -> torch.Tensor:
        """Indices [B, keep] (ascending) of the most significant current tokens, the `guarded` ones first."""
        # attention received from real queries, summed over heads (>= 0, exactly 0 for padding keys): a mask-weighted
        # sum over the queries as one MatMul, which reads the [B, heads, n, n] probabilities once
        score = (mask[:, None, None, :] @ probs).sum(dim=(1, 2)) + rank
        order = score.argsort(dim=1, descending=True)
        if guarded is not None:
            # guarded tokens first, each group in significance order: each token's place in `order` (whole numbers,
            # exact in any float type) moved ahead by n when guarded; adding a constant to the significance instead
            # would round close significances together, and ORT and PyTorch would then break the ties differently
            place = order.argsort(dim=1).to(score.dtype)
            order = (place - guarded * score.shape[1]).argsort(dim=1)
        # the sorted order cut at `keep` (ONNX Slice clamps, so a shorter input keeps all its tokens), then the kept
        # indices in ascending order
        return order[:, :keep].sort(dim=1).values

    def _head(self, sequence: torch.Tensor, positions: torch.Tensor | None) -> LATOutput:
        model = self.model
        if self._task == "qa":
            start, end = model.qa_outputs(sequence).split(1, dim=-1)
            return LATOutput(
                start_logits=start.squeeze(-1).contiguous(), end_logits=end.squeeze(-1).contiguous(), kept_positions=positions
            )
        if isinstance(model.classifier, nn.Linear):  # BERT: pooler -> dropout -> linear
            logits = model.classifier(model.dropout(model.base_model.pooler(sequence)))
        else:  # RoBERTa-style head pools [CLS] itself
            logits = model.classifier(sequence)
        return LATOutput(logits=logits, kept_positions=positions)


def _num_tokens(hidden: torch.Tensor) -> int:
    """Current token count as a Python int; a traced ONNX export bakes it in (export at the serving length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(hidden.shape[1])


class FixedLengthModel(nn.Module):
    """One length configuration (and optional layer mask) baked in; returns plain tuples for ONNX export.

    Export at the serving sequence length: which layers drop (and every TopK's K) is fixed at trace time.
    """

    def __init__(
        self,
        model: LengthAdaptiveModel,
        length_config: str | Sequence[int] | None,
        layer_mask: Sequence[bool] | None = None,
        start_layer: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.length_config = parse_length_config(length_config, model.num_layers, model.config.max_position_embeddings)
        if layer_mask is not None and len(layer_mask) != model.num_layers:
            raise ToolchainError(f"layer mask has {len(layer_mask)} entries, expected {model.num_layers}")
        self.layer_mask = None if layer_mask is None else tuple(bool(x) for x in layer_mask)
        self.start_layer = start_layer

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask[, token_type_ids]), by position or name; with a start layer (hidden_states,
        attention_mask) by position."""
        if self.start_layer:
            out = self.model.forward_from(self.start_layer, *inputs, self.length_config, self.layer_mask)
        else:
            out = self.model(*inputs, **named, length_config=self.length_config, layer_mask=self.layer_mask)
        return (out.start_logits, out.end_logits) if self.model.task == "qa" else (out.logits,)
