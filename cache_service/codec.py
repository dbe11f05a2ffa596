"""Domain objects <-> ``icecache.v1`` messages: tensors, specs, selections.

Both ends of the gRPC link (``cache_service.servicer`` and ``worker.kv.remote``) translate
through here, so a tensor, a spec or a selection means the same on either side. Tensors
travel as raw little-endian bytes with a dtype and a shape. The rest of the wire contract
sits beside it: ``limits`` (sizes), ``channel`` (options, retry policy), ``wire_errors``
(exceptions <-> status codes), ``frames`` (local-stream framing), ``host`` (host identity).
"""

from __future__ import annotations

import math

import numpy as np

from cache_service.types import PrefixKeys, Selection, SequenceSpec
from proto.icecache.v1 import cache_service_pb2 as pb

MAX_DIMS = 8
"""Most dimensions of a ``Tensor``."""
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
}
"""What may travel as a ``Tensor``: wire name -> little-endian dtype."""
_WIRE_NAMES = {np.dtype(dt.kind + str(dt.itemsize)): name for name, dt in WIRE_DTYPES.items()}


# ---- tensors ---------------------------------------------------------------------------------
def to_tensor(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """A message holding ``array`` (any shape) as raw little-endian bytes.

    ``out``: a field of a message being built, filled in place (no copy of the message).
    """
    name = _WIRE_NAMES.get(array.dtype) or _WIRE_NAMES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise ValueError(
            f"dtype {array.dtype} cannot go on the wire; use one of {sorted(WIRE_DTYPES)}"
        )
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name])
    if out is None:
        return pb.Tensor(dtype=name, shape=data.shape, data=data.tobytes())
    out.dtype = name
    out.shape[:] = data.shape
    out.data = data.tobytes()
    return out


def from_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A read-only array over a message's bytes; ``ValueError`` names ``field`` if malformed."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"{field}: dtype {tensor.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"{field}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    data = tensor.data  # (each read of a bytes field makes a new object)
    if len(data) != math.prod(shape) * dtype.itemsize or (shape and min(shape) < 0):
        raise ValueError(f"{field}: {len(data)} bytes do not fill shape {shape} of {tensor.dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ---- specs and selections --------------------------------------------------------------------
def spec_to_proto(spec: SequenceSpec) -> pb.SequenceSpec:
    msg = pb.SequenceSpec(
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        num_q_heads=spec.num_q_heads,
        head_dim=spec.head_dim,
        policy=spec.policy,
        dense_layers=spec.dense_layers,
        reuse_group=spec.reuse_group,
        seed=spec.seed,
    )
    for name in ("budget", "sink_tokens", "recent_pages"):
        if getattr(spec, name) is not None:
            setattr(msg, name, getattr(spec, name))
    return msg


def spec_from_proto(msg: pb.SequenceSpec) -> SequenceSpec:
    def optional(name: str) -> int | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return SequenceSpec(
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        num_q_heads=msg.num_q_heads,
        head_dim=msg.head_dim,
        policy=msg.policy,
        budget=optional("budget"),
        sink_tokens=optional("sink_tokens"),
        recent_pages=optional("recent_pages"),
        dense_layers=msg.dense_layers,
        reuse_group=msg.reuse_group,
        seed=msg.seed,
    )


def prefix_to_proto(prefix: PrefixKeys, out: pb.PrefixKeys) -> pb.PrefixKeys:
    """``prefix`` into ``out``, a field of a message being built."""
    out.keys.extend(prefix.keys)
    out.block_tokens = prefix.block_tokens
    out.no_reuse = not prefix.reuse
    return out


def prefix_from_proto(msg: pb.PrefixKeys) -> PrefixKeys:
    return PrefixKeys(tuple(msg.keys), msg.block_tokens, reuse=not msg.no_reuse)


def selection_to_proto(sel: Selection, out: pb.Selection | None = None) -> pb.Selection:
    """``sel`` as a message; ``out``: a field of a message being built, filled in place."""
    msg = pb.Selection() if out is None else out
    to_tensor(sel.indptr, msg.indptr)
    to_tensor(sel.pages, msg.pages)
    to_tensor(sel.lens, msg.lens)
    to_tensor(sel.versions, msg.versions)
    return msg


def selection_from_proto(msg: pb.Selection) -> Selection:
    return Selection(
        from_tensor(msg.indptr, "indptr"),
        from_tensor(msg.pages, "pages"),
        from_tensor(msg.lens, "lens"),
        from_tensor(msg.versions, "versions"),
    )
