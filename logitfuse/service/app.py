"""App factory with a lifespan: the library, its engine threads and the serving layer live on app.state.

`run_server` runs it under uvicorn with the limits of the registry's `server` section: at most
max_connections open connections (503 beyond), keep_alive_timeout for idle connections, header_timeout for
a request's headers (uvicorn has none: a half-sent request would hold its connection open for ever).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI

from logitfuse.api import LogitFuse
from logitfuse.config.registry import Registry
from logitfuse.runner import EngineRunner, QueueBound, Timings
from logitfuse.service import error_handlers as errors
from logitfuse.service import playground
from logitfuse.service.metrics import Metrics
from logitfuse.service.metrics import install as install_metrics
from logitfuse.service.middleware import Guard, Limits
from logitfuse.service.routes import router
from logitfuse.service.serving import Serving

log = logging.getLogger("logitfuse.service")


def settle(lf: LogitFuse, failed: dict[str, str]) -> None:
    """Under server.on_bad_entry: skip, serve without the ensembles that failed to load (listed in
    /health); under refuse, stop with all of them."""
    if not failed:
        return
    if lf.settings.on_bad_entry == "refuse":
        raise ValueError(f"{len(failed)} ensemble(s) failed to load:\n  " + "\n  ".join(failed.values()))
    log.warning("serving without %s", "; ".join(failed.values()))
    lf.skip(failed)


def runners(lf: LogitFuse, timings: Timings | None = None) -> tuple[EngineRunner, EngineRunner | None]:
    """The main engine thread and, with server.rollout_lane, a second one for rows of a method with rollouts
    (Transfer Q*: its own engine over the same pool, on half the CPU threads), sharing one max_queue bound."""
    server = lf.settings
    bound = QueueBound(server.max_queue)
    main = EngineRunner(lf, bound=bound, timings=timings).start()
    if not server.rollout_lane:
        return main, None
    threads = max(1, (server.cpu_threads or torch.get_num_threads()) // 2)
    return main, EngineRunner(lf, lf.make_engine(), bound, threads, "logitfuse-rollouts", "rollouts",
                              timings).start()


def check_hosted(lf: LogitFuse) -> None:
    """Before anything starts: every `engine: vllm` entry's engine arguments (ValueError naming the key), and
    that vLLM is installed where one is asked for."""
    if lf.hosted_models():
        from logitfuse.vllm.translate import engine_args

        for name in lf.hosted_models():
            engine_args(lf, name)


def start_hosted(lf: LogitFuse, bound: QueueBound, timings: Timings | None = None) -> dict:
    """An in-process vLLM engine for every `engine: vllm` model (each blocks until ready)."""
    if not lf.hosted_models():
        return {}
    from logitfuse.vllm.engine import VLLMLane

    started = {}
    try:
        for name in lf.hosted_models():
            started[name] = VLLMLane(lf, name, bound, timings).start()
    except BaseException:
        for lane in started.values():
            lane.stop()
        raise
    return started


def api_keys(flags: list[str] | None, environ: dict | None = None) -> list[str]:
    """Keys from `serve --api-key` and the LOGITFUSE_API_KEY environment variable (comma-separated);
    the registry's server.api_keys are added by create_app."""
    env = (os.environ if environ is None else environ).get("LOGITFUSE_API_KEY", "")
    return [k for k in (flags or []) + [k.strip() for k in env.split(",")] if k]


def create_app(source: str | Path | Registry | LogitFuse, extra_keys: list[str] | None = None) -> FastAPI:
    lf = source if isinstance(source, LogitFuse) else LogitFuse(source)
    server = lf.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if lf.settings.read_tokenizers:  # before serving: a parse holds the interpreter lock (tokenizers.py)
            for folder, reason in (await asyncio.to_thread(lf.read_tokenizers)).items():
                log.warning("tokenizer of %s not read at start-up: %s", folder, reason)
        if lf.settings.preload and not getattr(app.state, "preloaded", False):
            settle(lf, lf.preload())
        lanes = runners(lf, app.state.metrics.times)
        hosted = await asyncio.to_thread(start_hosted, lf, lanes[0].bound, app.state.metrics.times)
        lanes = (*lanes, *hosted.values())
        app.state.serving = Serving(lf, lanes[0], lanes[1], hosted)
        log.info("serving %s", ", ".join(lf.names()))
        if skipped := lf.health()["skipped"]:
            log.warning("left out (server.on_bad_entry: skip): %s", "; ".join(skipped.values()))
        try:
            yield
        finally:
            app.state.serving.close()
            for r in lanes:
                if r is not None:
                    r.stop()

    app = FastAPI(title="logitfuse", lifespan=lifespan)
    app.state.metrics = Metrics(lambda: getattr(app.state, "serving", None))
    errors.install(app)
    install_metrics(app, app.state.metrics)
    app.include_router(router)
    public = tuple(server.public_paths)
    if server.playground:  # the page and its assets load without a key; its API calls send one (playground.py)
        app.include_router(playground.router)
        public += playground.PATHS
    keys = tuple(dict.fromkeys(list(server.api_keys) + list(extra_keys or [])))
    app.add_middleware(Guard, limits=Limits(keys, public, server.max_body_bytes, server.body_timeout),
                       metrics=app.state.metrics)
    return app


def run_server(config: str, host: str | None, port: int | None, log_level: str = "info",
               keys: list[str] | None = None) -> int:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lf = LogitFuse(config)
        check_hosted(lf)
        if lf.settings.read_tokenizers:  # first: the preload's vocabulary probes and loads then reuse them
            lf.read_tokenizers()
        if lf.settings.preload:  # before listening, so that a failure ends the process cleanly
            settle(lf, lf.preload())
    except (ValueError, FileNotFoundError) as err:
        log.error("cannot start: %s", err)
        return 2
    import uvicorn

    server = lf.settings
    config = uvicorn_config(lf, host or server.host, port or server.port, log_level, api_keys(keys))
    config.app.state.preloaded = True
    uvicorn.Server(config).run()
    return 0


def uvicorn_config(lf: LogitFuse, host: str, port: int, log_level: str, keys: list[str] | None = None):
    """uvicorn's settings from the registry's server section (our own access log line replaces uvicorn's)."""
    import uvicorn

    server = lf.settings
    return uvicorn.Config(create_app(lf, keys), host=host, port=port, log_level=log_level, access_log=False,
                          limit_concurrency=server.max_connections, timeout_keep_alive=server.keep_alive_timeout,
                          http=header_timeout_protocol(server.header_timeout))


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within `seconds`
    of opening or of its last response."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            armed = self.cycle
            self.loop.call_later(seconds, lambda: self._expire(armed))

        def _expire(self, armed) -> None:
            if self.cycle is armed and not self.transport.is_closing():  # no new request head since armed
                self.transport.close()

    return HeaderTimeout


def start_in_thread(source, host: str = "127.0.0.1", timeout: float = 60.0, keys: list[str] | None = None):
    """Start the server on a free loopback port in a daemon thread (tests, benchmarks).
    Returns (base URL, uvicorn server); set `server.should_exit = True` to stop it."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    lf = source if isinstance(source, LogitFuse) else LogitFuse(source)
    server = uvicorn.Server(uvicorn_config(lf, host, port, "warning", keys))
    threading.Thread(target=server.run, daemon=True).start()
    url, deadline = f"http://{host}:{port}", time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start on {url} within {timeout} s")
