"""A same-host cache service's page pool, mapped read-only from its shared-memory segment."""

from __future__ import annotations

import mmap
import os

import numpy as np

from cache_service.page_pool import DTYPES


class SegmentView:
    """A read-only mapping of the service's page data ``[num_pages, 2, page_size, head_dim]``.

    The mapping is not registered with ``multiprocessing``'s resource tracker, which would
    unlink a segment it merely saw attached when this process exits; the service owns it.
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        from _posixshmem import shm_open  # the primitive behind multiprocessing.shared_memory

        fd = shm_open("/" + name, os.O_RDONLY, 0)
        try:
            size = os.fstat(fd).st_size
            expected = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
            if size != expected:
                raise OSError(f"segment {name} has {size} bytes, the pool needs {expected}")
            self._mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
        self.data: np.ndarray | None = np.ndarray(shape, DTYPES[dtype], buffer=self._mmap)

    def gather(self, pages: np.ndarray) -> np.ndarray:
        """Copy of ``pages`` ``[n]`` into one contiguous array ``[n, 2, page_size, head_dim]``."""
        assert self.data is not None, "segment view is closed"
        return np.take(self.data, pages, axis=0)

    def close(self) -> None:
        """Unmap (the segment itself stays; the service unlinks it)."""
        self.data = None
        self._mmap.close()
