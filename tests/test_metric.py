"""The SQuAD v1.1 metric against hand-computed values."""

import pytest

from toolchain.data.metric import exact_match_score, f1_score, normalize_answer, squad_scores


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an  apple, a pear!  ", "apple pear"),
    ("Theater", "theater"),  # 'the' inside a word is not an article
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_ignores_articles_case_punctuation():
    assert exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_partial_overlap():
    # pred tokens {denver, broncos, team}, gold {denver, broncos}: P=2/3, R=1, F1=0.8
    assert f1_score("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1, a1], gold [a1]: common 1, P=1/2, R=1
    assert f1_score("paris paris", "paris") == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero():
    assert f1_score("", "Denver") == 0.0
    assert exact_match_score("", "Denver") == 0.0


def test_article_only_answers():
    # both normalize to empty: EM 1, but F1 has no common tokens -> 0 (official behaviour)
    assert exact_match_score("the", "a") == 1.0
    assert f1_score("the", "a") == 0.0


def test_max_over_gold_answers_and_missing_predictions():
    gold = {"q1": ("Denver Broncos", "Broncos"), "q2": ("1990",), "q3": ("blue",)}
    preds = {"q1": "broncos", "q2": "in 1990"}  # q3 unanswered: counts as 0
    scores = squad_scores(gold, preds)
    # q1: EM 1 (second gold), F1 1; q2: EM 0, F1 = 2*(1/2*1)/(1/2+1) = 2/3; q3: 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
