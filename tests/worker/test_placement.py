from collections import Counter

import pytest

from worker.placement import owner, ranked, weight

SEQS = [f"seq-{i}" for i in range(2000)]


def test_weights_are_stable_and_distinct():
    assert weight("a", "r1") == weight("a", "r1")
    assert weight("a", "r1") != weight("a", "r2")


def test_exact_owner_for_known_ids():
    replicas = ["cache-0:50051", "cache-1:50051"]
    got = {s: owner(s, replicas) for s in ["seq-0", "seq-1", "seq-2", "seq-3"]}
    expected = {s: max(replicas, key=lambda r: weight(s, r)) for s in got}
    assert got == expected
    assert owner("seq-0", replicas) == owner("seq-0", list(reversed(replicas)))


def test_sequences_spread_evenly():
    counts = Counter(owner(s, ["a", "b", "c", "d"]) for s in SEQS)
    assert set(counts) == {"a", "b", "c", "d"}
    assert min(counts.values()) > 0.2 * len(SEQS)


def test_adding_a_replica_moves_only_what_it_wins():
    before = {s: owner(s, ["a", "b", "c"]) for s in SEQS}
    after = {s: owner(s, ["a", "b", "c", "d"]) for s in SEQS}
    moved = [s for s in SEQS if before[s] != after[s]]
    assert moved and all(after[s] == "d" for s in moved)
    assert 0.15 < len(moved) / len(SEQS) < 0.35


def test_removing_a_replica_moves_only_its_sequences_to_their_next_choice():
    before = {s: owner(s, ["a", "b", "c"]) for s in SEQS}
    after = {s: owner(s, ["a", "c"]) for s in SEQS}
    for s in SEQS:
        if before[s] == "b":
            assert after[s] == ranked(s, ["a", "b", "c"])[1]
        else:
            assert after[s] == before[s]


def test_no_replica_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no healthy cache-service replica"):
        owner("x", [])
