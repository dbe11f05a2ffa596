"""Dense prefills captured once and kept on disk, so later runs replay them instead of paying
the prefill again (a 32k-token prefill of the embedded model takes about a quarter of an hour
on two CPU cores; its replay takes seconds).

A capture holds what a dense prefill of ``ids`` appends to the store, the per-layer keys and
values ``[layers, tokens, kv_heads, head_dim]`` in float16 (a 32k capture of the embedded
model is ~750 MB; float32 would double it), and the float32 logits of the last prompt token.
It lives in a directory named by a digest of the model's weights and configuration and of
the token ids, so a different model, text, window or length never reads another's capture.
Extra arrays (e.g. the queries of the probed decode steps, for ``bench/selection.py``) can be
kept beside it under a name. Everything is written to a temporary directory and renamed into
place, so a run killed midway leaves no half-written capture behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.loader import cache_root

FORMAT = 1
"""Bumped when the layout of a capture directory changes (old ones are then ignored)."""


def default_root() -> Path:
    """``$ICECACHE_CACHE_DIR/prefills`` (else ``~/.cache/icecache/prefills``)."""
    return cache_root() / "prefills"


def model_digest(model: torch.nn.Module, config: object) -> str:
    """A digest of every parameter's bytes and of the model's configuration."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(config).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Capture:
    """One captured dense prefill (arrays may be memory-mapped, read-only)."""

    keys: np.ndarray
    """``[layers, tokens, kv_heads, head_dim]`` float16."""
    values: np.ndarray
    """``[layers, tokens, kv_heads, head_dim]`` float16."""
    logits: np.ndarray
    """Logits of the last prompt token ``[vocab]`` float32."""

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[1])


class PrefillStore:
    """Captures of one model's dense prefills under ``root``."""

    def __init__(self, root: Path, model_digest: str) -> None:
        self.root = Path(root)
        self.model_digest = model_digest

    def directory(self, ids: list[int] | tuple[int, ...]) -> Path:
        """Where the capture of ``ids`` lives (whether or not it exists yet)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{FORMAT}:{self.model_digest}:".encode())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        return self.root / f"{len(ids)}-{h.hexdigest()}"

    def load(self, ids: list[int] | tuple[int, ...]) -> Capture | None:
        """The capture of ``ids``, memory-mapped; ``None`` if there is none."""
        where = self.directory(ids)
        if not (where / "meta.json").exists():
            return None
        keys = np.load(where / "keys.npy", mmap_mode="r")
        values = np.load(where / "values.npy", mmap_mode="r")
        logits = np.load(where / "logits.npy")
        if keys.shape[1] != len(ids) or keys.shape != values.shape:
            raise ValueError(
                f"the prefill capture in {where} does not match its {len(ids)} tokens "
                f"(keys {keys.shape}, values {values.shape}); delete that directory"
            )
        return Capture(keys, values, logits)

    def save(
        self,
        ids: list[int] | tuple[int, ...],
        keys: list[np.ndarray],
        values: list[np.ndarray],
        logits: np.ndarray,
    ) -> Capture:
        """Store per-layer ``keys``/``values`` ``[tokens, kv_heads, head_dim]`` and the
        logits; returns the stored (float16) capture."""
        if len(keys) != len(values) or any(k.shape[0] != len(ids) for k in keys):
            raise ValueError("every layer's keys and values must cover every token of ids")
        where = self.directory(ids)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".capture-", dir=self.root))
        try:
            np.save(tmp / "keys.npy", np.stack([k.astype(np.float16) for k in keys]))
            np.save(tmp / "values.npy", np.stack([v.astype(np.float16) for v in values]))
            np.save(tmp / "logits.npy", np.asarray(logits, dtype=np.float32))
            meta = {"format": FORMAT, "model": self.model_digest, "tokens": len(ids)}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, where)
            except OSError:  # another process stored the same capture first
                if not (where / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        capture = self.load(ids)
        assert capture is not None
        return capture

    def load_extra(self, ids: list[int] | tuple[int, ...], name: str) -> dict[str, np.ndarray]:
        """Arrays stored with ``save_extra`` under ``name``; empty if none."""
        path = self.directory(ids) / f"extra-{name}.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def save_extra(
        self, ids: list[int] | tuple[int, ...], name: str, arrays: dict[str, np.ndarray]
    ) -> None:
        """Keep ``arrays`` beside the capture of ``ids`` (which must exist)."""
        where = self.directory(ids)
        if not (where / "meta.json").exists():
            raise ValueError(f"no prefill capture of these {len(ids)} tokens to add {name!r} to")
        fd, tmp = tempfile.mkstemp(prefix=".extra-", suffix=".npz", dir=where)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, where / f"extra-{name}.npz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
