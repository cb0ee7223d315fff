"""Wall-clock timing for latency measurement: median and p90 of repeated runs, functions timed round-robin."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from tqdm.auto import tqdm


def time_interleaved(fns: list[Callable[[], object]], rounds: int = 1, warmup: int = 2, repeats: int = 10,
                     min_seconds: float = 0.0, desc: str | None = None,
                     after_slice: list[Callable[[], object] | None] | None = None,
                     slices_per_round: list[int] | None = None) -> list[dict]:
    """Median and p90 wall time in ms of each function, timed round-robin in ``rounds`` slices.

    Each slice takes at least ``ceil(repeats / rounds)`` runs and ``min_seconds / rounds`` seconds. Interleaving
    spreads every measurement over the whole session, so a machine that drifts (turbo, a neighbour's load)
    shifts all of them alike and ratios between them stay put. ``after_slice[i]``, when given, runs untimed
    after each slice of ``fns[i]`` (to hand back memory). Warm-up: ``warmup`` untimed runs before the first
    slice (a run over a second is its own warm-up), then one before each later slice when runs are short
    (< 100 ms, to refill the caches the other functions evicted) or an ``after_slice`` ran (to re-grow what
    it released). ``desc`` shows a progress bar. ``slice_medians_ms``: each slice's median, in order;
    ``slice_spread``: how far apart they lie (slowest / fastest - 1), the noise a run-to-run comparison of the
    median has to live with. ``slices_per_round[i]`` > 1 times ``fns[i]`` in that many slices a round, spread evenly
    through it (a reference every ratio divides by: its error would otherwise land on all of them).
    """
    times: list[list[float]] = [[] for _ in fns]
    slices: list[list[float]] = [[] for _ in fns]  # each slice's median
    per_round = -(-repeats // rounds)
    n = len(fns)
    weights = slices_per_round or [1] * n
    schedule = [i for _, i in sorted(((i + s * n / k) % n, i) for i, k in enumerate(weights) for s in range(k))]
    bar = tqdm(total=rounds * len(schedule), desc=desc, unit="slice", dynamic_ncols=True, disable=desc is None)
    after_slice = after_slice or [None] * n
    for _ in range(rounds):
        for i in schedule:
            fn, ts, medians, after = fns[i], times[i], slices[i], after_slice[i]
            for _ in range(warmup if not ts else int(after is not None or statistics.median(ts) < 100)):
                t0 = time.perf_counter()
                fn()
                if time.perf_counter() - t0 > 1.0:
                    break
            start, done = time.perf_counter(), 0
            while done < per_round or time.perf_counter() - start < min_seconds / rounds:
                t0 = time.perf_counter()
                fn()
                ts.append(1000 * (time.perf_counter() - t0))
                done += 1
            medians.append(statistics.median(ts[-done:]))
            if after is not None:
                after()
            bar.update()
    bar.close()
    out = []
    for ts, medians in zip(times, slices):
        ts.sort()
        out.append({"latency_ms_median": statistics.median(ts),
                    "latency_ms_p90": ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))], "runs": len(ts),
                    "slice_medians_ms": medians, "slice_spread": max(medians) / max(min(medians), 1e-9) - 1})
    return out


def time_fn(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, min_seconds: float = 0.0) -> dict:
    """Median and p90 wall time in ms of `fn` over `repeats` runs (more while under `min_seconds`)."""
    return time_interleaved([fn], 1, warmup, repeats, min_seconds)[0]
