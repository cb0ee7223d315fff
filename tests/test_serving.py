"""Serving a bundle needs only requirements-serve.txt: no PyTorch, no transformers."""

import json
import tomllib
from pathlib import Path

import pytest
from conftest import TRAINING_STACK, run_without_training_stack

from toolchain.data.tokenizer import TextTokenizer
from toolchain.errors import ToolchainError
from toolchain.models import default_model_dir
from toolchain.runtime import Bundle, QAPredictor

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("Who designed the tower?", "The tower was designed by Gustave Eiffel's company and built in 1889."),
             ("Where is it?", "The Eiffel Tower stands on the Champ de Mars in Paris, France. " * 12)]


def test_serving_requirements_are_pyprojects_pins():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "requirements-serve.txt").read_text().splitlines()]
    serve = [line for line in lines if line and not line.startswith("#")]
    assert serve and set(serve) <= set(pins)
    assert not {pin.split("=")[0].split(">")[0].split("<")[0].replace("-", "_") for pin in serve} & set(TRAINING_STACK)


@pytest.mark.timeout(180)
def test_predict_runs_without_the_training_stack(measured, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"question": q, "context": c}) + "\n" for q, c in QUESTIONS))
    result = run_without_training_stack("predict", "--bundle", str(measured), "--budget-ms", "8", "--requests",
                                        str(requests), "--threads", "1")
    assert result.returncode == 0, result.stderr
    want = QAPredictor(Bundle.load(measured, threads=1), budget_ms=8.0).predict_batch(QUESTIONS)
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [{**a, "score": pytest.approx(a["score"], abs=1e-4)} for a in want] == got
    assert all(a["answer"] for a in got)


@pytest.mark.timeout(120)
def test_commands_that_need_the_training_stack_say_which_package(measured):
    result = run_without_training_stack("bench", "--bundle", str(measured))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: `toolchain bench` needs the Python package 'torch', which is not installed (a serving-only install runs "
        "select and predict; install toolchain with its dependencies for the rest)"]


def test_text_tokenizer_load_errors(tmp_path):
    with pytest.raises(ToolchainError, match="no fast tokenizer"):
        TextTokenizer.load(tmp_path)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((default_model_dir() / "tokenizer.json").read_text())
    with pytest.raises(ToolchainError, match="has no padding token"):
        TextTokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "padding_side": "left"}))
    with pytest.raises(ToolchainError, match="pads on the right, not 'left'"):
        TextTokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "[PAD]"}}))
    tokenizer = TextTokenizer.load(folder)
    assert (tokenizer.pad_id, tokenizer.token_types, tokenizer.special_tokens(pair=True)) == (0, True, 3)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ToolchainError, match="unreadable"):
        TextTokenizer.load(folder)
