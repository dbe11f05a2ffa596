"""Which host a process runs on, as far as sharing POSIX memory goes."""

from __future__ import annotations

import socket
from pathlib import Path


def host_identity() -> str:
    """``<boot id>/<hostname>``: equal for two processes that can share POSIX memory.

    Containers on one host share the boot id but usually not the hostname (nor ``/dev/shm``).
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}/{socket.gethostname()}"
