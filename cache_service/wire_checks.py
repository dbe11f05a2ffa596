"""What only the wire can get wrong: sequence ids, spec sizes, tensor dtypes and values.

Pure helpers beside the servicer; each raises ``ValueError`` (INVALID_ARGUMENT) with what to
change.
"""

from __future__ import annotations

import numpy as np

from cache_service import codec
from cache_service.types import SequenceSpec
from proto.icecache.v1 import cache_service_pb2 as pb

MAX_SEQ_ID = 256
"""Longest sequence id (printable ASCII)."""
SPEC_LIMITS = {
    "num_layers": 1024,
    "num_kv_heads": 256,
    "num_q_heads": 2048,
    "budget": 2**20,
    "sink_tokens": 2**20,
    "recent_pages": 2**16,
    "dense_layers": 1024,
    "reuse_group": 1024,
    "seed": 2**30,
}
"""Largest value of each ``SequenceSpec`` field the service takes."""
MAX_HEADS_TOTAL = 2**15
"""Most (layer, KV head) pairs of one sequence."""
MAX_ABS_VALUE = 65504.0
"""Keys, values and queries must be finite and within the float16 range."""


def valid_id(seq_id: str) -> bool:
    """Whether ``seq_id`` is 1..``MAX_SEQ_ID`` printable ASCII characters."""
    return 0 < len(seq_id) <= MAX_SEQ_ID and seq_id.isascii() and seq_id.isprintable()


def check_id(seq_id: str) -> None:
    if not valid_id(seq_id):
        raise ValueError(
            f"seq_id must be 1..{MAX_SEQ_ID} printable ASCII characters, got {seq_id[:40]!r}"
        )


def check_spec(spec: SequenceSpec) -> None:
    for name, limit in SPEC_LIMITS.items():
        value = getattr(spec, name)
        if value is not None and not 0 <= value <= limit:
            raise ValueError(f"spec.{name} must be in 0..{limit}, got {value}")
    if spec.num_layers * spec.num_kv_heads > MAX_HEADS_TOTAL:
        raise ValueError(
            f"spec.num_layers x num_kv_heads must be at most {MAX_HEADS_TOTAL}, got "
            f"{spec.num_layers} x {spec.num_kv_heads}"
        )


def floats(tensor: pb.Tensor, field: str) -> np.ndarray:
    """``tensor`` as float32: float32 or float16 on the wire, finite, within float16's range."""
    array = codec.from_tensor(tensor, field)
    if array.dtype.kind != "f":
        raise ValueError(f"{field} must be float32 or float16, got {tensor.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.size and not np.abs(array).max() <= MAX_ABS_VALUE:  # NaN fails too
        raise ValueError(f"{field} must be finite and within +-{MAX_ABS_VALUE:g}")
    return array


def ints(tensor: pb.Tensor, field: str) -> np.ndarray:
    """``tensor`` as the int64 array it must be."""
    array = codec.from_tensor(tensor, field)
    if array.dtype.kind != "i":
        raise ValueError(f"{field} must be int64, got {tensor.dtype}")
    return array
