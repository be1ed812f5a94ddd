"""The engine on a background thread: requests come in from any thread, events go out to per-request sinks.

Used by the server (sinks put events on asyncio queues) and by anything else that wants concurrent
callers to share one continuously batched engine. A failing step fails the sequences that were running,
each with an error event, and leaves the engine ready for the next request.
"""

from __future__ import annotations

import logging
import threading
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
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> EngineRunner:
        self._thread = threading.Thread(target=self._loop, name="logitfuse-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def pending(self) -> int:
        """Sequences waiting or running."""
        with self._cond:
            return len(self._sinks)

    def submit(self, requests: list[GenerationRequest], sink: Sink) -> None:
        """Pin the requests' models (loading them in the caller's thread), then queue them.

        Raises InvalidRequest (and queues nothing) when the engine refuses one of them.
        """
        pinned = [list(r.plan.models()) + list(r.plan.rewards()) for r in requests]
        for names in pinned:
            self.lf.pool.acquire(names)
        try:
            with self._cond:
                for r in requests:
                    self.engine.check(r)
                for r, names in zip(requests, pinned):
                    self.engine.add(r)
                    self._sinks[r.rid] = (sink, names)
                self._cond.notify_all()
        except BaseException:
            for names in pinned:
                self.lf.pool.release(names)
            raise

    def abort(self, rid: str) -> None:
        with self._cond:
            if rid in self._sinks:
                self.engine.abort(rid)
                self._cond.notify_all()

    def _loop(self) -> None:
        self.lf.apply_threads()
        while True:
            with self._cond:
                while not self._stopping and not self.engine.has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                try:
                    events = self.engine.step()
                except Exception as err:  # a failing step must not take the server down
                    log.exception("engine step failed")
                    events = self._fail_all(err)
            for ev in events:
                self._deliver(ev)

    def _fail_all(self, err: Exception) -> list[TokenEvent]:
        rids = list(self.engine.seqs) + [r.rid for r in self.engine.waiting]
        self.engine.seqs.clear()
        self.engine.slots.clear()
        self.engine.waiting.clear()
        msg = f"{type(err).__name__}: {err}"
        return [TokenEvent(rid, None, "", finish_reason="error", error=msg) for rid in rids]

    def _deliver(self, ev: TokenEvent | PromptScores) -> None:
        with self._cond:
            entry = self._sinks.get(ev.rid)
            done = isinstance(ev, TokenEvent) and ev.finish_reason is not None
            if done:
                self._sinks.pop(ev.rid, None)
        if entry is None:
            return
        sink, names = entry
        try:
            sink(ev)
        except Exception:
            log.exception("event sink failed for %s", ev.rid)
        if done:
            self.lf.pool.release(names)
