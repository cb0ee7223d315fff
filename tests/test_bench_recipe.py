"""`toolchain bench` on a tiny bundle, and `toolchain run` recipes (skip finished steps, clear errors)."""

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tiny_model_dir
from toolchain.bench import bench_bundle, compare_reports, speedup_table, write_outputs
from toolchain.bundle import latency_key, load_manifest, update_manifest
from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.export import export
from toolchain.recipe import load_recipe, option_kinds, step_args
from toolchain.timing import time_fn, time_interleaved

META = {"task": "squad", "max_seq_length": 64, "doc_stride": 16, "labels": None, "length_adaptive": True,
        "keep_cls": False}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    ckpt = make_tiny_model_dir(tmp_path_factory.mktemp("ckpt"))
    (ckpt / "toolchain.json").write_text(json.dumps(META))
    return export(ckpt, tmp_path_factory.mktemp("out") / "bundle", [None, (40, 20)], optimize="none")


def test_time_fn_reports_median_and_p90():
    calls = []
    stats = time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and stats["runs"] == 5
    assert 0 <= stats["latency_ms_median"] <= stats["latency_ms_p90"]


def test_time_interleaved_round_robin():
    calls = []
    stats = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], rounds=3, warmup=1, repeats=3)
    # one warm-up per slice (fast runs), one timed run per slice, slices alternate between the functions
    assert "".join(calls) == "aabbaabbaabb"
    assert [s["runs"] for s in stats] == [3, 3]
    # a release after each slice of "a"; slow runs (>= 100 ms) get no warm-up unless something was released
    calls.clear()
    slow = lambda tag: lambda: calls.append(tag) or time.sleep(0.1)  # noqa: E731
    time_interleaved([slow("a"), slow("b")], rounds=2, warmup=1, repeats=2, after_slice=[lambda: calls.append("r"), None])
    assert "".join(calls) == "aarbbaarb"
    # the spread of the slices' medians: a function slowed in its second slice only
    # (a 10x slowdown, so that sleep overshooting on a busy machine cannot hide it: spread 9 when sleeps are exact)
    durations = iter([0.02] * 3 + [0.2] * 3)  # per slice: a warm-up run, then two timed runs
    (slowed,) = time_interleaved([lambda: time.sleep(next(durations))], rounds=2, warmup=1, repeats=3)
    assert slowed["runs"] == 4 and 3.0 < slowed["slice_spread"] <= 9.0 + 0.5
    assert len(slowed["slice_medians_ms"]) == 2 and slowed["slice_medians_ms"][1] > 3 * slowed["slice_medians_ms"][0]
    # a reference in two slices a round, the second halfway through the round: each slice has its own warm-up
    calls.clear()
    fns = [lambda tag=tag: calls.append(tag) for tag in "abcr"]
    stats = time_interleaved(fns, rounds=2, warmup=1, repeats=2, slices_per_round=[1, 1, 1, 2])
    assert "".join(calls) == "aabbrrccrr" * 2
    assert [s["runs"] for s in stats] == [2, 2, 2, 4] and len(stats[3]["slice_medians_ms"]) == 4


_FAULTS = """
import ctypes, resource, sys
if sys.argv[1] in ("keep", "release"):
    from toolchain.hardware import keep_freed_memory, release_freed_memory
    assert keep_freed_memory().startswith("glibc")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2**20)  # over glibc's largest mmap threshold (32 MB)
    ctypes.memset(block, 1, 64 * 2**20)
    libc.free(block)
    if sys.argv[1] == "release":
        release_freed_memory()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]), max(faults[1:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_reused_blocks():
    """A 64 MB block allocated again faults its 16,384 pages in afresh each time by default, and not when freed memory
    is kept, until it is released to the system."""
    def faults(mode: str) -> tuple[int, int]:
        """The fewest and the most page faults of the allocations after the first."""
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        low, high = out.stdout.split()[-2:]
        return int(low), int(high)

    assert faults("system")[0] > 10_000
    assert faults("keep")[1] < 1_000
    assert faults("release")[0] > 10_000


def test_bench_rows_manifest_table_and_outputs(bundle, tmp_path):
    update_manifest(bundle, lambda m: m.update(chosen="lat-40-20"))  # as export --pareto records a search's choice
    report = bench_bundle(bundle, [1, 2], threads=1, repeats=2, torch_eager=True, reference=False, min_seconds=0.0)
    rows = report["results"]
    assert {r["graph"] for r in rows if r["chosen"]} == {"lat-40-20"}
    # per graph and batch: ORT fp32, PyTorch fp32 and PyTorch dynamic INT8 at the same configuration
    assert {(r["graph"], r["engine"], r["precision"], r["batch"]) for r in rows} == {
        (g, e, p, b) for g in ("lat-full", "lat-40-20") for e, p in (("ort", "fp32"), ("torch", "fp32"),
                                                                     ("torch", "int8-dynamic")) for b in (1, 2)}
    for r in rows:
        assert r["latency_ms_median"] > 0 and r["roofline_ms"] > 0 and r["roofline_multiple"] > 0
    assert report["machine"]["gemm_peak_gops"]["int8"] > 0 and report["machine"]["cores"] >= 1
    assert report["machine"]["malloc"] == "system default"
    sizes = {r["graph"]: r["size_mb"] for r in rows}  # two configurations of one model: one copy of the weights
    assert max(sizes.values()) <= report["bundle_mb"] < 1.1 * max(sizes.values())
    manifest = load_manifest(bundle)  # latencies were written back, checksums still verify
    for g in manifest["graphs"]:
        assert set(g["latency_ms"]) == {latency_key("cpu", 1), latency_key("cpu", 2)}
    # a fake BERT-base reference row gives the speedup column
    report["reference"] = [{**rows[0], "graph": "bert-base", "engine": "torch", "batch": 1,
                            "latency_ms_median": 10 * rows[0]["latency_ms_median"], "length_config": None}]
    table = speedup_table(report, 1)
    assert "| **lat-40-20** (chosen) | ort | fp32 |" in table and "| lat-full | ort | fp32 |" in table
    assert "10.0x" in table
    write_outputs(report, tmp_path / "b.json", tmp_path / "t.md", tmp_path / "plots")
    assert json.loads((tmp_path / "b.json").read_text())["results"] == rows
    assert (tmp_path / "t.md").read_text().startswith("### batch 1")
    assert f"The 2 graphs take {report['bundle_mb']:.0f} MB on disk" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "plots" / "f1-vs-latency.png").is_file()


def _report(base_ms: float, rows: dict[str, float], spread: float | None = None) -> dict:
    def row(g, e, ms):
        out = {"graph": g, "engine": e, "precision": "fp32", "batch": 1, "latency_ms_median": ms}
        return out if spread is None else {**out, "slice_spread": spread}
    return {"reference": [row("bert-base", "torch", base_ms)],
            "results": [row(g, "ort", ms) for g, ms in rows.items()]}


def test_compare_reports_flags_ratios_that_moved():
    first = _report(1000.0, {"a": 10.0, "b": 20.0})
    # the whole machine 20% slower: every ratio is unchanged, so the runs agree
    same = compare_reports(first, _report(1200.0, {"a": 12.0, "b": 24.0}))
    assert same["compared"] == 3 and same["unstable"] == [] and same["max_abs_change"] < 1e-9
    # graph b alone 25% slower: its speedup drops by 20%, over the 10% tolerance
    moved = compare_reports(first, _report(1000.0, {"a": 10.0, "b": 25.0, "new-graph": 5.0}))
    assert [r["graph"] for r in moved["unstable"]] == ["b"] and moved["compared"] == 3
    assert moved["worst"]["change"] == pytest.approx(-0.2)
    assert moved["worst"]["noise"] is None and moved["unstable_within_noise"] == 0  # old reports: no slice spreads
    # the same move where each run's slices were 30% apart: over the tolerance, but within the runs' own noise
    noisy = compare_reports(_report(1000.0, {"a": 10.0, "b": 20.0}, spread=0.3),
                            _report(1000.0, {"a": 10.0, "b": 25.0}, spread=0.1))
    assert noisy["worst"]["noise"] == pytest.approx(0.3) and noisy["unstable_within_noise"] == 1
    quiet = compare_reports(_report(1000.0, {"a": 10.0, "b": 20.0}, spread=0.05),
                            _report(1000.0, {"a": 10.0, "b": 25.0}, spread=0.05))
    assert len(quiet["unstable"]) == 1 and quiet["unstable_within_noise"] == 0
    with pytest.raises(ToolchainError, match="share no row"):
        compare_reports(first, {"reference": [], "results": []})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_bench_keeps_freed_memory_by_default(bundle, tmp_path):
    """The CLI keeps freed memory (in a process of its own: mallopt lasts as long as the process) and says so;
    --no-keep-freed-memory leaves glibc as it is."""
    args = ["bench", "--bundle", str(bundle), "--batch", "1,2", "--repeats", "2", "--rounds", "2", "--min-seconds", "0",
            "--no-reference"]
    subprocess.run([sys.executable, "-m", "toolchain.cli", *args, "--json", str(tmp_path / "kept.json")], check=True,
                   capture_output=True)
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert kept["machine"]["malloc"] == "glibc, freed memory kept (no mmap, no trim), handed back after each slice"
    assert all(len(r["slice_medians_ms"]) == 2 for r in kept["results"])
    result = CliRunner().invoke(main, [*args, "--no-keep-freed-memory", "--json", str(tmp_path / "system.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "system.json").read_text())["machine"]["malloc"] == "system default"


def test_bench_compare_rejects_a_file_that_is_not_a_report(bundle, tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text('{"results": []}')
    result = CliRunner().invoke(main, ["bench", "--bundle", str(bundle), "--compare", str(bad)])
    assert result.exit_code == 2 and "is not a readable bench JSON" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "must be positive integers"),
    (["--batch", "one"], "comma-separated integers"),
    (["--threads", "-1"], "threads must be positive, got -1"),
    (["--json", "/nonexistent/dir/out.json"], "cannot write /nonexistent/dir/out.json"),
])
def test_bench_bad_inputs(bundle, args, message):
    result = CliRunner().invoke(main, ["bench", "--bundle", str(bundle), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_bench_empty_bundle(bundle, tmp_path):
    with pytest.raises(ToolchainError, match="bundle not found"):
        bench_bundle(tmp_path / "missing", [1])
    with pytest.raises(ToolchainError, match="no CPU graphs"):
        bench_bundle(bundle, [1], graphs=["nope"])


def test_recipe_skips_finished_steps(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""workdir: {tmp_path / 'work'}
steps:
  - finetune: {{task: squad, model: {model}, out: ft, max-train-examples: 4, max-eval-examples: 4,
                max-seq-length: 64, doc-stride: 16, epochs: 1, batch-size: 4, device: cpu}}
""")
    first = CliRunner().invoke(main, ["run", str(recipe)])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "work" / "ft" / "metrics.json").is_file()
    second = CliRunner().invoke(main, ["run", str(recipe)])
    assert second.exit_code == 0 and "exists, skipped" in second.output


@pytest.mark.parametrize("text, message", [
    ("steps: []", "needs 'workdir'"),
    ("workdir: w\nsteps:\n  - finetune: 3", "must be one mapping"),
    ("workdir: w\nsteps: [\n", "cannot read recipe"),
])
def test_recipe_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ToolchainError, match=message):
        load_recipe(path)


def test_recipe_unknown_command(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"workdir: {tmp_path}\nsteps:\n  - fly: {{out: x}}\n")
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "unknown command 'fly'" in result.output


def test_step_args_paths_flags_and_lists(tmp_path):
    args = step_args({"model": "ft", "out": "/abs/o", "resume": True, "force": False, "graphs": ["a", "b"], "plots": "p",
                      "train-data": "{workdir}/t.json", "compare": "bench.json", "plot": "p.png"}, tmp_path)
    assert args == ["--model", str(tmp_path / "ft"), "--out", "/abs/o", "--resume", "--graphs", "a,b", "--plots", str(tmp_path / "p"),
                    "--train-data", f"{tmp_path}/t.json", "--compare", str(tmp_path / "bench.json"),
                    "--plot", str(tmp_path / "p.png")]
    # a repeatable option gets one flag per item, so items may hold commas (length configurations)
    assert step_args({"length-cfg": ["full", "40,20"], "graphs": ["a", "b"]}, tmp_path, repeatable=frozenset({"length-cfg"})) == [
        "--length-cfg", "full", "--length-cfg", "40,20", "--graphs", "a,b"]
    # false turns an on/off switch off, and is dropped for a plain flag
    assert step_args({"group-by-length": False, "force": False}, tmp_path, frozenset({"group-by-length"})) == [
        "--no-group-by-length"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")))
def test_shipped_recipes_parse_against_their_commands(recipe, tmp_path):
    """Every step of every recipe in recipes/ names a command and only options that command has."""
    import click

    steps = load_recipe(Path(__file__).parent.parent / "recipes" / recipe)["steps"]
    for step in steps:
        (name, options), = step.items()
        command = main.get_command(click.Context(main), name)
        assert command is not None, name
        opts = {o for p in command.params for o in p.opts}
        assert [k for k in options if f"--{k}" not in opts] == [], name
        ctx = command.make_context(name, step_args(options, tmp_path, *option_kinds(command)))  # values parse
        assert ctx.params
