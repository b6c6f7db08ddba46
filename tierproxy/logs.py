"""Logging: one access-log line per request, JSON or text, written off the event loop.

Loggers are named by area (``tierproxy.access``, ``tierproxy.tiers``, ``tierproxy.origin``...).
``TIERPROXY_LOG_FORMAT=json`` makes every line one JSON object; ``text`` is for people.

The access line carries method, path (the normalised key material), status, ``X-Cache``, bytes,
total time, time spent in each tier and at the origin, the client address and the request id.
It never carries request or response headers, so ``Authorization``, cookies and the purge token
cannot reach the log.

Cost on the hot path: whether the access log is on is decided once at start-up (level INFO on
``tierproxy.access`` and ``TIERPROXY_ACCESS_LOG=on``); when off, a request pays one attribute
check. When on, a request builds one small dict and one LogRecord (no caller lookup) and
formats one line. Lines are written by a writer thread in batches (every 50 ms, at once for
warnings): the event loop never waits on a write to stderr, and there is no thread wake-up per
line. The buffer is bounded; when a slow stderr reader lets it fill, lines are dropped and
counted (``tierproxy_log_lines_dropped``).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

__all__ = [
    "ACCESS_LOGGER",
    "AccessLog",
    "AccessRecord",
    "BatchingStreamHandler",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "dropped_lines",
    "request_id",
]

ACCESS_LOGGER = "tierproxy.access"
# One encoder for every line: json.dumps() with options builds a new one per call.
_JSON = json.JSONEncoder(default=str)
_BUFFER_LINES = 10_000
_FLUSH_INTERVAL = 0.05
_MAX_PATH = 2048

_dropped = 0


def dropped_lines() -> int:
    """Log lines dropped because the log buffer was full (process-wide)."""
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
    """Writes the access line; ``enabled`` is decided once, at start-up.

    When the line would reach exactly one :class:`BatchingStreamHandler` and nothing else (no
    filters, no other handlers - what :func:`configure` sets up), the line is formatted and
    handed to it directly, skipping the LogRecord and the handler chain; the output is the
    same. Any other logging set-up (tests' caplog, an extra handler) gets ordinary records.
    """

    __slots__ = ("_direct", "_logger", "_wanted", "enabled")

    def __init__(self, wanted: bool) -> None:
        self._wanted = wanted
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._direct: BatchingStreamHandler | None = None
        self.enabled = False

    def start(self) -> None:
        self.enabled = self._wanted and self._logger.isEnabledFor(logging.INFO)
        self._direct = _only_batching_handler(self._logger) if self.enabled else None

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
        if self._direct is not None:
            self._direct.emit_access(fields, time.time())
            return
        # A record made directly: no caller lookup (findCaller walks the stack) per request.
        record = logging.LogRecord(
            ACCESS_LOGGER, logging.INFO, "", 0, AccessRecord(fields), None, None
        )
        self._logger.handle(record)


# ---- formatting and output -----------------------------------------------------------------


class _SecondCache:
    """A formatted wall-clock second, reformatted only when the second changes."""

    __slots__ = ("_fmt", "_local", "_second", "_text")

    def __init__(self, fmt: str, local: bool) -> None:
        self._fmt = fmt
        self._local = local
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            parts = time.localtime(second) if self._local else time.gmtime(second)
            self._text = time.strftime(self._fmt, parts)
            self._second = second
        return self._text


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring_ascii(value)  # quoted and escaped
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return encode_basestring_ascii(str(value))


def _only_batching_handler(logger: logging.Logger) -> BatchingStreamHandler | None:
    """The handler an INFO record from ``logger`` reaches, if it is exactly one batching
    handler with an access-capable formatter and nothing on the way filters records."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (
        not isinstance(handler, BatchingStreamHandler)
        or handler.filters
        or handler.level > logging.INFO
        or not isinstance(handler.formatter, (JsonFormatter, TextFormatter))
    ):
        return None
    return handler


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ the access fields, + exc)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = _SecondCache("%Y-%m-%dT%H:%M:%S", local=False)

    def format_access(self, fields: dict[str, Any], created: float) -> str:
        """The JSON line of an access record made at ``created``, built directly: the fields
        are flat, named by us and of JSON types, and this is ~4x cheaper than an encoder."""
        msecs = int((created - int(created)) * 1000)
        parts = [
            (
                f'{{"ts": "{self._second(created)}.{msecs:03d}Z", "level": "INFO", '
                f'"logger": "{ACCESS_LOGGER}", "msg": "access"'
            )
        ]
        for name, value in fields.items():
            parts.append(f', "{name}": {_json_value(value)}')
        parts.append("}")
        return "".join(parts)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(record.msg, AccessRecord):
            return self.format_access(record.msg.fields, record.created)
        out["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return _JSON.encode(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = _SecondCache("%Y-%m-%d %H:%M:%S", local=True)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, AccessRecord):
            return self.format_access(record.msg.fields, record.created)
        return super().format(record)

    def format_access(self, fields: dict[str, Any], created: float) -> str:
        """What :meth:`format` gives for an access record made at ``created``."""
        msecs = int((created - int(created)) * 1000)
        return f"{self._second(created)},{msecs:03d} INFO {ACCESS_LOGGER}: {AccessRecord(fields)}"


class BatchingStreamHandler(logging.Handler):
    """Formats in the logging thread of the caller (cheap), writes from its own thread.

    ``emit`` appends the formatted line to a bounded buffer and returns; the writer thread
    writes what has accumulated every ``interval`` seconds (at once after a warning) in one
    call. A stderr that blocks stalls only the writer thread; the buffer then fills and new
    lines are dropped and counted instead of ever blocking the caller.
    """

    def __init__(
        self, stream: TextIO, *, max_lines: int = _BUFFER_LINES, interval: float = _FLUSH_INTERVAL
    ) -> None:
        super().__init__()
        self._stream = stream
        self._max_lines = max_lines
        self._interval = interval
        self._lines: deque[str] = deque()  # append/popleft are thread-safe
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tierproxy-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        global _dropped
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging.Handler contract: handleError, never raise
            self.handleError(record)
            return
        if len(self._lines) >= self._max_lines:
            _dropped += 1
            return
        self._lines.append(line)
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def emit_access(self, fields: dict[str, Any], created: float) -> None:
        """An access line without a LogRecord (see :class:`AccessLog`)."""
        global _dropped
        if len(self._lines) >= self._max_lines:
            _dropped += 1
            return
        formatter = self.formatter
        assert isinstance(formatter, (JsonFormatter, TextFormatter))
        self._lines.append(formatter.format_access(fields, created))

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._write()
        self._write()

    def _write(self) -> None:
        lines = [self._lines.popleft() for _ in range(len(self._lines))]
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: nowhere left to report it
            pass

    def flush(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=2.0)
        self._write()
        super().close()


_handler: BatchingStreamHandler | None = None


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route every log record to one batching stderr handler, as text or JSON lines."""
    global _handler
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = BatchingStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if old is _handler:
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # No thread/process names in our formats: don't compute them per record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if _handler is None:
        atexit.register(_close)
    _handler = handler


def _close() -> None:
    """Write out what is buffered (at exit)."""
    global _handler
    handler, _handler = _handler, None
    if handler is not None:
        handler.close()
