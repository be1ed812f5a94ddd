"""App factory with a lifespan: the library, its engine thread and the serving layer live on app.state."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from logitfuse.api import LogitFuse
from logitfuse.registry import Registry
from logitfuse.runner import EngineRunner
from service import errors
from service.metrics import Metrics
from service.metrics import install as install_metrics
from service.routes import router
from service.serving import Serving

log = logging.getLogger("logitfuse.service")


def preload(lf: LogitFuse) -> None:
    """Load every ensemble's models and check each ensemble's shared vocabulary once, at start-up."""
    for name in lf.registry.ensembles:
        plan = lf.registry.plan(name)
        for m in plan.models() + plan.rewards():
            lf.pool.get(m)
        lf.engine.alignment(plan)


def create_app(source: str | Path | Registry | LogitFuse) -> FastAPI:
    lf = source if isinstance(source, LogitFuse) else LogitFuse(source)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if lf.registry.server.preload:
            preload(lf)
        runner = EngineRunner(lf).start()
        app.state.serving = Serving(lf, runner)
        log.info("serving %s", ", ".join(lf.registry.names()))
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="logitfuse", lifespan=lifespan)
    app.state.metrics = Metrics()
    errors.install(app)
    install_metrics(app, app.state.metrics)
    app.include_router(router)
    return app


def run_server(config: str, host: str | None, port: int | None, log_level: str = "info") -> int:
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lf = LogitFuse(config)
    except (ValueError, FileNotFoundError) as err:
        log.error("cannot start: %s", err)
        return 2
    server = lf.registry.server
    uvicorn.run(create_app(lf), host=host or server.host, port=port or server.port, log_level=log_level)
    return 0


def start_in_thread(source, host: str = "127.0.0.1", timeout: float = 60.0):
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
    server = uvicorn.Server(uvicorn.Config(create_app(source), host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url, deadline = f"http://{host}:{port}", time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start on {url} within {timeout} s")
