"""GLUE-style classification data: TSV/CSV, one or two text columns, a label column, header or not."""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class ClassifyExample:
    text: str
    text_pair: str | None
    label: str


def _column_index(header: list[str] | None, name: str, path: Path) -> int:
    if header is not None and name in header:
        return header.index(name)
    if name.isdigit() and (header is None or int(name) < len(header)):
        return int(name)
    known = f"; columns are {header}" if header else " (file has no header: use 0-based column numbers)"
    raise ToolchainError(f"{path}: no column {name!r}{known}")


def load_classification(path: str | Path, text_columns: tuple[str, ...] = ("sentence",),
                        label_column: str = "label", header: bool = True,
                        delimiter: str | None = None) -> list[ClassifyExample]:
    """Read a TSV/CSV (optionally .gz) classification file.

    Columns are named (with a header) or 0-based numbers; the delimiter defaults to a tab for
    .tsv and a comma otherwise. Rows with fewer fields than needed are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"classification data file not found: {path}")
    if not 1 <= len(text_columns) <= 2:
        raise ToolchainError(f"give one or two text columns, not {len(text_columns)}")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    delimiter = delimiter or ("\t" if name.endswith(".tsv") else ",")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            rows = [r for r in csv.reader(f, delimiter=delimiter, quoting=quoting, escapechar="\\" if delimiter == "\t" else None) if r]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ToolchainError(f"cannot read classification file {path}: {e}") from None
    head = rows.pop(0) if header and rows else None
    cols = [_column_index(head, c, path) for c in text_columns]
    label_idx = _column_index(head, label_column, path)
    need = max(cols + [label_idx]) + 1
    examples = []
    for line_no, row in enumerate(rows, start=2 if header else 1):
        if len(row) < need:
            raise ToolchainError(f"{path}:{line_no}: expected at least {need} fields, found {len(row)}")
        examples.append(ClassifyExample(row[cols[0]].strip(), row[cols[1]].strip() if len(cols) == 2 else None,
                                        row[label_idx].strip()))
    if not examples:
        raise ToolchainError(f"{path} holds no examples")
    return examples


def label_list(examples: list[ClassifyExample]) -> list[str]:
    """Sorted distinct labels (numeric labels sort numerically)."""
    labels = {ex.label for ex in examples}
    return sorted(labels, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def encode(examples: list[ClassifyExample], tokenizer, max_seq_length: int, labels: list[str]) -> dict:
    """Tokenize to fixed-length int64 arrays plus integer labels (index into `labels`)."""
    import numpy as np

    unknown = {ex.label for ex in examples} - set(labels)
    if unknown:
        raise ToolchainError(f"labels {sorted(unknown)} are not among the model's labels {labels}")
    out = encode_texts(tokenizer, [ex.text if ex.text_pair is None else (ex.text, ex.text_pair) for ex in examples],
                       max_seq_length)
    out["labels"] = np.array([labels.index(ex.label) for ex in examples], dtype=np.int64)
    return out


def encode_texts(tokenizer, texts: list[str | tuple[str, str]], max_seq_length: int) -> dict:
    """Texts or (text, text pair)s as int64 arrays input_ids, attention_mask (and token_type_ids where the model takes
    them), truncated (longest first) and padded to `max_seq_length` tokens."""
    import numpy as np

    tokenizer = TextTokenizer.of(tokenizer)
    encodings = tokenizer.encode(texts, max_seq_length, pad=True)
    out = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
    if tokenizer.token_types:
        out["token_type_ids"] = [e.type_ids for e in encodings]
    return {k: np.array(v, dtype=np.int64).reshape(len(encodings), max_seq_length) for k, v in out.items()}
