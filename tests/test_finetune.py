"""Fine-tuning on a tiny model: the loss goes down, checkpoints are standard HF folders, resume works."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.data import SQUAD_DEV_SLICE, SQUAD_TRAIN_SLICE, SST2_DEV_SLICE, SST2_TRAIN_SLICE
from toolchain.data.prepare import Columns
from toolchain.finetune import finetune
from toolchain.models import load_model, read_meta
from toolchain.training import GROUP_BATCHES, TrainConfig, epoch_order


def _run(tiny_model_dir, out, task="squad", **kw):
    args = dict(task=task, model_dir=tiny_model_dir, out_dir=out, max_eval_examples=16, doc_stride=32,
                device_name="cpu", columns=Columns())
    if task == "squad":
        args.update(train_path=SQUAD_TRAIN_SLICE, eval_path=SQUAD_DEV_SLICE, max_train_examples=16, max_seq_length=96)
    else:
        args.update(train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, max_train_examples=64, max_seq_length=32)
    args.update(kw)
    return finetune(**args)


def test_squad_finetune_lowers_loss_and_writes_hf_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "ft"
    metrics = _run(tiny_model_dir, out, cfg=TrainConfig(epochs=6, lr=2e-3, batch_size=8, warmup_ratio=0.0))
    assert metrics["loss_last_20"] < 0.8 * metrics["loss_first"]
    assert {"exact_match", "f1", "questions"} <= metrics.keys() and metrics["questions"] == 16
    for name in ("model.safetensors", "config.json", "tokenizer.json", "toolchain.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert read_meta(out)["task"] == "squad"
    assert json.loads((out / "metrics.json").read_text())["f1"] == metrics["f1"]
    # the checkpoint reloads with plain transformers and holds the trained weights
    from transformers import AutoModelForQuestionAnswering

    reloaded = AutoModelForQuestionAnswering.from_pretrained(out)
    assert not torch.equal(reloaded.qa_outputs.weight, load_model(tiny_model_dir, "squad").qa_outputs.weight)
    assert not list(tmp_path.glob(".ft*")), "temp / resume folders must be cleaned up"


def test_classify_finetune_lowers_loss(tiny_model_dir, tmp_path):
    metrics = _run(tiny_model_dir, tmp_path / "cls", task="classify", max_train_examples=32,
                   cfg=TrainConfig(epochs=30, lr=3e-3, batch_size=16, warmup_ratio=0.0))
    assert metrics["loss_last_20"] < 0.8 * metrics["loss_first"]
    assert 0 <= metrics["accuracy"] <= 100 and metrics["examples"] == 16
    assert read_meta(tmp_path / "cls")["labels"] == ["0", "1"]


def test_epoch_order_groups_rows_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 385, 16 * GROUP_BATCHES * 2 + 7)
    plain = epoch_order(lengths, 16, seed=3, group_by_length=False)
    assert np.array_equal(plain, np.random.default_rng(3).permutation(len(lengths)))  # the order before grouping
    grouped = epoch_order(lengths, 16, seed=3, group_by_length=True)
    assert np.array_equal(np.sort(grouped), np.arange(len(lengths)))  # every row once
    assert np.array_equal(grouped, epoch_order(lengths, 16, seed=3, group_by_length=True))
    assert not np.array_equal(grouped, epoch_order(lengths, 16, seed=4, group_by_length=True))

    def padded(order):  # tokens a pass costs when every batch is cut to its longest row
        return sum(lengths[order[i:i + 16]].max() * len(order[i:i + 16]) for i in range(0, len(order), 16))

    assert padded(grouped) < 0.7 * padded(plain)
    last_window = plain[16 * GROUP_BATCHES * 2:]  # the short batch stays last: the last window's shortest rows
    assert np.array_equal(np.sort(lengths[grouped[-7:]]), np.sort(lengths[last_window]))
    firsts = [lengths[grouped[i:i + 16]].max() for i in range(0, 16 * GROUP_BATCHES, 16)]
    assert firsts != sorted(firsts, reverse=True)  # batches are shuffled, not served longest first


def test_training_batches_are_cut_to_their_longest_row(tiny_model_dir, tmp_path):
    """Each step sees its batch without the padding columns all its rows share."""
    import toolchain.finetune as ft

    widths, real = [], ft.hf_loss

    def spy(model, batch):
        mask = batch["attention_mask"]
        widths.append((mask.shape[1], int(mask.sum(1).max())))
        return real(model, batch)

    ft.hf_loss = spy
    try:
        _run(tiny_model_dir, tmp_path / "ft", cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=4))
    finally:
        ft.hf_loss = real
    assert widths and all(width == longest for width, longest in widths)
    assert min(w for w, _ in widths) < 96  # the data was padded to 96


def test_resume_continues_from_saved_state(tiny_model_dir, tmp_path):
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=8, save_steps=1)
    full = _run(tiny_model_dir, tmp_path / "a", cfg=cfg)
    # interrupt a second run after 2 steps by making the loss function raise, then resume it
    import toolchain.finetune as ft

    calls = {"n": 0}
    real = ft.hf_loss

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, batch)

    ft.hf_loss = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_model_dir, tmp_path / "b", cfg=cfg)
    finally:
        ft.hf_loss = real
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.partial" / "state.pt").is_file()
    resumed = _run(tiny_model_dir, tmp_path / "b", cfg=cfg, resume=True)
    assert resumed["steps"] == full["steps"]
    assert resumed["loss_last_20"] == pytest.approx(full["loss_last_20"], rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--task", "ner"], "Invalid value for '--task'"),
    (["--task", "squad", "--max-train-examples", "0"], "0 is not in the range x>=1"),
    (["--task", "squad", "--max-eval-examples", "-3"], "is not in the range x>=1"),
    (["--task", "squad", "--train-data", "/nonexistent/train.json"], "SQuAD data file not found"),
    (["--task", "squad", "--model", "/nonexistent/model"], "model directory not found"),
    (["--task", "squad", "--doc-stride", "384"], "doc_stride (384) must be smaller than max_seq_length (384)"),
    (["--task", "squad", "--max-seq-length", "20", "--doc-stride", "4"], "max_seq_length (20) too small"),
    (["--task", "squad", "--device", "cuda"], "no CUDA GPU is available"),
    (["--task", "classify", "--max-seq-length", "1000"], "max_seq_length must be an integer in 1..512"),
    (["--task", "classify", "--label-column", "stars"], "no column 'stars'"),
])
def test_bad_inputs_fail_cleanly(tmp_path, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["finetune", *args, "--out", str(out), "--max-train-examples", "4"]
                                if "--max-train-examples" not in args else ["finetune", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) <= 4 and "Traceback" not in result.output
    assert not out.exists()


def test_unreadable_model_dir(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    (bad / "model.safetensors").write_bytes(b"junk")
    (bad / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(main, ["finetune", "--task", "squad", "--model", str(bad), "--out",
                                       str(tmp_path / "o"), "--max-train-examples", "4"])
    assert result.exit_code == 2 and "cannot load" in result.output, result.output


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["finetune", "--task", "squad", "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_same_seed_same_model_whatever_came_before(tiny_model_dir, tmp_path):
    """A base encoder's new task head is initialised from the run's seed, not from the global RNG state."""
    import shutil

    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    base = tmp_path / "base"  # an encoder without a QA head, like the packaged MiniLM
    BertModel(BertConfig.from_pretrained(tiny_model_dir)).save_pretrained(base)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, base / f.name)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=8)
    weights = []
    for name in ("a", "b"):
        torch.rand(7)  # move the global RNG between the runs
        _run(base, tmp_path / name, cfg=cfg)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
