"""Long real text for haystacks and fidelity tasks, and needle placement in it.

The default corpus is Python's own documentation (``pydoc_data.topics``, ~465k characters
of English that ships with every CPython); ``--text-file`` replaces it with any UTF-8 text.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_BOUNDARIES = (". ", ".\n", "\n")
_SNAP_CHARS = 300
"""How far a needle may move from its exact depth to land on a sentence boundary."""


def default_text() -> str:
    """The topic texts of ``pydoc_data.topics`` joined by blank lines."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents; ``ValueError`` naming the file if it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --text-file {path}: {err}") from None
    if not text.strip():
        raise ValueError(f"--text-file {path} is empty; give a file with some text")
    return text


class Corpus:
    """A text and its token ids; hands out seeded windows of an exact token count."""

    def __init__(self, text: str, tokenizer: Tokenizer) -> None:
        if not text.strip():
            raise ValueError("the corpus text is empty")
        self.text = text
        self.tokenizer = tokenizer
        self._ids: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        """Token ids of the whole text (computed once)."""
        if self._ids is None:
            self._ids = self.tokenizer.encode(self.text)
        return self._ids

    def window_ids(self, n_tokens: int, rng: np.random.Generator) -> list[int]:
        """``n_tokens`` consecutive ids from a seeded offset (the text repeats if too short)."""
        ids = self.ids
        if n_tokens > len(ids):
            log.warning("corpus has %d tokens, repeating it to %d", len(ids), n_tokens)
            ids = ids * (n_tokens // len(ids) + 1)
        start = int(rng.integers(0, len(ids) - n_tokens + 1))
        return ids[start : start + n_tokens]

    def window_text(self, n_tokens: int, rng: np.random.Generator) -> str:
        """The text of a seeded window of ``n_tokens`` tokens."""
        return self.tokenizer.decode(self.window_ids(n_tokens, rng))


def boundary_near(text: str, offset: int) -> int:
    """A character offset at a sentence or line end near ``offset`` (``offset`` if none)."""
    offset = max(0, min(offset, len(text)))
    if offset in (0, len(text)):
        return offset
    best = offset
    best_gap = _SNAP_CHARS + 1
    for sep in _BOUNDARIES:
        after = text.find(sep, offset, offset + _SNAP_CHARS)
        before = text.rfind(sep, max(0, offset - _SNAP_CHARS), offset)
        for found in (after, before):
            if found >= 0 and abs(found + len(sep) - offset) < best_gap:
                best, best_gap = found + len(sep), abs(found + len(sep) - offset)
    return best


def insert_needles(haystack: str, needles: list[tuple[float, str]]) -> str:
    """``haystack`` with each ``(depth, sentence)`` inserted at that relative depth.

    Depths are fractions of the haystack's length in characters (0 = start, 1 = end);
    each needle lands on the nearest sentence boundary and is set off by whitespace.
    """
    places = sorted(
        (
            (boundary_near(haystack, round(depth * len(haystack))), i)
            for i, (depth, _) in enumerate(needles)
        ),
        reverse=True,
    )
    text = haystack
    for offset, i in places:
        head, tail = text[:offset], text[offset:]
        lead = "" if not head or head[-1].isspace() else " "
        trail = "" if tail[:1].isspace() else " "
        text = f"{head}{lead}{needles[i][1]}{trail}{tail}"
    return text
