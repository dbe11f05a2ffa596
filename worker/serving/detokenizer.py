"""Incremental detokenization of a token stream."""

from __future__ import annotations

from worker.tokenizer import Tokenizer


class TextStream:
    """Incremental detokenization: the new text each token completes (O(1) per token)."""

    def __init__(self, tokenizer: Tokenizer, hidden: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already sent
        self.read = 0

    def push(self, token_id: int) -> str:
        if token_id in self.hidden:
            return ""
        self.ids.append(token_id)
        sent = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""  # mid-character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent) :]


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that may become one.

    ``push`` returns the text that can go out now; once a stop string appears it returns the
    text before it and ``stopped`` is set (push nothing more). ``held`` is what is still held
    back (a proper prefix of some stop string).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty; leave out the empty one")
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        assert not self.stopped, "the text already stopped"
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
