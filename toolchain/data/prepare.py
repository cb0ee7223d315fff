"""Task data as model-ready arrays: read, subsample deterministically, tokenize."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.data import classify, squad
from toolchain.evaluate import take


@dataclass(frozen=True)
class Columns:
    """Where the text and label sit in a classification file."""

    text: tuple[str, ...] = ("sentence",)
    label: str = "label"
    header: bool = True

    @classmethod
    def parse(cls, text: str, label: str, header: bool) -> "Columns":
        return cls(tuple(c.strip() for c in text.split(",") if c.strip()), label, header)

    @classmethod
    def from_meta(cls, meta: dict) -> "Columns":
        """The columns a checkpoint was trained with (its toolchain.json), or the SST-2 defaults."""
        saved = meta.get("columns") or {}
        return cls(tuple(saved.get("text", ("sentence",))), saved.get("label", "label"), saved.get("header", True))


def squad_split(path: str | Path, tokenizer, max_seq_length: int, doc_stride: int, n: int | None = None,
                seed: int = 0, split: str = "validation", skip: int = 0, balanced: bool = True,
                ) -> tuple[list[squad.SquadExample], squad.SquadFeatures]:
    """`n` questions (after skipping `skip`) of a seeded permutation, and their features (`balanced` windows for
    evaluation, BERT's for training: `squad.build_features`)."""
    examples = take(squad.load_squad(path, split=split), n, seed, skip)
    return examples, squad.build_features(examples, tokenizer, max_seq_length, doc_stride, balanced=balanced)


def squad_train_arrays(features: squad.SquadFeatures) -> dict[str, np.ndarray]:
    return {**features.inputs(slice(None)), "start_positions": features.start_positions,
            "end_positions": features.end_positions}


def classify_split(path: str | Path, tokenizer, max_seq_length: int, labels: list[str] | None, columns: Columns,
                   n: int | None = None, seed: int = 0, skip: int = 0) -> tuple[list[str], dict[str, np.ndarray]]:
    """(labels, arrays with input_ids/attention_mask/token_type_ids/labels); labels are read from the data if not given."""
    examples = take(classify.load_classification(path, columns.text, columns.label, columns.header), n, seed, skip)
    labels = labels or classify.label_list(examples)
    return labels, classify.encode(examples, tokenizer, max_seq_length, labels)


def sample_inputs(task: str, tokenizer, seq: int, batch: int, doc_stride: int = 128) -> dict[str, np.ndarray]:
    """`batch` rows of real model inputs at length `seq` from the packaged dev slice (rows repeat if needed).

    For parity checks and latency probes: SQuAD windows (stride capped at seq // 2) or SST-2 sentences.
    """
    from toolchain.data import SQUAD_DEV_SLICE, SST2_DEV_SLICE

    n = min(batch, 8)
    if task == "squad":
        rows = squad_split(SQUAD_DEV_SLICE, tokenizer, seq, min(doc_stride, seq // 2), n)[1].inputs(slice(None))
    else:
        rows = classify_split(SST2_DEV_SLICE, tokenizer, seq, None, Columns(), n)[1]
    idx = np.arange(batch) % len(rows["input_ids"])
    return {k: np.ascontiguousarray(v[idx]) for k, v in rows.items() if k != "labels"}
