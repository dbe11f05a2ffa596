"""Text <-> token ids for a local checkpoint directory (a thin wrapper over transformers)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.model import CheckpointError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer:
    """Encodes prompts, decodes outputs, and knows which ids end a generation."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        """Wrap a transformers tokenizer; ``extra_eos_ids`` come from the model's configs."""
        self._hf = hf_tokenizer
        ids = set(extra_eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        """Token ids that end a generation (tokenizer, config and generation_config)."""

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint directory (local files only)."""
        from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

        path = Path(path)
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise CheckpointError(
                f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}"
            )
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(hf_tokenizer, _config_eos_ids(path))

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, added tokens included (<= model vocab)."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        return self._hf.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS etc. only when ``add_special_tokens``)."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, without tokenization-space clean-up (so decode inverts encode)."""
        return self._hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def chat_prompt_ids(self, user_text: str) -> list[int]:
        """Prompt ids for one user turn, ending where the assistant's answer starts.

        Uses the chat template when there is one (the template writes BOS itself if the
        model wants one); otherwise the plain text with the tokenizer's special tokens.
        """
        if not self._hf.chat_template:
            return self.encode(user_text, add_special_tokens=True)
        return self.chat_ids([{"role": "user", "content": user_text}])

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids of a conversation (``role``/``content`` dicts) through the chat template,
        ending where the assistant's next answer starts; ``ValueError`` without a template."""
        if not self._hf.chat_template:
            raise ValueError(
                "this model has no chat template, so a message list cannot be turned into a "
                "prompt; send the prompt text in your own format to /v1/completions instead"
            )
        turns = [dict(m) for m in messages]
        text = self._hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.encode(text, add_special_tokens=False)


def _config_eos_ids(path: Path) -> set[int]:
    """eos ids named by ``config.json`` and ``generation_config.json`` (int or list each)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        if not file.is_file():
            continue
        eos = json.loads(file.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    return ids
