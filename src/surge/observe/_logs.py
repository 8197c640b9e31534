"""Log lines as JSON objects, with the event fields as their own keys.

Every line surge writes about an event (a handler failed, was retried or
dead-lettered) and every line a handler writes through ``ctx.log`` carries
``event_id``, ``topic``, ``subscription`` and ``attempt`` as ``extra``
fields of its record. :class:`JsonFormatter` renders them as keys of one
JSON object per line, ready for a log shipper; plain formatters leave them
out unless their format string names them.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import msgspec

__all__ = ("EVENT_FIELDS", "JsonFormatter", "log_json")

EVENT_FIELDS = ("event_id", "topic", "subscription", "attempt")

# attributes every LogRecord has: anything else came from ``extra=``
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, the event fields when present, any other
    ``extra=`` field, and ``exception`` (the formatted traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for key in EVENT_FIELDS:
            if key in fields:
                out[key] = fields[key]
        for key, value in fields.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(out, enc_hook=repr).decode()


def log_json(level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send the ``surge`` loggers' lines to ``stream`` (stderr) as JSON; the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("surge")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
