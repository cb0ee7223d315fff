"""`toolchain score` matches the official evaluate-v1.1.py arithmetic on a real dev slice."""

import json

from click.testing import CliRunner

from toolchain.cli import main
from toolchain.data import SQUAD_DEV_SLICE
from toolchain.data.squad import load_squad


def test_score_gold_answers_is_perfect_and_empty_is_zero(tmp_path):
    examples = load_squad(SQUAD_DEV_SLICE)
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({ex.id: ex.answers[0] for ex in examples}))
    out = CliRunner().invoke(main, ["score", "--data", str(SQUAD_DEV_SLICE), "--predictions", str(gold)])
    assert out.exit_code == 0 and json.loads(out.stdout) == {"exact_match": 100.0, "f1": 100.0}

    half = {ex.id: ex.answers[0] for ex in examples[: len(examples) // 2]}
    (tmp_path / "half.json").write_text(json.dumps(half))
    out = CliRunner().invoke(main, ["score", "--data", str(SQUAD_DEV_SLICE), "--predictions", str(tmp_path / "half.json")])
    scores = json.loads(out.stdout)
    assert abs(scores["f1"] - 100.0 * len(half) / len(examples)) < 1e-9
    assert "have no prediction" in out.stderr


def test_score_rejects_bad_predictions(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("[1, 2]")
    out = CliRunner().invoke(main, ["score", "--data", str(SQUAD_DEV_SLICE), "--predictions", str(bad)])
    assert out.exit_code == 2 and "must be a JSON object" in out.output
