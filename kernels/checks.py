"""Argument checks shared by the launchers: one device, contiguity, index tensors, alignment.

Each raises ``ValueError`` with what the caller should change.
"""

from __future__ import annotations

import torch

from kernels.backend import KernelBackend


def check_device(backend: KernelBackend, **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``, of ``backend``'s type; every tensor contiguous."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"tensors must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != backend.device_type:
        raise ValueError(
            f"this backend runs on {backend.device_type} tensors, got {device.type} "
            "(use decode_attention/scatter_pages to dispatch by device)"
        )
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return device


def check_index(name: str, tensor: torch.Tensor) -> None:
    """``tensor`` is a 1-D int32 index tensor."""
    if tensor.dim() != 1 or tensor.dtype != torch.int32:
        raise ValueError(
            f"{name} must be a 1-D int32 tensor, got {tensor.dtype} of shape "
            f"{tuple(tensor.shape)} (use .to(torch.int32))"
        )


def check_aligned(name: str, tensor: torch.Tensor, alignment: int = 16) -> None:
    """``tensor`` starts on an ``alignment``-byte boundary (the kernels' vector loads)."""
    if tensor.data_ptr() % alignment:
        raise ValueError(f"{name} must start on a {alignment}-byte boundary (use .clone())")
