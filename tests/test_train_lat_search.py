"""Drop-and-Restore training (sandwich rule) and the evolutionary search, on a tiny model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from toolchain.cli import main
from toolchain.data import SQUAD_DEV_SLICE, SQUAD_TRAIN_SLICE, SST2_DEV_SLICE, SST2_TRAIN_SLICE
from toolchain.data import prepare
from toolchain.data.prepare import Columns
from toolchain.errors import ToolchainError
from toolchain.finetune import finetune
from toolchain.lat import PROTECT_ANSWERS
from toolchain.search import SearchConfig, crossover, mutate, pareto_front, search
from toolchain.train_lat import SandwichConfig, sandwich_loss_fn, train_lat
from toolchain.training import TrainConfig


@pytest.fixture(scope="module")
def tiny_ft(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "ft"
    finetune(task="squad", model_dir=tiny_model_dir, train_path=SQUAD_TRAIN_SLICE, eval_path=SQUAD_DEV_SLICE,
             out_dir=out, max_train_examples=16, max_eval_examples=8, max_seq_length=64, doc_stride=16,
             cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), device_name="cpu", columns=Columns())
    return out


@pytest.fixture(scope="module")
def tiny_lat(tiny_ft):
    out = tiny_ft.parent / "lat"
    train_lat(model_dir=tiny_ft, train_path=SQUAD_TRAIN_SLICE, eval_path=SQUAD_DEV_SLICE, out_dir=out,
              max_train_examples=16, max_eval_examples=8, cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8),
              sandwich=SandwichConfig(), device_name="cpu")
    return out


@pytest.mark.parametrize("drop_at, smallest", [("padded", (52, 42)), ("real", (32, 26))])
def test_one_step_runs_every_sandwich_pass(tiny_ft, drop_at, smallest):
    from toolchain.train_lat import load_length_adaptive

    model, _, _ = load_length_adaptive(tiny_ft)
    seen = []
    forward = model.forward

    def spy(*args, **kw):
        seen.append((kw.get("length_config"), kw.get("layer_mask")))
        return forward(*args, **kw)

    model.forward = spy
    torch.manual_seed(0)
    # a batch cut to 48 tokens of data padded to 64, its rows 40 and 30 real tokens long: configurations are
    # drawn at 64 (LAT) or at the batch's 40 real tokens
    mask = (torch.arange(48) < torch.tensor([[40], [30]])).long()
    batch = {"input_ids": torch.randint(1000, 2000, (2, 48)), "attention_mask": mask,
             "token_type_ids": torch.zeros(2, 48, dtype=torch.long),
             "start_positions": torch.tensor([3, 5]), "end_positions": torch.tensor([4, 9])}
    loss = sandwich_loss_fn(SandwichConfig(num_sandwich=2, drop_at=drop_at), seed=0, max_seq_length=64)(model, batch)
    loss.backward()
    assert len(seen) == 4 and seen[0] == (None, None)  # full model first, then smallest + 2 random
    assert seen[1][0] == smallest  # smallest: ceil(prev * 0.8) at every layer
    for cfg, mask in seen[1:]:
        assert all(a >= b for a, b in zip(cfg, cfg[1:])) and cfg[0] <= (64 if drop_at == "padded" else 40)
        assert len(mask) == 2
    assert model.hf_model.qa_outputs.weight.grad is not None and torch.isfinite(loss)


def test_sub_models_drawn_inside_a_mac_band(tiny_ft, tmp_path):
    import random

    from toolchain.lat import sample_length_config
    from toolchain.macs import count_macs
    from toolchain.train_lat import load_length_adaptive, sample_sub_config

    model, _, _ = load_length_adaptive(tiny_ft)
    full = count_macs(model.config, None, 64)
    # the default band keeps LAT's random stream: the very configurations LAT's sampler draws
    a, b = random.Random(3), random.Random(3)
    assert [sample_sub_config(model, SandwichConfig(length_drop_ratio_bound=0.35), 64, a) for _ in range(20)] == \
        [sample_length_config(2, 64, 0.35, b) for _ in range(20)]
    band = SandwichConfig(length_drop_ratio_bound=0.35, sub_macs_band=(0.7, 0.8))
    ratios = [count_macs(model.config, sample_sub_config(model, band, 64, a), 64) / full for _ in range(50)]
    assert all(0.7 <= r <= 0.8 for r in ratios) and len(set(ratios)) > 1
    # at bound 0.2 no 2-layer sub-model goes below 82% of the MACs: a band under it admits nothing, before any output
    for bad, message in (((0.1, 0.2), "no sub-model sampled"), ((0.6, 0.5), "0 <= min < max <= 1")):
        res = CliRunner().invoke(main, ["train-lat", "--model", str(tiny_ft), "--out", str(tmp_path / "out"),
                                        "--sub-min-macs-ratio", str(bad[0]), "--sub-max-macs-ratio", str(bad[1]),
                                        "--max-train-examples", "8", "--device", "cpu"])
        assert res.exit_code != 0 and message in res.output, res.output
    assert not list(tmp_path.iterdir())


def test_train_lat_writes_length_adaptive_checkpoint(tiny_lat):
    meta = json.loads((tiny_lat / "toolchain.json").read_text())
    assert meta["length_adaptive"] is True and meta["keep_cls"] is False
    metrics = json.loads((tiny_lat / "metrics.json").read_text())
    assert metrics["steps"] >= 2 and "f1" in metrics and metrics["loss_last_20"] > 0


def test_mutation_and_crossover_stay_valid():
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = mutate((60, 50, 40, 30), 0.5, rng, 64)
        b = crossover(a, (64, 20, 10, 5), rng)
        for c in (a, b):
            assert all(x >= y for x, y in zip(c, c[1:])) and 1 <= c[-1] and c[0] <= 64


def test_pareto_front_is_non_dominated():
    points = {(1,): (10, 50.0), (2,): (20, 60.0), (3,): (15, 40.0), (4,): (30, 55.0), (5,): (5, 20.0)}
    assert pareto_front(points) == [(5,), (1,), (2,)]


def test_tiny_search_produces_valid_frontier_and_resumes_from_cache(tiny_lat, tmp_path):
    cfg = SearchConfig(iterations=2, population=4, parents=3, mutations=3, crossovers=3, seed=1)
    kwargs = dict(model_dir=tiny_lat, eval_path=SQUAD_DEV_SLICE, search_examples=10, report_examples=10,
                  device_name="cpu", batch_size=16)
    result = search(out_dir=tmp_path / "s", cfg=cfg, **kwargs)
    front = result["frontier"]
    assert front and (tmp_path / "s" / "pareto.png").is_file()
    on_disk = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert on_disk["frontier"] == front and on_disk["protect_answers"] == PROTECT_ANSWERS
    for p in front:
        lc = p["length_config"]
        assert len(lc) == 2 and all(a >= b for a, b in zip(lc, lc[1:]))
    # non-dominated: MACs strictly increase along the frontier and so does the search F1
    for a, b in zip(front, front[1:]):
        assert a["macs"] < b["macs"] and a["search"]["f1"] < b["search"]["f1"]
    assert result["evaluated"] >= 4
    # the report split's cache keeps per-question F1s; each frontier point's gap to full length has a paired error
    rows = {tuple(r["length_config"]): r for r in map(json.loads, (tmp_path / "s" / "report-cache.jsonl").open())}
    full = rows[()]
    assert len(full["scores"]) == 10 and abs(sum(full["scores"]) / 10 - full["metrics"]["f1"]) < 0.01
    for p in front:
        diff = np.array(rows[tuple(p["length_config"])]["scores"]) - np.array(full["scores"])
        assert p["report_gap"]["gap"] == pytest.approx(p["report"]["f1"] - result["full"]["report"]["f1"])
        assert p["report_gap"]["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(10), abs=1e-3)
    # a search resumed with both splits' caches evaluates nothing; with the search split's only, just the report split
    partial = tmp_path / ".s2.partial"
    partial.mkdir()
    for name in ("search-cache.jsonl", "report-cache.jsonl"):
        (partial / name).write_text((tmp_path / "s" / name).read_text())
    import toolchain.search as s

    calls = {"n": 0}
    real = s.squad_metrics

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    s.squad_metrics = counting
    try:
        again = search(out_dir=tmp_path / "s2", cfg=cfg, resume=True, **kwargs)
        assert calls["n"] == 0
        partial = tmp_path / ".s3.partial"
        partial.mkdir()
        (partial / "search-cache.jsonl").write_text((tmp_path / "s" / "search-cache.jsonl").read_text())
        search(out_dir=tmp_path / "s3", cfg=cfg, resume=True, **kwargs)
    finally:
        s.squad_metrics = real
    assert again["frontier"] == result["frontier"]
    assert calls["n"] == 1 + len(front)  # full length and every frontier point on the report split


def _prefix_matches_whole_graph(model_dir, eval_path, seq: int) -> None:
    """A row starts at the first layer that cuts any of its real tokens (or takes full length's outputs when none
    does); its outputs must be what the configuration's whole graph gives it, and the score the PyTorch scorer's."""
    from toolchain.evaluate import run_batches
    from toolchain.export import ort_runner
    from toolchain.search import Scorer, dev_split, score_of
    from toolchain.train_lat import load_length_adaptive

    model, tok, meta = load_length_adaptive(model_dir, require_lat=True)
    split = dev_split(eval_path, tok, meta, seq, 40)
    qa = meta["task"] == "squad"
    mask = split[1].attention_mask if qa else split["attention_mask"]
    real = mask.sum(1)
    cfg = (int(np.percentile(real, 40)), int(np.percentile(real, 20)))
    starts = (np.asarray(cfg)[None, :] >= real[:, None]).cumprod(1).sum(1)
    assert set(starts) == {0, 1, 2}  # rows cut at the first layer, at the second only, and never
    scorer = Scorer(model, meta["task"], split, torch.device("cpu"), None, batch_size=16, engine="ort")
    inputs = split[1].inputs if qa else (lambda idx: {k: v[idx] for k, v in split.items() if k != "labels"})
    want = run_batches(ort_runner(model, cfg, inputs(slice(0, 2))), inputs, len(real), 16, per_token=qa)
    for got, w in zip(scorer._outputs(cfg), want):
        if qa:  # beyond the real tokens each batch's own padding width decides
            got, w = got[mask == 1], w[mask == 1]
        assert np.abs(got - w).max() < 1e-4
    torch_scorer = Scorer(model, meta["task"], split, torch.device("cpu"), None, batch_size=16, engine="torch")
    assert score_of(scorer(cfg)) == pytest.approx(score_of(torch_scorer(cfg)))


def test_scoring_from_full_length_states_matches_the_whole_graph_squad(tiny_lat):
    _prefix_matches_whole_graph(tiny_lat, SQUAD_DEV_SLICE, 128)  # at 128 the windows' real lengths spread (48-128)


def test_scoring_from_full_length_states_matches_the_whole_graph_classify(tiny_model_dir, tmp_path):
    ft, lat = tmp_path / "ft", tmp_path / "lat"
    finetune(task="classify", model_dir=tiny_model_dir, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE,
             out_dir=ft, max_train_examples=32, max_eval_examples=8, max_seq_length=64, doc_stride=16,
             cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), device_name="cpu", columns=Columns())
    train_lat(model_dir=ft, train_path=SST2_TRAIN_SLICE, eval_path=SST2_DEV_SLICE, out_dir=lat, max_train_examples=16,
              max_eval_examples=8, cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), sandwich=SandwichConfig(),
              device_name="cpu")
    _prefix_matches_whole_graph(lat, SST2_DEV_SLICE, 64)


def test_search_real_cost_counts_the_split_at_its_real_lengths(tiny_lat, tmp_path):
    from transformers import AutoConfig

    from toolchain.macs import count_macs, expected_macs

    cfg = SearchConfig(iterations=1, population=4, parents=2, mutations=2, crossovers=2, seed=3, cost="real")
    result = search(model_dir=tiny_lat, eval_path=SQUAD_DEV_SLICE, out_dir=tmp_path / "r", search_examples=10,
                    report_examples=10, cfg=cfg, device_name="cpu", batch_size=16)
    assert result["cost"] == "real" and result["search_config"]["cost"] == "real"
    config, seq = AutoConfig.from_pretrained(tiny_lat), result["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_lat)
    meta = json.loads((tiny_lat / "toolchain.json").read_text())
    _, features = prepare.squad_split(SQUAD_DEV_SLICE, tokenizer, seq, meta["doc_stride"], 10)
    lengths = features.attention_mask.sum(1)
    assert lengths.min() < seq  # some of the slice's windows are padded, so the real cost is below the padded one
    assert result["full"]["macs"] == round(expected_macs(config, None, lengths)) < count_macs(config, None, seq)
    for p in result["frontier"]:
        lc = tuple(p["length_config"])
        assert p["macs"] == round(expected_macs(config, lc, lengths))
        assert p["macs_ratio"] == pytest.approx(p["macs"] / result["full"]["macs"])
    with pytest.raises(ToolchainError, match="unknown cost 'tokens'"):
        SearchConfig(cost="tokens").validate()


def test_search_bad_inputs(tiny_ft, tiny_lat, tmp_path):
    with pytest.raises(ToolchainError, match="not length-adaptive"):
        search(model_dir=tiny_ft, eval_path=SQUAD_DEV_SLICE, out_dir=tmp_path / "x", search_examples=5,
               report_examples=5, cfg=SearchConfig(iterations=1), device_name="cpu")
    with pytest.raises(ToolchainError, match="admit no configuration"):
        search(model_dir=tiny_lat, eval_path=SQUAD_DEV_SLICE, out_dir=tmp_path / "y", search_examples=5,
               report_examples=5, cfg=SearchConfig(iterations=1, min_macs_ratio=0.01, max_macs_ratio=0.02),
               device_name="cpu")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("cfg, message", [
    ("1,2", "must be non-increasing"),
    ("64,30,20", "has 3 entries, expected 2"),
    ("64,0", "must be positive"),
    ("65,30", "above max_seq_length"),
    ("sixty,30", "is not an integer"),
])
def test_macs_cli_rejects_bad_length_configs(tiny_lat, cfg, message):
    result = CliRunner().invoke(main, ["macs", "--model", str(tiny_lat), "--length-cfg", cfg, "--max-seq-length", "64"])
    assert result.exit_code == 2 and message in result.output


def test_macs_cli_prints_integer_last(tiny_lat):
    result = CliRunner().invoke(main, ["macs", "--arch", "minilm-l6-h384"])
    assert result.exit_code == 0 and abs(int(result.output.strip().splitlines()[-1]) - 4.76e9) / 4.76e9 < 0.01


def test_choose_by_tolerance_or_mac_target():
    from toolchain.search import choose

    front = [{"macs": m, "macs_ratio": m / 100, "search": {"f1": f}} for m, f in ((40, 40.0), (50, 47.0), (60, 49.5), (80, 50.0))]
    assert choose(front, 50.0, tolerance=1.0)["macs"] == 60  # cheapest within 1 point of full
    assert choose(front, 50.0, tolerance=0.1)["macs"] == 80
    assert choose(front, 60.0, tolerance=1.0) is None
    assert choose(front, 50.0, target_macs_ratio=0.55)["macs"] == 50  # most accurate at <= 55% MACs
    assert choose(front, 50.0, target_macs_ratio=0.3) is None


def test_selection_split_rescores_the_best_at_the_target_and_chooses_on_both_splits(tiny_lat, tmp_path):
    from toolchain.search import pooled_score, select

    assert pooled_score({"f1": 60.0, "questions": 1000}, {"f1": 66.0, "questions": 2000}) == 64.0
    lucky = {"search": {"f1": 70.0, "questions": 10}, "select": {"f1": 50.0, "questions": 30}}
    steady = {"search": {"f1": 65.0, "questions": 10}, "select": {"f1": 60.0, "questions": 30}}
    assert select([lucky, steady]) is steady and select([]) is None

    cfg = SearchConfig(iterations=1, population=4, parents=2, mutations=3, crossovers=3, seed=1)
    kwargs = dict(model_dir=tiny_lat, eval_path=SQUAD_DEV_SLICE, search_examples=10, report_examples=10,
                  cfg=cfg, device_name="cpu", batch_size=16)
    with pytest.raises(ToolchainError, match="needs --target-macs-ratio"):
        search(out_dir=tmp_path / "x", select_examples=10, **kwargs)
    result = search(out_dir=tmp_path / "s", target_macs_ratio=0.9, select_examples=12, select_top=3, **kwargs)
    # the candidates: the 3 most accurate evaluated configurations at <= 90% MACs on the search split, best first
    from transformers import AutoConfig

    from toolchain.macs import count_macs

    config, seq, full = AutoConfig.from_pretrained(tiny_lat), result["max_seq_length"], result["full"]["macs"]
    cache = [json.loads(line) for line in (tmp_path / "s" / "search-cache.jsonl").read_text().splitlines()]
    at_target = [r for r in cache if r["length_config"] and count_macs(config, r["length_config"], seq) <= 0.9 * full]
    expected = sorted(at_target, key=lambda r: -r["metrics"]["f1"])[:3]
    candidates = result["selection"]["candidates"]
    assert len(at_target) > 3 and [p["length_config"] for p in candidates] == [r["length_config"] for r in expected]
    assert all(p["select"]["questions"] == 12 and p["search"]["questions"] == 10 for p in candidates)
    best = max(candidates, key=lambda p: pooled_score(p["search"], p["select"]))
    assert result["chosen"]["length_config"] == best["length_config"]
    assert result["chosen"]["report"]["questions"] == 10 and result["selection"]["full"]["questions"] == 12
    assert (tmp_path / "s" / "select-cache.jsonl").is_file() and result["splits"]["select_examples"] == 12


def test_ort_engine_scores_like_pytorch(tiny_lat):
    from toolchain.data import prepare
    from toolchain.evaluate import torch_runner
    from toolchain.export import ort_runner
    from toolchain.search import Scorer
    from toolchain.train_lat import load_length_adaptive

    model, tokenizer, _ = load_length_adaptive(tiny_lat)
    split = prepare.squad_split(SQUAD_DEV_SLICE, tokenizer, 64, 16, 12)
    feed = split[1].inputs(slice(0, 6))
    for cfg in (None, (40, 17)):
        got = ort_runner(model, cfg, split[1].inputs(slice(0, 2)))(feed)
        want = torch_runner(model, "cpu", length_config=cfg)(feed)
        assert max(float(abs(g - w).max()) for g, w in zip(got, want)) <= 1e-4
        scores = [Scorer(model, "squad", split, torch.device("cpu"), None, 4, engine)(cfg) for engine in ("ort", "torch")]
        assert abs(scores[0]["f1"] - scores[1]["f1"]) < 1e-6 and scores[0]["questions"] == 12


def test_train_lat_at_another_length_on_new_questions(tiny_ft, tmp_path):
    kwargs = dict(model_dir=tiny_ft, train_path=SQUAD_TRAIN_SLICE, eval_path=SQUAD_DEV_SLICE, max_train_examples=8,
                  max_eval_examples=4, cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8), sandwich=SandwichConfig(),
                  device_name="cpu")
    summary = train_lat(out_dir=tmp_path / "a", max_seq_length=48, train_skip=16, **kwargs)
    meta = json.loads((tmp_path / "a" / "toolchain.json").read_text())
    assert meta["max_seq_length"] == 48 and meta["train_lat"]["train_skip"] == 16 and summary["steps"] >= 1
    with pytest.raises(ToolchainError, match="max_seq_length must be an integer"):
        train_lat(out_dir=tmp_path / "b", max_seq_length=100_000, **kwargs)
    with pytest.raises(ToolchainError, match="after skipping"):
        train_lat(out_dir=tmp_path / "c", train_skip=10_000, **kwargs)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_eval_cli_reproduces_the_searchs_scores_at_length_configs(tiny_lat, tmp_path, monkeypatch):
    cfg = SearchConfig(iterations=1, population=3, parents=2, mutations=2, crossovers=2, seed=3)
    result = search(model_dir=tiny_lat, eval_path=SQUAD_DEV_SLICE, out_dir=tmp_path / "s", search_examples=10,
                    report_examples=12, cfg=cfg, device_name="cpu", engine="torch")

    def run_eval(length_config, skip: int, n: int) -> dict:
        args = ["eval", "--model", str(tiny_lat), "--eval-data", str(SQUAD_DEV_SLICE), "--eval-skip", str(skip),
                "--max-eval-examples", str(n), "--device", "cpu", "--json", str(tmp_path / "m.json")]
        res = CliRunner().invoke(main, args + (["--length-cfg", ",".join(map(str, length_config))] if length_config else []))
        assert res.exit_code == 0, res.output
        got = json.loads((tmp_path / "m.json").read_text())
        assert got["questions"] == n and got["length_config"] == (length_config or "full")
        return got

    # the tiny model's F1 hardly moves when it drops tokens, so record what each forward pass was given
    from toolchain.lat import LengthAdaptiveModel

    seen, forward = [], LengthAdaptiveModel.forward
    monkeypatch.setattr(LengthAdaptiveModel, "forward",
                        lambda self, *a, **k: seen.append(k.get("length_config")) or forward(self, *a, **k))
    for point in [result["full"], *result["frontier"]]:
        seen.clear()
        assert abs(run_eval(point["length_config"], 0, 10)["f1"] - point["search"]["f1"]) < 1e-6
        lc = point["length_config"]
        assert set(seen) == ({tuple(lc)} if lc else set())  # full length runs the plain model, no wrapper
    dropped = result["frontier"][0]
    assert abs(run_eval(dropped["length_config"], 10, 12)["f1"] - dropped["report"]["f1"]) < 1e-6
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_lat), "--length-cfg", "10,20"])
    assert res.exit_code != 0 and "non-increasing" in res.output
    # --pareto --gap on the report split reproduces the search's report_gap of the configuration it chose
    pareto = tmp_path / "chosen.json"
    pareto.write_text(json.dumps({**result, "chosen": dropped}))
    args = ["eval", "--model", str(tiny_lat), "--eval-data", str(SQUAD_DEV_SLICE), "--eval-skip", "10",
            "--max-eval-examples", "12", "--device", "cpu", "--pareto", str(pareto), "--gap", "--json",
            str(tmp_path / "gap.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "gap.json").read_text())
    assert got["length_config"] == dropped["length_config"] and got["f1"] == pytest.approx(dropped["report"]["f1"])
    assert got["full"]["f1"] == pytest.approx(result["full"]["report"]["f1"])
    assert got["gap"] == pytest.approx(dropped["report_gap"]["gap"]) and got["se"] == pytest.approx(dropped["report_gap"]["se"])
    res = CliRunner().invoke(main, args + ["--protect-answers", "0"])
    assert res.exit_code != 0 and f"searched with protect-answers {PROTECT_ANSWERS}, not 0" in res.output, res.output
    pareto.write_text(json.dumps({**result, "chosen": None}))
    for extra, message in ((["--length-cfg", "10,5"], "not both"), ([], "chose no configuration")):
        res = CliRunner().invoke(main, args + extra)
        assert res.exit_code != 0 and message in res.output, res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_lat), "--gap"])
    assert res.exit_code != 0 and "--gap compares a length configuration" in res.output


def test_scorer_cache_survives_a_cut_last_line_and_names_a_corrupt_one(tiny_lat, tmp_path):
    from toolchain.search import Scorer
    from toolchain.train_lat import load_length_adaptive

    model, tokenizer, _ = load_length_adaptive(tiny_lat)
    split = prepare.squad_split(SQUAD_DEV_SLICE, tokenizer, 64, 16, 6)
    cache = tmp_path / "search-cache.jsonl"
    first = Scorer(model, "squad", split, torch.device("cpu"), cache, 4, "torch")((40, 17))
    cache.write_text(cache.read_text() + '{"length_config": [30, 2')  # the write a kill interrupted
    scorer = Scorer(model, "squad", split, torch.device("cpu"), cache, 4, "torch")
    assert scorer.cache == {(40, 17): first} and cache.read_text().count("\n") == 1
    scorer((30, 2))
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["length_config"] for r in rows] == [[40, 17], [30, 2]]
    # a cache written before per-question scores were kept still scores; its gaps come without an error
    old = "".join(json.dumps({k: v for k, v in r.items() if k != "scores"}) + "\n" for r in rows)
    cache.write_text(old + json.dumps({"length_config": [], "metrics": {"f1": 50.0, "questions": 6},
                                       "windows": "balanced"}) + "\n")
    scorer = Scorer(model, "squad", split, torch.device("cpu"), cache, 4, "torch")
    assert scorer.gap((40, 17)) == {"gap": pytest.approx(first["f1"] - 50.0), "se": None}
    cache.write_text('{"length_config": [40, 17]}\n')
    with pytest.raises(ToolchainError, match="line 1 is not a cached score"):
        Scorer(model, "squad", split, torch.device("cpu"), cache, 4, "torch")
    # scores taken with another answer guard are not this model's: a resumed search must not reuse them
    cache.write_text(old)
    with pytest.raises(ToolchainError, match=f"scored with protect-answers {PROTECT_ANSWERS}, this run uses 0"):
        Scorer(model.guarded(0), "squad", split, torch.device("cpu"), cache, 4, "torch")
    # nor scores taken on BERT's windows, before they were balanced
    cache.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "windows"}) + "\n" for r in rows))
    with pytest.raises(ToolchainError, match="before windows were balanced"):
        Scorer(model, "squad", split, torch.device("cpu"), cache, 4, "torch")


def test_train_lat_on_long_windows_only(tiny_ft, tmp_path):
    kwargs = dict(model_dir=tiny_ft, train_path=SQUAD_TRAIN_SLICE, eval_path=SQUAD_DEV_SLICE, max_train_examples=16,
                  max_eval_examples=4, cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=4), sandwich=SandwichConfig(),
                  device_name="cpu", max_seq_length=128)
    tok = AutoTokenizer.from_pretrained(tiny_ft)
    stride = json.loads((tiny_ft / "toolchain.json").read_text()).get("doc_stride", 128)
    _, feats = prepare.squad_split(SQUAD_TRAIN_SLICE, tok, 128, stride, 16, 42, split="train", balanced=False)
    real = feats.attention_mask.sum(1)
    cut = int(sorted(real)[len(real) // 2]) + 1  # about half the windows are shorter
    summary = train_lat(out_dir=tmp_path / "a", min_real_tokens=cut, **kwargs)
    assert summary["train_windows"] == int((real >= cut).sum()) and 0 < summary["train_windows"] < len(real)
    meta = json.loads((tmp_path / "a" / "toolchain.json").read_text())
    assert meta["train_lat"]["min_real_tokens"] == cut
    _, wide = prepare.squad_split(SQUAD_TRAIN_SLICE, tok, 384, stride, 16, 42, split="train", balanced=False)
    longest = int(wide.attention_mask.sum(1).max())
    assert longest < 384  # at 384 every window of these 16 questions has padding
    with pytest.raises(ToolchainError, match="no training window has"):
        train_lat(out_dir=tmp_path / "b", min_real_tokens=longest + 1, **{**kwargs, "max_seq_length": 384})
    with pytest.raises(ToolchainError, match=r"min-real-tokens must be in \[0, 128\]"):
        train_lat(out_dir=tmp_path / "c", min_real_tokens=129, **kwargs)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
