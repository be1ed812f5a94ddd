"""The ASGI layer in front of every route: request id, API key, body limits, metrics and the access log line.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so that the routes' `receive` is the server's
own: a client that goes away is seen as `http.disconnect` while a request is being generated. Order per
request: request id, then the key (before the body is read, so an unauthenticated client learns nothing
about the schema), then the body size and arrival time, then the app.

Every request gets one access line and one count: at the last byte of its response, or when the app returns
for a client that left before that (status 499, as nginx writes it: a stream cut mid-way, a JSON client that
gave up). An exception no handler took is answered here with the 500 envelope (so uvicorn never logs it a
second time), and every 5xx is logged once with its request id and counted by cause (failures.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logitfuse.service.error_handlers import as_api_error, envelope, note_failure
from logitfuse.service.failures import FailureLog
from logitfuse.service.metrics import KNOWN_PATHS, Metrics

access_log = logging.getLogger("logitfuse.access")
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before its answer ended
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # echoed as is; anything else is replaced by a new id


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's X-Request-Id when it is a safe token, else a fresh one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def key_ok(auth: str, keys: list[bytes]) -> bool:
    """`Bearer <key>` against every configured key in constant time (no early exit on the first match)."""
    given = auth[len("Bearer "):].encode() if auth.startswith("Bearer ") else b""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return ok and bool(given)


@dataclass(frozen=True)
class Limits:
    api_keys: tuple[str, ...] = ()
    public_paths: tuple[str, ...] = ("/health",)
    max_body_bytes: int = 512 * 1024
    body_timeout: float = 30.0


class TooLarge(Exception):
    pass


class Exchange:
    """One request as the guard sees it: the status sent, whether the response has ended, and whether the
    client left before it did (the server's receive said http.disconnect while the response was unfinished)."""

    def __init__(self, receive: Receive, send: Send, rid: str, done: Callable[[int], None]) -> None:
        self._receive, self._send, self.rid, self._done = receive, send, rid, done
        self.status: int | None = None  # sent with http.response.start
        self.ended = self.cut = self.closed = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.ended:
            self.cut = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", self.rid.encode())]}
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True
            self.close()  # the line is written at the last byte

    def close(self) -> None:
        """Report the request once, with 499 (nginx's "client closed request") for a client that left before
        its answer ended, whatever the app went on to send, and 500 when nothing was sent."""
        if not self.closed:
            self.closed = True
            self._done(CLIENT_CLOSED if self.cut else self.status or 500)


class Guard:
    def __init__(self, app: ASGIApp, limits: Limits, metrics: Metrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics
        self.keys = [k.encode() for k in limits.api_keys]
        self.failures = FailureLog(metrics.errors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        ex = Exchange(receive, send, rid, lambda status: self._done(scope, status, t0))
        try:
            refusal = self._refusal(scope, headers)
            app_receive = ex.receive
            if refusal is None:
                app_receive, refusal = await self._read_body(ex.receive, headers)
            if refusal is not None:
                await _reply(ex.send, *refusal)
                return
            await self.app(scope, app_receive, ex.send)
        except Exception as err:  # no handler took it: answered here, so that it is logged once (not by uvicorn)
            await self._failed(scope, ex, err)
        finally:  # a cut stream ends here, cancelled, with its response unfinished
            ex.close()

    async def _failed(self, scope: Scope, ex: Exchange, err: Exception) -> None:
        if ex.cut and isinstance(err, ClientDisconnect):
            return  # the client left while its body was read: no fault of the server's
        api = as_api_error(err, ex.rid)
        note_failure(scope, api.status, err)
        if ex.status is None and not ex.cut:
            await _reply(ex.send, api.status, api.message, api.param, api.headers)

    def _refusal(self, scope: Scope, headers: dict) -> tuple[int, str, str | None] | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if self.keys and scope["path"] not in self.limits.public_paths and not key_ok(auth, self.keys):
            return 401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return 413, f"request body is over this server's limit of {self.limits.max_body_bytes} bytes " \
                        "(server.max_body_bytes)", "body"
        return None

    async def _read_body(self, receive: Receive, headers: dict):
        """The whole body within max_body_bytes and body_timeout, replayed to the app; or a refusal."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.body_timeout
        try:
            while True:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.001))
                if message["type"] != "http.request":
                    return receive, None  # the client left: let the app see it
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.limits.max_body_bytes:
                    raise TooLarge
                if not message.get("more_body", False):
                    break
        except TooLarge:
            return receive, (413, f"request body is over this server's limit of {self.limits.max_body_bytes} "
                                  "bytes (server.max_body_bytes)", "body")
        except asyncio.TimeoutError:
            return receive, (408, f"the request body did not arrive within {self.limits.body_timeout:g} s "
                                  "(server.body_timeout)", "body")
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None

    def _done(self, scope: Scope, status: int, t0: float) -> None:
        seconds = time.perf_counter() - t0
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
        state = scope["state"]
        if (failure := state.get("failure")) is not None:
            self.failures.write(state.get("request_id"), scope["path"], path, failure)
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        access_log.info(access_line(scope, status, seconds))


def access_line(scope: Scope, status: int, seconds: float) -> str:
    """One line per request; every client-chosen string is JSON-escaped (no CR/LF can forge a line)."""
    st = scope.get("state", {})
    usage = st.get("usage") or (0, 0)
    return (f"request_id={st.get('request_id')} method={scope['method']} path={json.dumps(scope['path'])} "
            f"status={status} latency_ms={seconds * 1000:.1f} prompt_tokens={usage[0]} "
            f"completion_tokens={usage[1]} model={json.dumps(st.get('model'))} user={json.dumps(st.get('user'))}")


async def _reply(send: Send, status: int, message: str, param: str | None, extra: dict | None = None) -> None:
    body = json.dumps(envelope(status, message, param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
