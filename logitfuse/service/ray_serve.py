"""The OpenAI app on Ray Serve: each replica is one process with its own engine, on its own resources.

    serve run logitfuse.service.ray_serve:app [config=configs/default.yaml]  # or: logitfuse serve --ray --replicas N

Every replica runs the service's own app (`logitfuse.service.app.create_app`: the same routes, streaming, errors and
API keys). Without `ray.deployments` in the registry, one deployment serves every name. With them, each
group of names gets its own deployment (its replicas load and keep only that group's models), and a gateway
deployment takes the HTTP traffic and sends each request to the replicas that hold its `model`; requests
without a known `model` (and `GET` routes) go to the first group, which answers them as `logitfuse serve`
does. Resources per replica (`num_cpus`, `num_gpus`), replica counts and Serve's `autoscaling_config` come
from the registry's `ray:` section.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from logitfuse.api import LogitFuse
from logitfuse.config.ray import DeploymentSpec, RaySpec
from logitfuse.config.registry import Registry
from logitfuse.service.metrics import Metrics
from logitfuse.service.middleware import Guard, Limits


def load_group(config: str, names: list[str] | None) -> LogitFuse:
    """A LogitFuse on the whole registry with only `names`' models loaded (all ensembles when None)."""
    reg = Registry.load(config)
    preload = reg.server.preload
    lf = LogitFuse(reg.model_copy(update={"server": reg.server.model_copy(update={"preload": False})}))
    for name in names if names is not None else list(reg.ensembles):
        if preload:
            lf.prepare(name)
    return lf


class ServedApp:
    """One engine: the service app over a LogitFuse that holds a group's models."""

    def _start(self, config: str, names: list[str] | None) -> None:
        from logitfuse.service.app import create_app

        self.lf = load_group(config, names)
        self.app = create_app(self.lf)

    def loaded(self) -> list[str]:
        """The checkpoints this replica holds (for operators and tests)."""
        return self.lf.health()["loaded"]

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> AsyncIterator[dict | bytes]:
        """One request from the gateway through this replica's app: the response head, then body chunks."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": headers, "root_path": "", "client": ("gateway", 0), "server": None}
        sent, queue = asyncio.Event(), asyncio.Queue()

        async def receive() -> dict:
            if not sent.is_set():
                sent.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the gateway cancels this generator when its client goes away
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, queue.put))
        try:
            while True:
                msg = await queue.get()
                if msg["type"] == "http.response.start":
                    yield {"status": msg["status"], "headers": [(k.decode(), v.decode()) for k, v in msg["headers"]]}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        return
        finally:
            task.cancel()


@serve.ingress()
class Replica(ServedApp):
    """The HTTP entry itself (no groups): Serve runs the app and its lifespan."""

    def __init__(self, config: str) -> None:
        self._start(config, None)

    def __serve_build_asgi_app__(self):
        return self.app


class GroupReplica(ServedApp):
    """A replica of one group, reached through the gateway: it runs the app's lifespan itself."""

    async def __init__(self, config: str, names: list[str]) -> None:
        self._start(config, names)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()


@serve.ingress()
class Gateway:
    """The HTTP entry when names are grouped: routes each request by its `model` to that group's replicas."""

    def __init__(self, groups: dict[str, DeploymentHandle], routes: dict[str, str], limits: Limits) -> None:
        self.groups, self.routes, self.limits = groups, routes, limits
        self.default = next(iter(groups))

    def __serve_build_asgi_app__(self):
        def forward(group: str | None, *args) -> AsyncIterator[dict | bytes]:
            return self.groups[group or self.default].options(stream=True).forward.remote(*args)

        return gateway_app(self.routes, forward, self.limits)


Forward = Callable[..., AsyncIterator[dict | bytes]]  # (group or None, method, path, query, headers, body)


def gateway_app(routes: dict[str, str], forward: Forward, limits: Limits) -> FastAPI:
    """The gateway's own app, behind the same guard as `logitfuse serve` (middleware.Guard: the key checked
    and the declared size refused before any byte of the body is read, then the body read within
    max_body_bytes and body_timeout); the replica's answer goes back with every header it sent, repeated
    ones included."""
    app = FastAPI(title="logitfuse gateway")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def route(request: Request):
        body = await request.body()
        rid = request.state.request_id.encode()  # the guard's id, so the replica's log line has the same one
        headers = [(k, v) for k, v in request.headers.raw if k != b"x-request-id"] + [(b"x-request-id", rid)]
        stream = forward(routes.get(_model_of(body)), request.method, request.url.path,
                         request.url.query.encode(), headers, body)
        head = await stream.__anext__()
        response = StreamingResponse(stream, status_code=head["status"])
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]
                                if k.lower() != "x-request-id"]  # the guard adds it again
        return response

    app.add_middleware(Guard, limits=limits, metrics=Metrics())
    return app


def _model_of(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), str) else None


def _options(ray: RaySpec, group: DeploymentSpec | None, replicas: int | None) -> dict:
    def pick(key: str):
        return getattr(group, key) if group and getattr(group, key) is not None else getattr(ray, key)

    autoscaling = pick("autoscaling")
    opts: dict = {"ray_actor_options": {"num_cpus": pick("num_cpus"), "num_gpus": pick("num_gpus")}}
    if autoscaling:
        return opts | {"autoscaling_config": autoscaling.as_config()}
    return opts | {"num_replicas": replicas or pick("replicas")}


def build(config: str, replicas: int | None = None):
    """The Serve application for a registry: one deployment, or a gateway over one deployment per group."""
    reg = Registry.load(config)
    known = set(reg.names())
    for gname, g in reg.ray.deployments.items():
        unknown = [n for n in g.models if n not in known]
        if unknown:
            raise ValueError(f"ray.deployments.{gname}.models: unknown name {unknown[0]!r}; "
                             f"available: {', '.join(reg.names())}")
    if not reg.ray.deployments:
        return serve.deployment(Replica).options(name="logitfuse", **_options(reg.ray, None, replicas)).bind(config)
    replica = serve.deployment(GroupReplica)
    groups = {g: replica.options(name=f"logitfuse-{g}", **_options(reg.ray, spec, replicas)).bind(config, spec.models)
              for g, spec in reg.ray.deployments.items()}
    routes = {n: g for g, spec in reg.ray.deployments.items() for n in spec.models}
    return serve.deployment(Gateway).options(name="gateway", ray_actor_options={"num_cpus": 0}).bind(
        groups, routes, gateway_limits(reg))


def gateway_limits(reg: Registry) -> Limits:
    """The limits `logitfuse serve` applies (keys of the registry and of LOGITFUSE_API_KEY, body size and time)."""
    from logitfuse.service.app import api_keys

    server = reg.server
    keys = tuple(dict.fromkeys(list(server.api_keys) + api_keys(None)))
    return Limits(keys, tuple(server.public_paths), server.max_body_bytes, server.body_timeout)


def app(args: dict | None = None):
    """`serve run logitfuse.service.ray_serve:app [config=FILE] [replicas=N]` (config default: LOGITFUSE_CONFIG)."""
    from logitfuse import default_config

    args = args or {}
    return build(args.get("config", default_config()), int(args["replicas"]) if "replicas" in args else None)


def run_cli(args) -> int:
    """`logitfuse serve --ray`: join (or start) a Ray cluster and serve until interrupted."""
    import os

    import ray

    try:
        server = Registry.load(args.config).server
        application = build(args.config, args.replicas)
    except (ValueError, FileNotFoundError) as err:
        print(f"cannot start: {err}", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host or server.host, "port": args.port or server.port})
    serve.run(application, name="logitfuse", route_prefix="/", blocking=True)
    return 0
