"""The engine on a background thread: requests come in from any thread, events go out to per-request sinks.

Used by the server (sinks hand events to the event loop) and by anything else that wants concurrent
callers to share one continuously batched engine. Callers never wait for a step to finish: new requests
and aborts go to an inbox that the engine thread drains at every step boundary, so requests arriving
together are prefilled together. A failing step fails the sequences that were running, each with an
error event, and leaves the engine ready for the next request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from logitfuse.api import LogitFuse
from logitfuse.request import GenerationRequest, PromptScores, TokenEvent

log = logging.getLogger("logitfuse.runner")
Sink = Callable[[TokenEvent | PromptScores], None]


class EngineRunner:
    def __init__(self, lf: LogitFuse) -> None:
        self.lf = lf
        self.engine = lf.engine
        self._sinks: dict[str, tuple[Sink, list[str]]] = {}
        self._lock = threading.Lock()  # guards _sinks and _inbox, never held during a step
        self._inbox: deque[GenerationRequest | str] = deque()  # requests to add, rids to abort
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> EngineRunner:
        self._thread = threading.Thread(target=self._loop, name="logitfuse-engine", daemon=True)
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

    def submit(self, requests: list[GenerationRequest], sink: Sink) -> None:
        """Pin the requests' models (loading them in the caller's thread), validate, then queue them.

        Raises InvalidRequest (and queues nothing) when the engine refuses one of them.
        """
        pinned = [list(r.plan.models()) + list(r.plan.rewards()) for r in requests]
        for names in pinned:
            self.lf.pool.acquire(names)
        try:
            for r in requests:
                self.engine.check(r)
        except BaseException:
            for names in pinned:
                self.lf.pool.release(names)
            raise
        with self._lock:
            for r, names in zip(requests, pinned):
                self._sinks[r.rid] = (sink, names)
                self._inbox.append(r)
        self._wake.set()

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
                self.engine.abort(item)
                continue
            try:
                self.engine.add(item)
            except Exception as err:  # e.g. a duplicate id: only this request fails
                failed.append(TokenEvent(item.rid, None, "", finish_reason="error", error=str(err)))
        return failed

    def _loop(self) -> None:
        self.lf.apply_threads()
        while not self._stopping:
            self._wake.clear()
            events = self._drain()
            if not self.engine.has_work():
                for ev in events:
                    self._deliver(ev)
                if not events:
                    self._wake.wait()
                continue
            try:
                events += self.engine.step()
            except Exception as err:  # a failing step must not take the server down
                log.exception("engine step failed")
                events += self.engine.fail_all(err)
            for ev in events:
                self._deliver(ev)

    def _deliver(self, ev: TokenEvent | PromptScores) -> None:
        done = isinstance(ev, TokenEvent) and ev.finish_reason is not None
        with self._lock:
            entry = self._sinks.pop(ev.rid, None) if done else self._sinks.get(ev.rid)
        if entry is None:
            return
        sink, names = entry
        try:
            sink(ev)
        except Exception:
            log.exception("event sink failed for %s", ev.rid)
        if done:
            self.lf.pool.release(names)
