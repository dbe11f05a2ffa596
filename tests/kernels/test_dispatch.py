"""kernels/dispatch.py: torch on CPU tensors, the CUDA kernels on GPU tensors, and the
machine without CuPy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from kernels import cupy_backend
from kernels.dispatch import decode_attention, scatter_pages
from kernels.reference import page_scatter_ref, paged_decode_attention_ref
from kernels.registry import KERNEL_DIR
from tests.kernels.recording import decode_inputs


def test_dispatch_runs_the_vectorized_torch_path_on_cpu():
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(6, 2, 16, 64, generator=gen)
    q = torch.randn(1, 4, 64, generator=gen)
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    indices = torch.tensor([5, 0, 1, 2, 3], dtype=torch.int32)
    lens = torch.tensor([16, 3, 7, 16, 1], dtype=torch.int32)
    got = decode_attention(q, kv, indptr, indices, lens, 0.125)
    want_out = paged_decode_attention_ref(q, kv, indptr, indices, lens, 0.125)
    torch.testing.assert_close(got, want_out, atol=1e-5, rtol=1e-5)

    staging = torch.randn(2, 2, 16, 64, generator=gen)
    want = kv.clone()
    page_scatter_ref(staging, want, torch.tensor([4, 1]))
    scatter_pages(staging, kv, torch.tensor([4, 1], dtype=torch.int32))
    assert torch.equal(kv, want)


@pytest.fixture
def without_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Makes ``import cupy`` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    cupy_backend.cupy_module.cache_clear()
    cupy_backend.default_backend.cache_clear()
    yield
    cupy_backend.cupy_module.cache_clear()
    cupy_backend.default_backend.cache_clear()


def test_device_tensors_without_cupy_say_what_to_install(without_cupy: None):
    q, kv, indptr, indices, lens = (t.to("meta") for t in decode_inputs())
    with pytest.raises(RuntimeError, match="pip install cupy-cuda12x"):
        decode_attention(q, kv, indptr, indices, lens, 0.1)
    with pytest.raises(RuntimeError, match="cupy-cuda13x"):
        scatter_pages(kv[:1], kv, indices[:1])


def test_module_imports_without_cupy():
    code = "import sys; sys.modules['cupy'] = None; import kernels.dispatch; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=KERNEL_DIR.parent
    )
    assert result.stdout.strip() == "ok", result.stderr
