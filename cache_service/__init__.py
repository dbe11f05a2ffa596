"""The CPU-side KV cache: a page pool, per-head page layouts, selection policies, the index."""
