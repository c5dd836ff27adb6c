"""Log set-up: one line per event, human-readable or JSON; secrets kept out."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

HUMAN_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"

# Loggers that would print secrets or noise at DEBUG: the SDK's adapter logs request headers
# (the API token), urllib3 logs URLs. They stay at WARNING whatever the daemon's level.
QUIET = ("konfuzio_sdk", "urllib3", "werkzeug", "watchdog", "pyngrok")
# Loggers whose warnings are not a person's business: Waitress warns "Task queue depth is N" whenever
# a request waits for a free thread (a burst of callbacks on a busy machine); the callback is answered
# a moment later, and the callbacks metric counts what arrives.
SILENT = ("waitress.queue",)


# Fields a log call may carry (``extra={"file": ..., "state": ...}``) for log shippers.
FIELDS = ("file", "state", "old_state", "document_id", "stage", "error", "scope")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str = "human", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    # Neither format shows the caller, thread or process: the logging HOWTO's "Optimization" switches
    # spare each record the frame walk and lookups (a file logs six lines).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for name in SILENT:
        logging.getLogger(name).setLevel(logging.ERROR)
