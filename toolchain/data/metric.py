"""The official SQuAD v1.1 exact-match and F1 (same definitions as evaluate-v1.1.py)."""

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles (a, an, the) and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def question_scores(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> tuple[list[float], list[float]]:
    """Per-question EM and F1 (0 or 1, and in [0, 1]; max over its gold answers) in the order of `gold`.

    A question without a prediction scores 0, as in the official script.
    """
    em, f1 = [], []
    for qid, answers in gold.items():
        pred = predictions.get(qid)
        em.append(0.0 if pred is None else max(exact_match_score(pred, a) for a in answers))
        f1.append(0.0 if pred is None else max(f1_score(pred, a) for a in answers))
    return em, f1


def squad_scores(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """EM/F1 in percent over every question in `gold` (max over its gold answers)."""
    em, f1 = question_scores(gold, predictions)
    n = max(len(gold), 1)
    return {"exact_match": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n}
