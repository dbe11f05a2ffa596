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
