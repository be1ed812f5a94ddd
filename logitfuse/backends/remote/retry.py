"""One retry policy for every HTTP client of the project (the remote backend, `generate --server`).

Which answers are retried is the caller's business; how long to wait is decided here: the server's
Retry-After (RFC 9110 section 10.2.3: delay-seconds, or an HTTP-date) when it sends one, else exponential
backoff; always capped, always jittered (so that clients refused together do not return together), never
negative. The caller waits (the batch client with asyncio, the backend on its request threads), except where
it must not: within `retries_deferred()` (the engine's steps, whose thread decodes every other row too) the
backend raises RetryLater instead, and the engine sets the rows aside until they are due (engine/deferral.py).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timezone
from email.utils import parsedate_to_datetime

from logitfuse.errors import RemoteError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
JITTER = 0.1  # waits grow by up to this fraction (or, at the cap, shrink by it)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The wait a Retry-After header asks for, in seconds from `now` (time.time()); None when absent or
    unreadable (then the caller's own backoff applies). A date in the past asks for no wait."""
    if value is None or not (value := value.strip()):
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form without a zone is read as GMT too
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def retry_wait(attempt: int, retry_after: str | None, cap: float, base: float = 0.25,
               rng: Callable[[], float] = random.random, now: float | None = None) -> float:
    """Seconds to wait before retry number `attempt + 1` (attempt counts from 0): what the server asked for,
    or base * 2**attempt without an answer from it, plus up to JITTER of it, and never more than `cap`."""
    asked = retry_after_seconds(retry_after, now)
    target = asked if asked is not None else base * 2.0 ** min(attempt, 62)
    wait = target * (1.0 + JITTER * rng())
    return wait if wait <= cap else cap * (1.0 - JITTER * rng())


class RetryLater(RemoteError):
    """A remote model's server asked to be called again later (a retryable status, or no answer), where the
    caller may not wait: retry_after is its Retry-After header (None: none sent), to pass to retry_wait."""

    def __init__(self, message: str, status: int | None, model: str, retry_after: str | None) -> None:
        super().__init__(message, status)
        self.model, self.retry_after = model, retry_after


_mode = threading.local()  # a per-thread mode, as torch.no_grad is: whether this thread may wait to retry


@contextmanager
def retries_deferred(defer: bool = True) -> Iterator[None]:
    """Within it, on this thread, a remote call that would wait before retrying raises RetryLater instead
    (defer=False: waits as usual). A backend that fans calls out to other threads carries the mode there."""
    before = deferring()
    _mode.defer = defer
    try:
        yield
    finally:
        _mode.defer = before


def deferring() -> bool:
    """Whether retries_deferred is active on this thread."""
    return getattr(_mode, "defer", False)
