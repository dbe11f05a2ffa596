"""Attention and bulk-load kernels: CUDA sources for CuPy and their torch references.

Device page layout (shared by the cache service's pool and the worker's page cache)::

    kv_cache: [num_slots, 2, page_size, head_dim]   # [:, 0] keys (post-RoPE), [:, 1] values

One page holds tokens of a single (layer, KV head); its valid tokens are the first
``page_len`` rows. A step's selection is a CSR page table over rows ``r = b * kv_heads + h``:
``indptr [B * kv_heads + 1]``, ``indices [nnz]`` (slots in ``kv_cache``), ``page_lens [nnz]``.

Modules: ``dispatch`` (what the worker calls: torch on CPU, CUDA on GPU); the launchers
``paged_attention`` and ``page_scatter`` (one per ``.cu``), sized by ``decode_plan`` and
checked by ``checks``; ``registry`` (kernel names, sources); ``backend`` (the contract a
backend meets), ``cupy_backend`` (GPU) and ``emulator`` (CPU, for the tests); ``reference``
(the oracle) and ``torch_paged`` (the CPU path).
"""
