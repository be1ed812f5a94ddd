"""The engine on a background thread: requests come in from any thread, events go out to per-request sinks.

Used by the server (sinks hand events to the event loop) and by anything else that wants concurrent
callers to share one continuously batched engine. Callers never wait for a step to finish: new requests
and aborts go to an inbox that the engine thread drains at every step boundary, so requests arriving
together are prefilled together. A failing step fails the sequences that were running, each with an
error event, and leaves the engine ready for the next request.

Admission is bounded: at most `QueueBound.limit` sequences may be waiting (submitted, not yet decoding)
across the runners sharing the bound, checked and registered under one lock, so a burst of concurrent
submissions cannot overshoot it; running sequences are not counted (max_batch bounds those).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch

from logitfuse.api import LogitFuse
from logitfuse.engine.core import EngineStats
from logitfuse.engine.request import ErrorDetail, GenerationRequest, PromptScores, TokenEvent
from logitfuse.errors import Overloaded

log = logging.getLogger("logitfuse.runner")
Sink = Callable[[TokenEvent | PromptScores], None]


class Timings(Protocol):
    """Where a runner reports each sequence's timings (service/metrics.py: RequestTimes), in seconds."""

    def first_token(self, lane: str, queued: float, ttft: float) -> None: ...

    def next_token(self, lane: str, gap: float) -> None: ...

    def finished(self, lane: str, seconds: float) -> None: ...


class QueueBound:
    """At most `limit` waiting sequences across the runners that share this bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()  # taken before any runner's own lock, never after
        self.runners: list[EngineRunner] = []

    def waiting(self) -> int:
        return sum(r.waiting() for r in self.runners)

    def refuse_beyond(self, adding: int) -> None:
        """Raise Overloaded when `adding` more waiting sequences would pass the limit (call under self.lock)."""
        waiting = self.waiting()
        if waiting + adding > self.limit:
            raise Overloaded(f"server overloaded: {waiting} sequences are waiting, this request adds "
                             f"{adding}, at most {self.limit} may wait (server.max_queue)")


class EngineRunner:
    def __init__(self, lf: LogitFuse, engine=None, bound: QueueBound | None = None, threads: int | None = None,
                 name: str = "logitfuse-engine", lane: str = "main", timings: Timings | None = None) -> None:
        self.lf = lf
        self.engine = engine or lf.engine
        self.bound = bound or QueueBound(lf.settings.max_queue)
        self.bound.runners.append(self)
        self.threads, self.name = threads, name  # torch intra-op threads of the engine thread (None: lf's)
        self.lane, self.timings = lane, timings
        self._running = 0  # sequences the engine was decoding after its last step (engine thread writes)
        # rid -> (sink, pinned models, [submitted, last token delivered] on the monotonic clock)
        self._sinks: dict[str, tuple[Sink, list[str], list[float]]] = {}
        self._lock = threading.Lock()  # guards _sinks and _inbox, never held during a step
        self._inbox: deque[GenerationRequest | str] = deque()  # requests to add, rids to abort
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> EngineRunner:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def pending(self) -> int:
        """Sequences waiting or running."""
        with self._lock:
            return len(self._sinks)

    def stats(self) -> EngineStats:
        """This lane's engine counts (read without the engine's lock: a snapshot suffices for metrics)."""
        return self.engine.stats()

    def waiting(self) -> int:
        """Sequences submitted and not yet decoding (queued here or in the engine)."""
        with self._lock:
            return len(self._sinks) - self._running

    def submit(self, requests: list[GenerationRequest], sink: Sink) -> None:
        """Pin the requests' models (loading them in the caller's thread), validate, then queue them.

        Raises InvalidRequest when the engine refuses one of them, Overloaded when the waiting sequences
        would exceed the bound; either way nothing is queued.
        """
        pinned = [list(r.plan.models()) + list(r.plan.rewards()) for r in requests]
        for names in pinned:
            self.lf.pin(names)
        try:
            for r in requests:
                self.engine.check(r)
            self._register(requests, pinned, sink)
        except BaseException:
            for names in pinned:
                self.lf.unpin(names)
            raise
        self._wake.set()

    def _register(self, requests: list[GenerationRequest], pinned: list[list[str]], sink: Sink) -> None:
        with self.bound.lock:
            self.bound.refuse_beyond(len(requests))
            now = time.monotonic()
            with self._lock:
                for r, names in zip(requests, pinned):
                    self._sinks[r.rid] = (sink, names, [now, 0.0])
                    self._inbox.append(r)

    def abort(self, rid: str) -> None:
        with self._lock:
            if rid in self._sinks:
                self._inbox.append(rid)
        self._wake.set()

    def _drain(self) -> list[TokenEvent]:
        """Move the inbox into the engine (engine thread only)."""
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        failed = []
        for item in items:
            if isinstance(item, str):
                running = self.engine.is_running(item)
                self.engine.abort(item)
                if not running:  # it was still waiting: it leaves now, and its sink is told
                    failed.append(TokenEvent(item, None, "", finish_reason="abort"))
                continue
            try:
                self.engine.add(item)
            except Exception as err:  # e.g. a duplicate id: only this request fails
                failed.append(TokenEvent(item.rid, None, "", finish_reason="error", error=str(err),
                                         error_detail=ErrorDetail.of(err)))
        return failed

    def _loop(self) -> None:
        self.lf.apply_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._stopping:
            self._wake.clear()
            events = self._drain()
            began = time.monotonic()  # the step that admits a waiting sequence begins now
            if not self.engine.has_work():
                for ev in events:
                    self._deliver(ev, began)
                if not events:
                    self._wake.wait()
                continue
            events += self._step()
            for ev in events:
                self._deliver(ev, began)
            with self._lock:
                self._running = self.engine.stats().running

    def _step(self) -> list[TokenEvent | PromptScores]:
        """One engine step. A failing step must not take the server down: it ends every sequence of the lane
        with an error event. One line is logged here; the traceback travels on each error event
        (TokenEvent.error_detail) to be logged once, with the request id, by whoever reports the failure
        (the server: with the 5xx)."""
        try:
            return self.engine.step()
        except Exception as err:
            ended = self.engine.fail_all(err)
            log.error("engine step failed in lane %s (%s: %s): its state is dropped, ending sequences %s",
                      self.lane, type(err).__name__, err, " ".join(ev.rid for ev in ended) or "(none)")
            return ended

    def _deliver(self, ev: TokenEvent | PromptScores, began: float) -> None:
        done = isinstance(ev, TokenEvent) and ev.finish_reason is not None
        with self._lock:
            entry = self._sinks.pop(ev.rid, None) if done else self._sinks.get(ev.rid)
        if entry is None:
            return
        sink, names, clock = entry
        if self.timings is not None:
            self._time(ev, clock, began, done)
        try:
            sink(ev)
        except Exception:
            log.exception("event sink failed for %s", ev.rid)
        if done:
            self.lf.unpin(names)

    def _time(self, ev: TokenEvent | PromptScores, clock: list[float], began: float, done: bool) -> None:
        """Report a sequence's timings as its events are delivered (engine thread only: clock is its own)."""
        report_times(self.timings, self.lane, ev, clock, began - clock[0], done)


def report_times(timings: Timings, lane: str, ev: TokenEvent | PromptScores, clock: list[float], queued: float,
                 done: bool) -> None:
    """A sequence's timings as its events are delivered, for any lane: clock is [submitted, last token] on the
    monotonic clock (updated here); queued: how long it waited before its first step, reported with its first
    token."""
    now = time.monotonic()
    if isinstance(ev, TokenEvent) and ev.token_id is not None:
        submitted, last = clock
        if last == 0.0:
            timings.first_token(lane, queued, now - submitted)
        else:
            timings.next_token(lane, now - last)
        clock[1] = now
    if done:
        timings.finished(lane, now - clock[0])
