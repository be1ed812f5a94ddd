"""Every 5xx in the server's log once, with its request id, and counted by cause.

Where a 5xx is made (an exception handler, the guard for an exception no handler took, a stream's in-band error
event) its Failure is kept on the request's ASGI state; the guard writes it when the request ends, before the
access line: one line (ERROR for a 500, WARNING for a 503) naming the request id, the status, the cause (the
exception's type name, or a fault's name for an engine fault that raised nothing) and the message, followed
by the traceback. An engine failure's traceback was taken where the engine caught it and came on the error
event. A traceback identical to one written in the last minute is not repeated (a failing engine step ends the
sequences of every request in its lane with one exception): the line names the request id it was written
with. Counted as logitfuse_request_errors_total{path,status,cause}.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("logitfuse.service")
REPEAT_WINDOW = 60.0  # seconds within which an identical traceback is named, not written again
REMEMBERED = 256  # tracebacks remembered for that


@dataclass(frozen=True)
class Failure:
    status: int
    cause: str  # the exception's type name, or a fault's name
    message: str
    trace: str | None = None  # the formatted traceback, where there is one
    sequence: str | None = None  # the engine's id of the sequence that failed, for a generation failure

    @classmethod
    def of(cls, status: int, err: BaseException) -> Failure:
        return cls(status, type(err).__name__, f"{type(err).__name__}: {err}", format_trace(err))


def format_trace(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def keep(state: dict, failure: Failure) -> None:
    """Keep a request's failure for the guard to write; the first is the one its answer reports."""
    state.setdefault("failure", failure)


class FailureLog:
    """Writes and counts failures (event loop only: the tracebacks it remembers are its own)."""

    def __init__(self, counter, window: float = REPEAT_WINDOW) -> None:
        self.counter, self.window = counter, window
        self.written: OrderedDict[str, tuple[str, float]] = OrderedDict()  # traceback -> (request id, when)

    def write(self, request_id: str | None, path: str, label: str, failure: Failure) -> None:
        """label: the path's bounded label value (unknown paths are `other`)."""
        self.counter.labels(label, str(failure.status), failure.cause).inc()
        line = (f"request_id={request_id} status={failure.status} cause={failure.cause} path={json.dumps(path)}"
                + (f" sequence={failure.sequence}" if failure.sequence else "")
                + f" error={json.dumps(failure.message)}")
        level = logging.ERROR if failure.status == 500 else logging.WARNING
        if failure.trace is None:
            log.log(level, line)
            return
        now = time.monotonic()
        first = self.written.get(failure.trace)
        if first is not None and now - first[1] < self.window:
            log.log(level, "%s traceback=\"as written with request_id=%s\"", line, first[0])
            return
        self.written[failure.trace] = (str(request_id), now)
        self.written.move_to_end(failure.trace)
        while len(self.written) > REMEMBERED:
            self.written.popitem(last=False)
        log.log(level, "%s\n%s", line, failure.trace.rstrip("\n"))
