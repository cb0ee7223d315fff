"""What this machine offers: CPU model and ISA extensions, cores, ONNX Runtime providers and whether CUDA works."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flag -> name used in reports and by the selector, best first
ISA_FLAGS = {"amx_int8": "AMX", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16",
             "avx512f": "AVX512", "avx2": "AVX2"}


@lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (whose malloc the two functions below tune), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name and platform.libc_ver()[0] == "glibc" else None
    except OSError:
        return None


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse, for the rest of the process; returns what was set.

    By default glibc hands every block over 32 MB straight back to the kernel when it is freed, so each PyTorch eager
    forward at batch 32 faults its activations in afresh: BERT-base at seq 384 took 2.0 million minor page faults a
    run and 14.6 s, against 12.2 s with freed memory kept (2 threads, Zen 4 VM), and how much those faults cost
    moves with the host's load. PyTorch's CPU tuning guide recommends a caching allocator (jemalloc, TCMalloc) for
    this; no mmap for large blocks and no trimming is glibc's own equivalent. ORT keeps its own arena either way.
    """
    libc = _glibc()
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    if libc is None or not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        return "system default"
    return "glibc, freed memory kept (no mmap, no trim)"


def release_freed_memory() -> None:
    """Hand the free pages of glibc's heap back to the kernel (``malloc_trim(0)``); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{'model': str, 'generation': 'family.model' or '', 'isa': [names], 'cores': usable cores}.

    ``generation`` is the CPU family and model number: a VM may name very different CPUs alike (this project's
    machines have reported "AMD EPYC" for both a Zen 1, family 23 model 1, with AVX2 only, and a Zen 4 with
    AVX512-VNNI, about 5x faster here in fp32)."""
    model, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "flags":
                flags = set(value.split())
                break  # the first processor's block is enough
            fields.setdefault(key, value)
    except OSError:
        pass
    model = fields.get("model name") or model
    generation = f"{fields['cpu family']}.{fields.get('model', '')}" if "cpu family" in fields else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"model": model, "generation": generation, "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags],
            "cores": cores}


def u8s8_saturates(isa: list[str] | None = None, arch: str | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX, where ONNX Runtime's U8S8 GEMM kernels (AVX2, AVX-512BW) add pairs of
    uint8 x int8 products in int16 (``vpmaddubsw``), which overflows with full-range int8 weights. That step is
    x86's: other CPUs (ARM64) are not flagged, and ``toolchain quantize``'s accuracy check runs there anyway."""
    isa = cpu_info()["isa"] if isa is None else isa
    on_x86 = (arch or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686")
    return on_x86 and not any(name in isa for name in ("AMX", "AVX512-VNNI", "AVX-VNNI"))


@lru_cache(maxsize=1)
def cuda_usable() -> tuple[bool, str]:
    """(works, why): the CUDA execution provider is listed *and* a tiny graph really runs on it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider (install the 'cuda' extra: onnxruntime-gpu)"
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            return False, "the CUDA execution provider is listed but did not initialize (driver or CUDA libraries missing)"
        sess.run(None, {"x": np.ones(1, np.float32)})
    except Exception as e:  # any failure to start CUDA means: not usable
        return False, f"the CUDA execution provider failed to run a probe graph: {type(e).__name__}: {e}"
    return True, "CUDA execution provider initialized and ran a probe graph"


def machine_summary(threads: int | None = None) -> dict:
    """The `machine` object of benchmark results."""
    import numpy
    import onnxruntime
    import torch
    import transformers

    from toolchain import __version__

    info = cpu_info()
    return {
        "cpu": info["model"], "cpu_generation": info["generation"], "isa": info["isa"], "cores": info["cores"],
        "threads": threads,
        "platform": platform.platform(), "ort_providers": onnxruntime.get_available_providers(),
        "versions": {"toolchain": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__,
                     "python": platform.python_version()},
    }
