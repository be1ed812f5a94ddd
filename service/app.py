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


def preload(lf: LogitFuse) -> dict[str, str]:
    """Load every ensemble's models and check each ensemble's shared vocabulary once, at start-up.
    Returns the ensembles that failed (a checkpoint that does not load, vocabularies that do not match)
    with the reason, all of them rather than the first."""
    from logitfuse.registry_check import vocab_problems

    failed = vocab_problems(lf.registry)
    if failed and lf.registry.server.on_bad_entry == "refuse":
        return failed  # found from the tokenizers alone: stop before loading any weights
    for name in lf.registry.ensembles:
        if f"ensembles.{name}" in failed:
            continue
        try:
            plan = lf.registry.plan(name)
            for m in plan.models() + plan.rewards():
                lf.pool.get(m)
            lf.engine.fuser.alignment(plan)
        except Exception as err:  # every failure is reported, with its entry
            failed[f"ensembles.{name}"] = f"ensembles.{name}: {err}"
    return failed


def settle(lf: LogitFuse, failed: dict[str, str]) -> None:
    """Under server.on_bad_entry: skip, serve without the ensembles that failed to load (listed in
    /health); under refuse, stop with all of them."""
    if not failed:
        return
    if lf.registry.server.on_bad_entry == "refuse":
        raise ValueError(f"{len(failed)} ensemble(s) failed to load:\n  " + "\n  ".join(failed.values()))
    log.warning("serving without %s", "; ".join(failed.values()))
    reg = lf.registry
    keep = {n: e for n, e in reg.ensembles.items() if f"ensembles.{n}" not in failed}
    lf.registry = lf.pool.registry = reg.model_copy(update={"ensembles": keep, "skipped": reg.skipped | failed})


def create_app(source: str | Path | Registry | LogitFuse) -> FastAPI:
    lf = source if isinstance(source, LogitFuse) else LogitFuse(source)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if lf.registry.server.preload and not getattr(app.state, "preloaded", False):
            settle(lf, preload(lf))
        runner = EngineRunner(lf).start()
        app.state.serving = Serving(lf, runner)
        log.info("serving %s", ", ".join(lf.registry.names()))
        if lf.registry.skipped:
            log.warning("left out (server.on_bad_entry: skip): %s", "; ".join(lf.registry.skipped.values()))
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
        if lf.registry.server.preload:  # before listening, so that a failure ends the process cleanly
            settle(lf, preload(lf))
    except (ValueError, FileNotFoundError) as err:
        log.error("cannot start: %s", err)
        return 2
    server = lf.registry.server
    app = create_app(lf)
    app.state.preloaded = True
    uvicorn.run(app, host=host or server.host, port=port or server.port, log_level=log_level)
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
