"""`toolchain profile`: per-op time of a tiny bundle's graph in ORT and PyTorch eager, grouped by category."""

import json

import pytest
from click.testing import CliRunner

from toolchain.bundle import update_manifest
from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.profile import category, profile_graph, profile_table, write_report


def test_profile_splits_both_engines_by_category(plain, tmp_path):
    report = profile_graph(plain, "lat-50-30", batch=2, threads=1, repeats=3)
    ort_row, torch_row = report["engines"]
    assert (ort_row["engine"], ort_row["precision"], torch_row["engine"], torch_row["precision"]) == (
        "ort", "fp32", "torch", "fp32")
    assert report["length_config"] == [50, 30] and report["batch"] == 2 and report["seq_length"] == 64
    # the graph drops tokens: ORT ran its TopK, PyTorch its sort; both engines multiplied matrices
    assert ort_row["ops_ms"]["TopK"] > 0 and category("TopK") == "token selection"
    assert ort_row["ops_ms"]["MatMul"] > 0 and torch_row["ops_ms"]["aten::addmm"] > 0
    for row in report["engines"]:
        ops = sum(row["ops_ms"].values())
        # categories partition the ops; "framework" is the rest of a profiled run
        assert sum(row["categories_ms"].values()) == pytest.approx(max(ops, row["profiled_ms_mean"]))
        assert row["categories_ms"]["gemm"] == row["gemm_ms"] > 0
        assert 0 < row["gemm_share"] <= 1 and row["gemm_gops"] > 0 and row["latency_ms_median"] > 0
    assert report["ort_vs_torch"] == pytest.approx(torch_row["latency_ms_median"] / ort_row["latency_ms_median"])
    assert report["ort_vs_torch_bound"] >= report["ort_vs_torch"]
    table = profile_table(report)
    assert table.startswith("| ms per run | ort fp32 | torch fp32 |") and "| gemm |" in table and "at most" in table
    top_ort = next(iter(ort_row["ops_ms"]))  # the ops are sorted, most expensive first
    assert ort_row["ops_ms"][top_ort] == max(ort_row["ops_ms"].values())
    assert f"ort fp32, most expensive ops (ms per run): {top_ort} {ort_row['ops_ms'][top_ort]:.2f}" in table
    write_report(report, tmp_path / "p.json", tmp_path / "p.png")
    assert json.loads((tmp_path / "p.json").read_text())["engines"][0]["ops_ms"] == ort_row["ops_ms"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_cli_ort_alone(plain, tmp_path):
    result = CliRunner().invoke(main, ["profile", "--bundle", str(plain), "--graph", "lat-full", "--threads", "1",
                                       "--repeats", "2", "--no-torch", "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert [r["engine"] for r in report["engines"]] == ["ort"] and "ort_vs_torch" not in report
    assert "| ms per run | ort fp32 |" in result.output and "at most" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--graph", "nope"], "has no graph 'nope' (it has: lat-full, lat-50-30, lat-32-12)"),
    (["--graph", "lat-full", "--batch", "0"], "Invalid value for '--batch'"),
    (["--graph", "lat-full", "--threads", "0"], "threads must be positive, got 0"),
    (["--graph", "lat-full", "--json", "/nonexistent/dir/p.json"], "cannot write /nonexistent/dir/p.json"),
])
def test_profile_bad_inputs(plain, args, message):
    result = CliRunner().invoke(main, ["profile", "--bundle", str(plain), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_profile_missing_bundle(tmp_path):
    with pytest.raises(ToolchainError, match="bundle not found"):
        profile_graph(tmp_path / "missing", "lat-full")


def test_profile_int8_graph_against_pytorch_dynamic_int8_and_not_cuda(measured):
    """An INT8 CPU graph (here: the chosen graph's) is compared with PyTorch's dynamic INT8 twin; a CUDA graph is not
    profiled on the CPU."""
    with pytest.raises(ToolchainError, match="has no chosen graph"):
        profile_graph(measured, "chosen")
    with pytest.raises(ToolchainError, match="graph lat-32-12 has no INT8 CPU graph"):
        profile_graph(measured, "lat-32-12", int8=True)
    update_manifest(measured, lambda m: m.update(chosen="lat-full"))  # as export --pareto records a search's choice
    report = profile_graph(measured, "chosen", threads=1, repeats=2, rounds=1, int8=True)
    assert report["graph"] == "lat-full-int8-cpu"
    assert [(r["engine"], r["precision"]) for r in report["engines"]] == [("ort", "int8"), ("torch", "int8-dynamic")]
    assert report["engines"][1]["ops_ms"]["quantized::linear_dynamic"] > 0
    with pytest.raises(ToolchainError, match="lat-full-int8-cuda is a lat graph for cuda"):
        profile_graph(measured, "lat-full-int8-cuda")
