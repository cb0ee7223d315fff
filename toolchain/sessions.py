"""ONNX Runtime sessions as every command and the runtime open them: fixed intra-op threads, sequential execution."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from toolchain.hardware import cpu_info


def ort_session(path: Path | str | bytes, threads: int | None = None, ep: str = "cpu",
                spinning: bool = False, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An ORT session with fixed intra-op threads (default: all cores), sequential execution.

    Spinning worker threads are off by default: on a machine shared with other work they cost far more
    than they save (measured here: MiniLM fp32 at 384, 135-176 ms spinning vs 52 ms not). On an otherwise
    idle machine they win at batch 1 (lat-full 26.3 vs 27.7 ms, the smallest length configuration 10.3 vs
    11.8 ms, interleaved in one run), where short parallel sections otherwise wait for sleeping threads. On the CPU EP the
    SkipLayerNormalization fusion is off: in the INT8 graphs it replaces Add + LayerNormalization by a
    kernel that is slower on this CPU (ORT 1.31, lat-full INT8 at 256, batch 1, one thread, 25 interleaved
    runs: 28.7 ms fused vs 23.7 ms not; the fp32 graphs do not get fused and are unchanged).
    ``profile_prefix`` turns ORT's profiler on (its JSON goes to a file with that prefix).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_info()["cores"]
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    providers = ["CPUExecutionProvider"]
    if ep == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    disabled = ["SkipLayerNormFusion"] if providers[0] == "CPUExecutionProvider" else []
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, opts, providers=providers,
                                disabled_optimizers=disabled)
