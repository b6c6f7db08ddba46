"""Logging: one access-log line per request, JSON or text, written off the event loop.

Loggers are named by area (``tierproxy.access``, ``tierproxy.tiers``, ``tierproxy.origin``...).
``TIERPROXY_LOG_FORMAT=json`` makes every line one JSON object; ``text`` is for people.

The access line carries method, path (the normalised key material), status, ``X-Cache``, bytes,
total time, time spent in each tier and at the origin, the client address and the request id.
It never carries request or response headers, so ``Authorization``, cookies and the purge token
cannot reach the log.

Cost on the hot path: whether the access log is on is decided once at start-up (level INFO on
``tierproxy.access`` and ``TIERPROXY_ACCESS_LOG=on``); when off, a request pays one attribute
check. When on, a request builds one small dict and one LogRecord; formatting (``json.dumps``)
and the write happen in a logging thread behind a bounded queue, so a slow stderr reader can
never stall the event loop - when the queue is full, lines are dropped and counted
(``tierproxy_log_lines_dropped``).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ACCESS_LOGGER",
    "AccessLog",
    "AccessRecord",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "dropped_lines",
    "request_id",
]

ACCESS_LOGGER = "tierproxy.access"
_QUEUE_SIZE = 10_000
_MAX_PATH = 2048

_dropped = 0


def dropped_lines() -> int:
    """Log lines dropped because the log queue was full (process-wide)."""
    return _dropped


# ---- request ids ---------------------------------------------------------------------------

# A client's X-Request-ID is kept when it is short and plain (it is echoed in logs, to the
# origin and in the response); anything else is replaced by a generated one.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}")


class _IdSource:
    """Unique ids without a uuid4 per request: a random per-process prefix and a counter."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        import secrets

        self._prefix = secrets.token_hex(6) + "-"
        self._next = 0

    def new(self) -> str:
        self._next += 1
        return f"{self._prefix}{self._next:x}"


_ids = _IdSource()


def request_id(supplied: str | None) -> str:
    """The request's id: the client's ``X-Request-ID`` if it is usable, else a new one."""
    if supplied is not None and _CLIENT_ID.fullmatch(supplied):
        return supplied
    return _ids.new()


# ---- the access line -----------------------------------------------------------------------


def _clean(text: str) -> str:
    """One token in a text line: no spaces, quotes or control characters, bounded."""
    if len(text) > _MAX_PATH:
        text = text[:_MAX_PATH] + "..."
    if text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)  # quoted, escaped


class AccessRecord:
    """The message of one access-log record: its fields, rendered when a handler needs them.

    ``str()`` gives the text line; the JSON formatter merges ``fields`` into its object.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        parts = [
            f"{f['method']} {_clean(f['path'])} {f['status']} {f['cache']}",
            f"{f['bytes']}B" if f["bytes"] is not None else "-B",
            f"{f['duration_ms']}ms",
        ]
        for name in ("l2_ms", "l3_ms", "origin_ms"):
            if name in f:
                parts.append(f"{name[:-3]}={f[name]}ms")
        parts.append(f"rid={f['request_id']}")
        if f.get("client"):
            parts.append(f"client={_clean(f['client'])}")
        return " ".join(parts)


class AccessLog:
    """Writes the access line; ``enabled`` is decided once, at start-up."""

    __slots__ = ("_logger", "_wanted", "enabled")

    def __init__(self, wanted: bool) -> None:
        self._wanted = wanted
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self.enabled = False

    def start(self) -> None:
        self.enabled = self._wanted and self._logger.isEnabledFor(logging.INFO)

    def emit(
        self,
        method: str,
        path: str,
        status: int,
        cache: str,
        size: int | None,
        duration: float,
        timings: Mapping[str, float],
        rid: str,
        client: str | None,
    ) -> None:
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "status": status,
            "cache": cache,
            "bytes": size,
            "duration_ms": round(duration * 1000, 3),
        }
        for tier, seconds in timings.items():
            fields[f"{tier}_ms"] = round(seconds * 1000, 3)
        fields["request_id"] = rid
        fields["client"] = client
        # A record made directly: no caller lookup (findCaller walks the stack) per request.
        record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, AccessRecord(fields),
                                   None, None)
        self._logger.handle(record)


# ---- formatting and output -----------------------------------------------------------------


def _timestamp(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ the access fields, + exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(record.msg, AccessRecord):
            out["msg"] = "access"
            out.update(record.msg.fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the logging thread; never blocks, drops (and counts) when full."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if isinstance(record.msg, AccessRecord):
            return record  # plain immutable fields: the logging thread formats it
        prepared: logging.LogRecord = super().prepare(record)
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        global _dropped
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _dropped += 1


class _FormattedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records the queue handler has already formatted (``msg`` is the final line)
    as they are; formats access records, which reach it unformatted."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, AccessRecord):
            return super().format(record)
        return record.getMessage()


_listener: logging.handlers.QueueListener | None = None


def configure(level: str, fmt: str, stream: Any = None) -> None:
    """Route every log record through a bounded queue to one stream handler (stderr)."""
    global _listener
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    output = _FormattedStreamHandler(stream if stream is not None else sys.stderr)
    output.setFormatter(formatter)
    records: queue.Queue[logging.LogRecord] = queue.Queue(_QUEUE_SIZE)
    handler = _DroppingQueueHandler(records)
    handler.setFormatter(formatter)  # used by prepare() for everything but access records
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # No thread/process names in our formats: don't compute them per record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if _listener is not None:
        _listener.stop()
    else:
        atexit.register(_stop)
    _listener = logging.handlers.QueueListener(records, output)
    _listener.start()


def _stop() -> None:
    """Flush what is queued (at exit)."""
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()
