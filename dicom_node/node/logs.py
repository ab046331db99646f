"""Structured logs: one JSON object per line, with the job id and series UID when there is one.

Operators grep a node's log for a job or a series; a fixed shape makes that reliable.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """Every record as JSON; ``extra`` fields (job, series, ...) become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "job": None,
            "series": None,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the node and its libraries (pynetdicom is noisy below WARNING)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def ctx(job: int | None = None, series: str | None = None, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: job and series are always present keys (null when unknown)."""
    return {"extra": {"job": job, "series": series, **fields}}
