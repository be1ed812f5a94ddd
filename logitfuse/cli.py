"""`logitfuse serve | generate | train-family | tune-adapter | fetch-real`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def default_config() -> str:
    return os.environ.get("LOGITFUSE_CONFIG", str(DEFAULT_CONFIG))


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="logitfuse serve", description="OpenAI-compatible fused-model server")
    p.add_argument("--config", default=default_config(), help="registry YAML (env LOGITFUSE_CONFIG)")
    p.add_argument("--host", default=os.environ.get("LOGITFUSE_HOST"), help="default: server.host of the config")
    p.add_argument("--port", type=int, default=int(os.environ["LOGITFUSE_PORT"]) if "LOGITFUSE_PORT" in os.environ
                   else None, help="default: server.port of the config (env LOGITFUSE_PORT)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (replicas per the config's ray: section)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas per deployment")
    p.add_argument("--ray-address", default=None, help="with --ray: cluster to join (default: RAY_ADDRESS or local)")
    args = p.parse_args(argv)
    if args.ray:
        from logitfuse.deploy import run_cli

        return run_cli(args)
    from service.app import run_server

    return run_server(args.config, args.host, args.port, args.log_level)


def _generate(argv: list[str]) -> int:
    from logitfuse.batch import main

    return main(argv)


def _train_family(argv: list[str]) -> int:
    from logitfuse.family.train import main

    return main(argv)


def _tune_adapter(argv: list[str]) -> int:
    from logitfuse.real.tune import main

    return main(argv)


def _fetch_real(argv: list[str]) -> int:
    from logitfuse.real.convert import main

    return main(argv)


COMMANDS = {"serve": _serve, "generate": _generate, "train-family": _train_family, "tune-adapter": _tune_adapter,
            "fetch-real": _fetch_real}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("--") and argv[0] != "--help"):
        return _serve(argv)  # no command: serve (options go to serve)
    if argv[0] not in COMMANDS:
        print(f"usage: logitfuse {{{','.join(COMMANDS)}}} [options]   (default: serve)", file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
