"""Rows whose remote server asked to be called again later: set aside until then, never waited for.

Within the engine's steps a remote model's refused call (429, 5xx, no answer) raises RetryLater
(backends/remote/retry.py) instead of sleeping: a sleep there would hold up every other row the engine
decodes. The sequences that call was for leave the running slots with their states, every model's rows as
they are, and wait here until the time the server asked for (its Retry-After, capped by the model's
retry_max_wait and jittered, else exponential backoff); the other sequences decode on meanwhile. When due,
the refusing model's logits of their rows are read again (one call) and the rows rejoin the slots. New
requests refused at their prefill wait here the same way and are admitted again when due. A server still
refusing after the model's `retries` ends them with its error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from logitfuse.backends.remote.retry import RetryLater, retry_wait
from logitfuse.engine.request import GenerationRequest
from logitfuse.engine.slots import ModelSlots

NAP = 0.02  # seconds the engine idles at most per step while every row it holds is set aside


@dataclass
class Part:
    """One model's rows of the held sequences: logits None where they must be read again (the refused model)."""

    backend: Any
    state: Any
    rids: list[str]
    logits: torch.Tensor | None


@dataclass
class Held:
    err: RetryLater
    due: float
    attempts: int  # retries so far
    parts: dict[str, Part] = field(default_factory=dict)  # running sequences: model -> its rows
    new: list[GenerationRequest] = field(default_factory=list)  # or requests refused at their prefill


class Deferred:
    """The held sequences and requests of one engine (its thread only)."""

    def __init__(self, get_backend: Callable[[str], Any]) -> None:
        self._get_backend = get_backend
        self._held: list[Held] = []
        self._tries: dict[str, int] = {}  # refusals so far of requests admitted again after one at prefill

    def __contains__(self, rid: str) -> bool:
        return any(rid in p.rids for h in self._held for p in h.parts.values()) or any(
            r.rid == rid for h in self._held for r in h.new)

    def __bool__(self) -> bool:
        return bool(self._held)

    def _when(self, err: RetryLater, attempts: int) -> float | None:
        """When to call again after `attempts` refusals, or None: the model's retries are spent."""
        backend = self._get_backend(err.model)
        if attempts > backend.retries:
            return None
        return time.monotonic() + retry_wait(attempts - 1, err.retry_after, backend.max_wait, base=0.5)

    def hold(self, slots: ModelSlots, rids: set[str], err: RetryLater, stale: set[str] | None = None,
             attempts: int = 1) -> bool:
        """Take the rows of `rids` out of every slot until the refusing model (err.model) may be called again,
        the logits of the `stale` models (default: that one) to be read again; False (nothing taken) when its
        retries are spent."""
        due = self._when(err, attempts)
        if due is None:
            return False
        held = Held(err, due, attempts)
        stale = {err.model} if stale is None else stale
        for name, slot in list(slots.items()):
            idx = [i for i, r in enumerate(slot.rows) if r in rids]
            if idx:
                logits = None if name in stale else slot.logits[idx]
                held.parts[name] = Part(slot.backend, slot.backend.select(slot.state, idx),
                                        [slot.rows[i] for i in idx], logits)
        slots.drop(rids)
        self._held.append(held)
        return True

    def hold_refused(self, slots: ModelSlots, failed: list[tuple[str, Exception]]) -> list[tuple[str, Exception]]:
        """After a step's forwards (slots.advance): the rows a remote server refused are held, with the
        sequences they belong to; returns the failures that remain."""
        refused = [(rid, err) for rid, err in failed if isinstance(err, RetryLater)]
        if not refused or not self.hold(slots, {rid for rid, _ in refused}, refused[0][1],
                                        stale={err.model for _, err in refused}):
            return failed
        return [(rid, err) for rid, err in failed if not isinstance(err, RetryLater)]

    def hold_new(self, reqs: list[GenerationRequest], err: RetryLater) -> bool:
        """Requests refused at their prefill wait to be admitted again; False when the retries are spent."""
        attempts = 1 + max((self._tries.get(r.rid, 0) for r in reqs), default=0)
        due = self._when(err, attempts)
        if due is not None:
            self._held.append(Held(err, due, attempts, new=reqs))
            self._tries.update({r.rid: attempts for r in reqs})
        return due is not None

    def due(self, slots: ModelSlots) -> tuple[list[GenerationRequest], list[tuple[str, Exception]]]:
        """Resume what is due: held rows read the refused model's logits again and rejoin the slots (or are
        held again). Returns the requests to admit again and the sequences that fail, with their error."""
        now, again, failed = time.monotonic(), [], []
        for held in [h for h in self._held if h.due <= now]:
            self._held.remove(held)
            if held.new:
                again += held.new
                continue
            try:
                for part in held.parts.values():
                    if part.logits is None:
                        part.logits = part.backend.refresh(part.state)
            except RetryLater as err:
                held.err, held.attempts = err, held.attempts + 1
                if (when := self._when(err, held.attempts)) is not None:
                    held.due = when
                    self._held.append(held)
                else:
                    failed += [(rid, err) for rid in self._rids(held)]
                continue
            except Exception as err:
                failed += [(rid, err) for rid in self._rids(held)]
                continue
            for name, part in held.parts.items():
                slots.join(name, part.backend, part.state, part.rids, part.logits)
        return again, failed

    @staticmethod
    def _rids(held: Held) -> list[str]:
        return list(dict.fromkeys(r for p in held.parts.values() for r in p.rids))

    def drop(self, gone: set[str]) -> None:
        """Ended sequences (aborted, past their deadline) and withdrawn requests leave what is held."""
        for rid in gone:
            self._tries.pop(rid, None)
        for held in list(self._held):
            held.new = [r for r in held.new if r.rid not in gone]
            for name, part in list(held.parts.items()):
                keep = [i for i, r in enumerate(part.rids) if r not in gone]
                if not keep:
                    del held.parts[name]
                elif len(keep) < len(part.rids):
                    part.state = part.backend.select(part.state, keep)
                    part.rids = [part.rids[i] for i in keep]
                    part.logits = None if part.logits is None else part.logits[keep]
            if not held.new and not held.parts:
                self._held.remove(held)

    def clear(self) -> None:
        self._held.clear()
        self._tries.clear()

    def nap(self) -> None:
        """Idle until the next held rows are due, at most NAP (new requests are admitted at the next step)."""
        if self._held:
            time.sleep(max(0.0, min(NAP, min(h.due for h in self._held) - time.monotonic())))
