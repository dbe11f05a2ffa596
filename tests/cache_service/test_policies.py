"""make_bodies: the body every (layer, KV head) of every policy gets, from a hand-written
table, so that a policy named in POLICIES without a body fails here."""

import pytest

from cache_service.cluster_index import ClusterIndex
from cache_service.kmeans_index import FlatKMeansIndex
from cache_service.page_pool import PagePool
from cache_service.policies import make_bodies
from cache_service.policies.indexed import GatheringBody, IndexedBody, MirroredBody
from cache_service.policies.positional import (
    OracleBody,
    PositionalBody,
    QuestBody,
    StreamingBody,
)
from cache_service.types import POLICIES, SequenceSpec

LAYERS, DENSE, GROUP = 6, 1, 2
# per policy: the body of each layer after the dense one (layers 1..5), same for every head
EXPECTED = {
    "full": ["positional"] * 5,
    "streaming": ["streaming"] * 5,
    "quest": ["quest"] * 5,
    "oracle": ["oracle"] * 5,
    "icecache": ["cluster"] * 5,
    "kmeans": ["kmeans"] * 5,
    "icecache-r": ["cluster", "mirror of 1", "cluster", "mirror of 3", "cluster"],
    "icecache-tokens": ["gathering cluster"] * 5,
}


def _kind(body, bodies, head):
    if isinstance(body, MirroredBody):
        (leader,) = [i for i, row in enumerate(bodies) if row[head] is body.leader]
        return f"mirror of {leader}"
    if isinstance(body, GatheringBody):
        return {ClusterIndex: "gathering cluster"}[type(body.index)]
    if isinstance(body, IndexedBody):
        return {ClusterIndex: "cluster", FlatKMeansIndex: "kmeans"}[type(body.index)]
    kinds = {StreamingBody: "streaming", QuestBody: "quest", OracleBody: "oracle"}
    return kinds.get(type(body), "positional" if type(body) is PositionalBody else "?")


def test_the_table_names_every_policy():
    assert sorted(EXPECTED) == sorted(POLICIES)


@pytest.mark.parametrize("policy", POLICIES)
def test_each_layer_gets_its_policys_body(policy):
    spec = SequenceSpec(
        LAYERS, 2, 4, 8, policy=policy, budget=None if policy == "full" else 64,
        dense_layers=DENSE, reuse_group=GROUP,
    )  # fmt: skip
    bodies = make_bodies(spec, PagePool(64, 16, 8))
    for head in range(2):
        kinds = [_kind(row[head], bodies, head) for row in bodies]
        assert kinds == ["positional"] + EXPECTED[policy]
