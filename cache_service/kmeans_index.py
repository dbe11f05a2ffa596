"""The flat baseline ``kmeans``: one level of k-means clusters, whole clusters selected.

ClusterKV-style: the keys of one (sequence, layer, KV head) are clustered once by k-means
(same augmented inner-product geometry as ``ClusterIndex``); a query ranks clusters by
``q·centroid`` (max over its group) and takes whole clusters while they fit the budget.
There is no hierarchy, no exact scoring of tokens and no split: a cluster is a list of
pages (leaves) filled in arrival order, and decoded tokens join the nearest cluster.
It shares ``ClusterIndex``'s leaf storage, so the two differ only in what is measured:
the hierarchy and the leaf-level co-location.
"""

from __future__ import annotations

import math

import numpy as np

from cache_service.cluster_index import (
    ClusterIndex,
    IndexConfig,
    KeySource,
    Placement,
    _empty_placement,
    kmeans_labels,
)
from cache_service.policies.base import group_scores


class FlatKMeansIndex(ClusterIndex):
    """``levels[0]`` are pages (leaves), ``levels[1]`` the k-means clusters that own them."""

    def __init__(
        self,
        head_dim: int,
        config: IndexConfig | None = None,
        key_source: KeySource | None = None,
        cluster_pages: int = 4,
    ) -> None:
        super().__init__(head_dim, config, key_source)
        if cluster_pages < 1:
            raise ValueError(f"cluster_pages must be at least 1, got {cluster_pages}")
        self.cluster_tokens = cluster_pages * self.config.page_size
        self.levels.append(self.new_level())

    @property
    def num_clusters(self) -> int:
        return self.levels[1].n

    def _lay_out(self, keys: np.ndarray, x: np.ndarray, token_ids: np.ndarray) -> None:
        k = max(1, math.ceil(len(keys) / self.cluster_tokens))
        labels = kmeans_labels(x, k, self.config.seed, self.config.niter, plus_plus=True)
        _, labels = np.unique(labels, return_inverse=True)
        clusters = self.levels[1]
        for cluster in clusters.add(int(labels.max()) + 1):
            members = np.flatnonzero(labels == cluster)  # in token order
            for start in range(0, len(members), self.config.page_size):
                chunk = members[start : start + self.config.page_size]
                self._new_page(int(cluster), keys[chunk], token_ids[chunk])

    def insert(self, keys: np.ndarray, token_ids: np.ndarray) -> Placement:
        if not self.built or self.num_leaves == 0:
            self.built = False
            return self.build(keys, token_ids)
        keys, token_ids = self._check(keys, token_ids)
        if len(keys) == 0:
            return _empty_placement()
        self._changing()
        self._raise_bound(keys)
        x = self._augment(keys)
        clusters = self.levels[1]
        for i in range(len(keys)):
            cent = clusters.centroids(slice(0, clusters.n)).astype(np.float64)
            cluster = int(np.argmin(((cent - x[i]) ** 2).sum(1)))
            last = clusters.children[cluster][-1]
            if self.fill[last] == self.config.page_size:
                self._new_page(cluster, keys[i : i + 1], token_ids[i : i + 1])
            else:
                self._append_token(last, keys[i], x[i], int(token_ids[i]))
        return self._placement(token_ids)

    def search(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        """Pages of the best clusters by ``q·centroid``, whole clusters while they fit."""
        queries = self._check_queries(queries, max_tokens)
        clusters = self.levels[1]
        if clusters.n == 0 or max_tokens == 0:
            return np.empty(0, dtype=np.int64)
        scores = group_scores(queries, clusters.centroids(slice(0, clusters.n))[:, : self.dim])
        scores = scores.max(axis=0)
        order = np.argsort(-scores, kind="stable")
        take = int(np.searchsorted(np.cumsum(clusters.counts[order]), max_tokens, "right"))
        return clusters.children_of(order[:take])

    def _new_page(self, cluster: int, keys: np.ndarray, token_ids: np.ndarray) -> None:
        leaves, clusters = self.levels[0], self.levels[1]
        leaf = int(leaves.add()[0])
        self._grow_leaf_arrays()
        self._set_leaf(leaf, keys, token_ids)
        leaves.parent[leaf] = cluster
        clusters.children[cluster].append(leaf)
        clusters.changed()
        clusters.sums[cluster] += leaves.sums[leaf]
        clusters.counts[cluster] += len(keys)
        clusters.refresh([cluster])
