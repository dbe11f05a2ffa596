"""Selection policies: which body pages each (layer, KV head) attends to at a decode step."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from cache_service.page_pool import PagePool
from cache_service.policies.base import Body
from cache_service.policies.indexed import GatheringBody, IndexedBody, MirroredBody
from cache_service.policies.positional import (
    OracleBody,
    PositionalBody,
    QuestBody,
    StreamingBody,
)
from cache_service.types import INDEXED_POLICIES, SequenceSpec

if TYPE_CHECKING:
    from cache_service.cluster_index import IndexConfig


def _index_config(spec: SequenceSpec, pool: PagePool, layer: int, head: int) -> IndexConfig:
    from cache_service.cluster_index import IndexConfig

    return IndexConfig(page_size=pool.page_size, seed=spec.seed + 1000 * layer + head)


def _index_body(spec: SequenceSpec, pool: PagePool, layer: int, head: int) -> IndexedBody:
    from cache_service.cluster_index import ClusterIndex
    from cache_service.kmeans_index import FlatKMeansIndex

    config = _index_config(spec, pool, layer, head)
    if spec.policy == "kmeans":
        return IndexedBody(pool, partial(FlatKMeansIndex, pool.head_dim, config))
    leads = spec.policy == "icecache-r"  # the first layer of each group (followers mirror)
    return IndexedBody(pool, partial(ClusterIndex, pool.head_dim, config), leads)


def _gathering_body(spec: SequenceSpec, pool: PagePool, layer: int, head: int) -> GatheringBody:
    from cache_service.cluster_index import ClusterIndex

    config = _index_config(spec, pool, layer, head)
    return GatheringBody(pool, partial(ClusterIndex, pool.head_dim, config))


def make_bodies(spec: SequenceSpec, pool: PagePool) -> list[list[Body]]:
    """One body per layer and KV head, as the spec's policy lays it out.

    The first ``spec.dense_layers`` layers keep plain positional bodies (they attend fully).
    With ``icecache-r`` each group of ``spec.reuse_group`` layers after them mirrors the
    group's first layer's leaf layout (and selects on its own).
    """
    simple = {
        "full": PositionalBody,
        "streaming": StreamingBody,
        "quest": QuestBody,
        "oracle": OracleBody,
    }
    bodies: list[list[Body]] = []
    for layer in range(spec.num_layers):
        row: list[Body] = []
        for head in range(spec.num_kv_heads):
            if layer < spec.full_layers:
                row.append(PositionalBody(pool))
            elif spec.policy in simple:
                row.append(simple[spec.policy](pool))
            elif spec.policy == "icecache-r" and (layer - spec.dense_layers) % spec.reuse_group:
                leader = bodies[layer - (layer - spec.dense_layers) % spec.reuse_group][head]
                assert isinstance(leader, IndexedBody)
                row.append(MirroredBody(pool, leader, _index_config(spec, pool, layer, head)))
            elif spec.policy == "icecache-tokens":
                row.append(_gathering_body(spec, pool, layer, head))
            elif spec.policy in INDEXED_POLICIES:
                row.append(_index_body(spec, pool, layer, head))
            else:
                raise ValueError(f"policy {spec.policy!r} has no body here: add it to make_bodies")
        bodies.append(row)
    return bodies


__all__ = ["Body", "make_bodies"]
