"""The shared vocabulary: policy names and the bytes of K/V."""

import pytest

from cache_service.config import CacheServiceConfig
from cache_service.types import POLICIES, check_policy, kv_bytes


def test_kv_bytes_counts_keys_and_values_of_every_head():
    assert kv_bytes(16, 64, 4) == 8192  # one float32 page: 2 x 16 tokens x 64 values x 4 B
    assert kv_bytes(16, 64, 2) == 4096
    assert kv_bytes(1, 64, 2, heads=30 * 3) == 23040  # SmolLM2: a token, 30 layers x 3 heads


@pytest.mark.parametrize(("dtype", "page_bytes"), [("float32", 8192), ("float16", 4096)])
def test_the_cache_service_sizes_its_pages_by_its_dtype(dtype, page_bytes):
    config = CacheServiceConfig(dtype=dtype, max_memory=10 * page_bytes)
    assert (config.page_bytes, config.num_pages) == (page_bytes, 10)


def test_check_policy_names_every_policy_when_it_refuses():
    assert [check_policy(p) for p in POLICIES] == list(POLICIES)
    with pytest.raises(ValueError) as refused:
        check_policy("best")
    assert str(refused.value) == (
        "unknown policy 'best'; choose one of full, oracle, icecache, icecache-r, "
        "icecache-tokens, quest, kmeans, streaming"
    )
