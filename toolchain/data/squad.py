"""SQuAD v1.1: reading, feature building with the fast tokenizer's offsets, and answer post-processing."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class SquadExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def _read_json(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolchainError(f"cannot read SQuAD file {path}: {e}") from None


def _examples_from_layout(data: dict, source: str) -> list[SquadExample]:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ToolchainError(f"{source} is not in SQuAD layout (expected a top-level 'data' list of articles)")
    examples = []
    try:
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa["answers"]
                    examples.append(SquadExample(
                        id=str(qa["id"]),
                        question=qa["question"].strip(),
                        context=context,
                        answers=tuple(a["text"] for a in answers),
                        answer_starts=tuple(int(a["answer_start"]) for a in answers),
                    ))
    except (KeyError, TypeError) as e:
        raise ToolchainError(f"{source} is not in SQuAD layout (missing field {e})") from None
    if not examples:
        raise ToolchainError(f"{source} holds no questions")
    return examples


def _examples_from_hub(name: str, split: str) -> list[SquadExample]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub is unreachable or the name is unknown
        raise ToolchainError(f"{name!r} is neither a SQuAD file nor a loadable dataset: {type(e).__name__}: {e}") from None
    return [
        SquadExample(str(r["id"]), r["question"].strip(), r["context"],
                     tuple(r["answers"]["text"]), tuple(int(s) for s in r["answers"]["answer_start"]))
        for r in ds
    ]


def load_squad(source: str | Path, split: str = "validation") -> list[SquadExample]:
    """Read SQuAD v1.1 examples from a .json/.json.gz file, or a hub dataset name (e.g. 'squad')."""
    path = Path(source)
    if path.is_file():
        return _examples_from_layout(_read_json(path), str(path))
    if path.suffix in (".json", ".gz") or path.is_dir() or str(source).startswith((".", "/", "~")):
        raise ToolchainError(f"SQuAD data file not found: {source}")
    return _examples_from_hub(str(source), split)


def gold_answers(examples: list[SquadExample]) -> dict[str, tuple[str, ...]]:
    return {ex.id: ex.answers for ex in examples}


@dataclass
class SquadFeatures:
    """Tokenized windows over (question, context); several per example when the context is long."""

    input_ids: np.ndarray  # [N, L] int64
    attention_mask: np.ndarray  # [N, L] int64
    token_type_ids: np.ndarray | None  # [N, L] int64
    example_index: np.ndarray  # [N] which example each window belongs to
    offsets: np.ndarray  # [N, L, 2] character span in the context, (-1, -1) for non-context tokens
    start_positions: np.ndarray  # [N] answer start token (0 = [CLS] when the answer is outside the window)
    end_positions: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def inputs(self, idx: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for a batch of features, as HF/ONNX input names."""
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[idx]
        return out


def check_lengths(max_seq_length: int, doc_stride: int) -> None:
    if max_seq_length <= 0 or doc_stride <= 0:
        raise ToolchainError(f"max_seq_length ({max_seq_length}) and doc_stride ({doc_stride}) must be positive")
    if doc_stride >= max_seq_length:
        raise ToolchainError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")


def _windows(tokenizer: TextTokenizer, examples: list[SquadExample], max_length: int, doc_stride: int,
             ) -> list[tuple[int, list[int], list[int] | None, np.ndarray]]:
    """Unpadded windows of max_length tokens over (question, context), consecutive ones sharing doc_stride context
    tokens: (index into `examples`, input ids, token type ids, offsets with (-1, -1) for non-context tokens)."""
    encodings = tokenizer.encode([(ex.question, ex.context) for ex in examples], max_length, "only_second", doc_stride)
    out = []
    for i, first in enumerate(encodings):
        for enc in (first, *first.overflowing):
            offsets = np.array([o if s == 1 else (-1, -1) for o, s in zip(enc.offsets, enc.sequence_ids)],
                               dtype=np.int64).reshape(-1, 2)
            out.append((i, enc.ids, enc.type_ids if tokenizer.token_types else None, offsets))
    return out


def _balanced(tokenizer, examples: list[SquadExample], windows: list, doc_stride: int) -> list:
    """`windows` with each context that needs k > 1 of them split again into k windows as short as that allows (the
    same overlap), instead of k - 1 full ones and a short last one."""
    by_example: dict[int, list] = {}
    for w in windows:
        by_example.setdefault(w[0], []).append(w)
    again: dict[int, list[int]] = {}  # window length -> the examples to split again at it
    for ex_idx, group in by_example.items():
        if (k := len(group)) > 1:
            context = [int((w[3][:, 0] >= 0).sum()) for w in group]
            total = sum(context) - (k - 1) * doc_stride  # the context's tokens
            # k windows of c context tokens cover k * c - (k - 1) * doc_stride of them
            length = -(-(total + (k - 1) * doc_stride) // k) + len(group[0][1]) - context[0]
            again.setdefault(length, []).append(ex_idx)
    for length, indices in again.items():
        for ex_idx in indices:
            by_example[ex_idx] = []
        for w in _windows(tokenizer, [examples[i] for i in indices], length, doc_stride):
            by_example[indices[w[0]]].append((indices[w[0]], *w[1:]))
    return [w for group in by_example.values() for w in group]


def build_features(examples: list[SquadExample], tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                   batch_size: int = 1000, balanced: bool = True) -> SquadFeatures:
    """Split each (question, context) into windows of at most max_seq_length tokens with doc_stride tokens of
    overlap, padded to max_seq_length.

    With `balanced` (for evaluation and inference), a context that needs k > 1 windows gets k windows of equal
    length rather than BERT's k - 1 full ones and a short last one (`balanced=False`, kept for training): a length
    configuration drops real tokens by a window's length, so it cut a full first window deeply and a short second
    one not at all, and the question's best span was then chosen between windows that no longer scored alike.
    The answer span is located through the fast tokenizer's offset mapping; windows that do not contain the whole
    answer point at [CLS] (index 0), as in BERT's SQuAD recipe.
    """
    check_lengths(max_seq_length, doc_stride)
    tokenizer = TextTokenizer.of(tokenizer)
    specials = tokenizer.special_tokens(pair=True)
    longest_q = max(len(enc.ids) for enc in tokenizer.encode([ex.question for ex in examples], special_tokens=False))
    if longest_q + specials + doc_stride >= max_seq_length:
        raise ToolchainError(
            f"max_seq_length ({max_seq_length}) too small: the longest question has {longest_q} tokens, plus "
            f"{specials} special tokens and doc_stride {doc_stride} leaves no room for context")
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "token_type_ids", "example_index",
                                                  "offsets", "start", "end")}
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        windows = _windows(tokenizer, chunk, max_seq_length, doc_stride)
        if balanced:
            windows = _balanced(tokenizer, chunk, windows, doc_stride)
        for ex_idx, ids, types, offsets in windows:
            ex = chunk[ex_idx]
            start = end = 0
            if ex.answers:
                a_start = ex.answer_starts[0]
                a_end = a_start + len(ex.answers[0])
                ctx = np.nonzero(offsets[:, 0] >= 0)[0]
                if offsets[ctx[0], 0] <= a_start and offsets[ctx[-1], 1] >= a_end:
                    start = int(ctx[np.nonzero(offsets[ctx, 0] <= a_start)[0][-1]])
                    end = int(ctx[np.nonzero(offsets[ctx, 1] >= a_end)[0][0]])
            pad = max_seq_length - len(ids)
            columns["input_ids"].append(ids + [tokenizer.pad_id] * pad)
            columns["attention_mask"].append([1] * len(ids) + [0] * pad)
            if types is not None:
                columns["token_type_ids"].append(types + [tokenizer.pad_type_id] * pad)
            columns["example_index"].append(b + ex_idx)
            columns["offsets"].append(np.pad(offsets, ((0, pad), (0, 0)), constant_values=-1))
            columns["start"].append(start)
            columns["end"].append(end)
    as_int = lambda k: np.asarray(columns[k], dtype=np.int64)  # noqa: E731
    return SquadFeatures(
        input_ids=as_int("input_ids"), attention_mask=as_int("attention_mask"),
        token_type_ids=as_int("token_type_ids") if columns["token_type_ids"] else None,
        example_index=as_int("example_index"), offsets=np.stack(columns["offsets"]),
        start_positions=as_int("start"), end_positions=as_int("end"),
    )


def postprocess(examples: list[SquadExample], features: SquadFeatures, start_logits: np.ndarray,
                end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30) -> dict[str, dict]:
    """Best answer span per example over all of its windows.

    Returns {question id: {"text", "score", "start", "end"}} (character offsets into the context);
    the score is start_logit + end_logit of the chosen span.
    """
    best: dict[int, tuple[float, int, int]] = {}
    for f in range(len(features)):
        offs = features.offsets[f]
        s_log, e_log = start_logits[f], end_logits[f]
        s_idx = np.argsort(s_log)[::-1][:n_best]
        e_idx = np.argsort(e_log)[::-1][:n_best]
        s, e = np.meshgrid(s_idx, e_idx, indexing="ij")
        valid = (offs[s, 0] >= 0) & (offs[e, 0] >= 0) & (e >= s) & (e - s + 1 <= max_answer_length)
        if not valid.any():
            continue
        scores = np.where(valid, s_log[s] + e_log[e], -np.inf)
        i, j = np.unravel_index(np.argmax(scores), scores.shape)
        cand = (float(scores[i, j]), int(offs[s[i, j], 0]), int(offs[e[i, j], 1]))
        ex = int(features.example_index[f])
        if ex not in best or cand[0] > best[ex][0]:
            best[ex] = cand
    out = {}
    for ex_idx, ex in enumerate(examples):
        score, c0, c1 = best.get(ex_idx, (float("-inf"), 0, 0))
        out[ex.id] = {"text": ex.context[c0:c1], "score": score, "start": c0, "end": c1}
    return out
