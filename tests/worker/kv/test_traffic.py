"""Traffic per sequence: pages selected, and pages read attributed to the last selections."""

import numpy as np

from cache_service.types import Selection
from worker.kv.traffic import TrafficCounter
from worker.kv_client import Traffic


def _sel(pages):
    pages = np.array(pages, dtype=np.int64)
    return Selection(np.array([0, pages.size]), pages, np.full(pages.size, 16), pages * 0)


def test_reads_count_for_the_sequence_whose_last_selection_named_the_page():
    counter = TrafficCounter()
    counter.track("a")
    counter.track("b")
    counter.selected(["a", "b"], [_sel([1, 2, 3]), _sel([7, 8])])
    counter.read(np.array([2, 8, 3, 99]))  # 99: named by no selection
    counter.selected(["a", "b"], [_sel([4]), _sel([])])
    counter.read(np.array([4, 7]))  # 7 was b's one step ago, not now
    assert counter.take("a") == Traffic(pages_selected=4, pages_read=3)
    assert counter.take("b") == Traffic(pages_selected=2, pages_read=1)


def test_an_untracked_sequence_counts_nothing_and_a_taken_one_starts_over():
    counter = TrafficCounter()
    counter.track("a")
    counter.selected(["a", "x"], [_sel([1]), _sel([2])])
    counter.read(np.array([1, 2]))
    assert counter.take("x") == Traffic()
    assert counter.take("a") == Traffic(1, 1)
    assert counter.take("a") == Traffic()
