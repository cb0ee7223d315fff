import numpy as np
import pytest

from toolchain.errors import ToolchainError
from toolchain.evaluate import run_batches, take


def test_run_batches_cuts_each_batch_to_its_longest_row_and_keeps_row_order():
    lengths = np.array([3, 9, 5, 12, 1, 7, 12, 2])
    width = 12
    ids = np.arange(len(lengths) * width).reshape(len(lengths), width) + 1
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    widths = []

    def run(feed):
        widths.append(feed["input_ids"].shape[1])
        assert feed["attention_mask"][:, -1].any()  # never wider than the longest row
        return feed["input_ids"].astype(np.float32), feed["input_ids"].astype(np.float32)

    start, end = run_batches(run, lambda idx: {k: v[idx] for k, v in inputs.items()}, len(lengths), 3,
                             per_token=True, progress=False)
    assert widths == [12, 7, 2]  # longest rows first: (12, 12, 9), (7, 5, 3), (2, 1)
    assert start.shape == end.shape == (len(lengths), width)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(start[row, :n], ids[row, :n])
        used = {12: 12, 9: 12, 7: 7, 5: 7, 3: 7, 2: 2, 1: 2}[n]  # the width its batch ran at
        assert (start[row, used:] == -np.inf).all() and (start[row, n:used] == 0).all()

    (logits,) = run_batches(lambda feed: (feed["attention_mask"].sum(1, keepdims=True).astype(np.float32),),
                            lambda idx: {k: v[idx] for k, v in inputs.items()}, len(lengths), 3, progress=False)
    np.testing.assert_array_equal(logits[:, 0], lengths)  # not per token: one value per row, in row order


def test_take_gives_disjoint_seeded_splits_and_rejects_impossible_ones():
    items = list(range(50))
    search, report, rest = take(items, 10), take(items, 20, skip=10), take(items, None, skip=30)
    assert len(search) == 10 and len(report) == 20 and len(rest) == 20
    assert sorted(search + report + rest) == items and search == sorted(search)
    assert take(items, 10, seed=1) != search and take(items, 10) == search
    for n, skip, message in ((0, 0, "positive"), (30, 30, "only 50"), (None, 50, "after skipping 50")):
        with pytest.raises(ToolchainError, match=message):
            take(items, n, skip=skip)
