"""The global page-id space: disjoint ranges in order, retired ranges never given out again."""

import numpy as np

from worker.kv.page_ranges import PageRanges


def _split(ranges, pages):
    return [(o, rows.tolist(), ids.tolist()) for o, rows, ids in ranges.split(np.array(pages))]


def test_owners_get_consecutive_ranges_and_ids_map_back_to_local_ones():
    ranges: PageRanges[str] = PageRanges()
    assert (ranges.add("a", 4), ranges.add("b", 3)) == (0, 4)
    assert _split(ranges, [5, 0, 6, 3, 4]) == [("a", [1, 3], [0, 3]), ("b", [0, 2, 4], [1, 2, 0])]


def test_a_retired_range_reads_as_nobodys_and_its_successor_starts_after_the_last():
    ranges: PageRanges[str] = PageRanges()
    ranges.add("a", 4)
    ranges.add("b", 3)
    ranges.retire("a")
    assert ranges.add("a again", 4) == 7  # not 0: a page of the dead "a" is never reused
    assert _split(ranges, [1, 8, 4]) == [(None, [0], [1]), ("b", [2], [0]), ("a again", [1], [1])]
