"""Kernel tests. The CPU checks the issue asks of CI need tools, not a GPU: a missing one
fails the run with what to install rather than skipping the check unseen."""

import pytest

from kernels import emulator


def require_emulator() -> None:
    """Fail unless the CUDA-model emulator can be built (it needs a C++ compiler)."""
    reason = emulator.available()
    if reason:
        pytest.fail(f"{reason}: install g++ (e.g. apt-get install g++) to run the kernels on CPU")
