"""How a server process logs: level and format (settings), and one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from cache_service.settings import setting

FORMATS = ("json", "text")
"""One JSON object per line, or plain text."""
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


@dataclass(frozen=True)
class LogConfig:
    """The logs of a server process, on stderr."""

    log_level: str = setting("INFO", "Python logging level: DEBUG, INFO, WARNING or ERROR.")
    log_format: str = setting("json", "One JSON object a line, or plain text.", choices=FORMATS)

    def __post_init__(self) -> None:
        if self.log_format not in FORMATS:
            raise ValueError(f"log_format must be json or text, got {self.log_format!r}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(config: LogConfig) -> None:
    """Structured (``json``) or ``text`` logs on stderr at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
