"""`toolchain verify` on the tiny QA bundles: a clean bundle passes; a wrong selector, a different model and bad
input are caught."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import FAKE, META, make_tiny_model_dir

from toolchain import runtime
from toolchain.bundle import update_manifest
from toolchain.cli import main
from toolchain.data import SQUAD_DEV_SLICE
from toolchain.errors import ToolchainError
from toolchain.runtime import Bundle, Hardware
from toolchain.verify import verify

NO_VNNI = Hardware(isa=("AVX512", "AVX2"))
SMALL = {"examples": 6, "requests": 4, "threads": 3}


@pytest.fixture(scope="module")
def loaded(measured):
    return Bundle.load(measured, hardware=NO_VNNI, threads=1, probe_runs=0)


def _checkpoint(path, **meta):
    """A tiny checkpoint (another seed than the bundle's) with toolchain.json ``META`` updated by ``meta``."""
    make_tiny_model_dir(path, seed=1)
    (path / "toolchain.json").write_text(json.dumps({**META, **meta}))
    return path


@pytest.mark.timeout(120)
def test_clean_bundle_verifies(loaded):
    report = verify(loaded, None, SQUAD_DEV_SLICE, **SMALL)
    assert report["failed"] == [] and report["examples"] == 6
    assert report["model"] == loaded.manifest["source_checkpoint"]
    sel = report["selection"]
    assert sel["passed"] and sel["batches"] == [1, 4] and sel["mismatches"] == [] and sel["skipped"] == {}
    assert sel["checked"] >= 2 * 40 and sel["ep"] == "cpu"
    graphs = {g["name"]: g for g in report["answers"]["graphs"]}
    assert set(graphs) == set(FAKE)
    for g in graphs.values():
        assert g["passed"] and g["answers_equal"] == g["questions"] == 6 and g["differences"] == []
        assert g["onnx"] == pytest.approx(g["pytorch"])
    int8 = graphs["lat-full-int8-cpu"]
    assert int8["tolerance"] == 1.0 and int8["f1_drop"] == pytest.approx(0) and "without VNNI" in int8["unusable_here"]
    assert graphs["lat-full"]["unusable_here"] is None and "f1_drop" not in graphs["lat-full"]
    conc = report["concurrency"]
    assert (conc["graph"], conc["threads"], conc["requests"], conc["errors"], conc["first_error"], conc["identical"]) \
        == ("lat-full", 3, 4, 0, None, True)
    assert list(loaded._sessions) == [("lat-full", "cpu")]  # each compared graph's session was released after it


@pytest.mark.timeout(120)
def test_wrong_selector_fails_after_writing_the_report(measured, tmp_path, monkeypatch):
    bundle = shutil.copytree(measured, tmp_path / "b")

    def record_tolerance(manifest):
        next(g for g in manifest["graphs"] if g["name"] == "lat-full-int8-cpu")["quantization"] = {"tolerance": 0.25}

    update_manifest(bundle, record_tolerance)
    real = runtime.select
    monkeypatch.setattr(runtime, "select", lambda entries, budget_ms=None, *a, **kw: real(
        entries, None if budget_ms is None else 2 * budget_ms, *a, **kw))  # sees twice the budget
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["verify", "--bundle", str(bundle), "--graphs", "lat-32-12,lat-full-int8-cpu",
                                       "--examples", "3", "--requests", "2", "--threads", "2", "--ep", "cpu",
                                       "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert f"error: verification failed: selection (report: {out})" in result.output
    assert "selection: FAILED" in result.output and "concurrency: ok" in result.output
    report = json.loads(out.read_text())
    assert report["failed"] == ["selection"] and report["answers"]["passed"] and report["concurrency"]["passed"]
    assert [g["name"] for g in report["answers"]["graphs"]] == ["lat-32-12", "lat-full-int8-cpu"]
    assert report["answers"]["graphs"][1]["tolerance"] == 0.25
    mismatches = report["selection"]["mismatches"]
    assert mismatches and all((m["selected"], m["fits"]) != (m["expected"], m["expected_fits"]) for m in mismatches)
    assert any((m["budget_ms"], m["batch"], m["selected"]) == (7.0, 1, "lat-full") for m in mismatches)


@pytest.mark.timeout(120)
def test_another_checkpoint_gives_other_answers(loaded, tmp_path):
    report = verify(loaded, _checkpoint(tmp_path / "other"), SQUAD_DEV_SLICE, graphs=["lat-full", "lat-32-12"],
                    **SMALL)
    assert report["failed"] == ["answers"]
    for g in report["answers"]["graphs"]:
        assert not g["passed"] and g["answers_equal"] < g["questions"]
        assert all(d["onnx"] != d["pytorch"] for d in g["differences"]) and g["differences"]


@pytest.mark.parametrize("kw, match", [
    ({"graphs": ["lat-full", "nope"]}, r"no lat graph named 'nope' in bundle .*; choose from lat-full, "),
    ({"examples": 0}, "examples must be positive, got 0"), ({"threads": -1}, "threads must be positive"),
    ({"requests": 0}, "requests must be positive"), ({"skip": -1}, "skip and tolerance must be >= 0"),
    ({"model_dir": "nowhere"}, "checkpoint not found: nowhere"),
    ({"model_dir": "not-lat"}, "is not length-adaptive: train it with `toolchain train-lat` first"),
])
def test_bad_input(loaded, tmp_path, kw, match):
    if kw.get("model_dir") == "not-lat":
        kw["model_dir"] = _checkpoint(tmp_path / "ft", length_adaptive=False)
    with pytest.raises(ToolchainError, match=match):
        verify(loaded, kw.pop("model_dir", None), SQUAD_DEV_SLICE, **kw)


def test_classification_bundles_are_refused(measured, tmp_path):
    bundle = shutil.copytree(measured, tmp_path / "b")
    update_manifest(bundle, lambda m: m.update(task="classify"))
    with pytest.raises(ToolchainError, match="is a classify bundle: verify checks QA"):
        verify(Bundle.load(bundle, hardware=NO_VNNI, threads=1), None, SQUAD_DEV_SLICE)
