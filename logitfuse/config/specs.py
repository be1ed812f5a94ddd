"""The registry's entries as frozen schemas: models, rewards, experts, ensembles and the server settings.

Every numeric setting carries its range, so that a registry file with an impossible value is refused at
start-up with the key named.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from logitfuse import methods
from logitfuse.methods.params import FusionParams, Method
from logitfuse.ops.field_names import ClosedModel


class RemoteSpec(ClosedModel):
    """A model behind an OpenAI-compatible completions endpoint (backends/remote.py)."""

    url: str  # the API root, e.g. http://host:8000/v1
    model: str  # the name the endpoint serves it under
    api_key_env: str | None = None  # environment variable holding the key sent as a bearer token
    top_logprobs: int = Field(default=20, ge=1, le=2**20)  # the top-N log-probabilities asked for each step
    max_context: int = Field(default=4096, ge=1, le=2**24)
    timeout: float = Field(default=60.0, gt=0, le=3600)  # seconds per HTTP call
    retries: int = Field(default=2, ge=0, le=20)  # on connection errors, 429 and 5xx, with capped jittered backoff
    retry_max_wait: float = Field(default=30.0, gt=0, le=3600)  # seconds: the longest wait before a retry,
    # whatever the server's Retry-After asks
    max_concurrency: int = Field(default=32, ge=1, le=4096)  # rows of a step requested at once
    candidates: int = Field(default=4, ge=0, le=4096)  # fusion: each expert's top-k tokens (and the k its push
    # lifts most) join the base's top N, scored by the server where it can (0: fusion stays within the top N)


class ModelSpec(ClosedModel):
    path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    chat_template: bool = False  # this role formats chat prompts with its tokenizer's template
    gguf_file: str | None = None  # a GGUF checkpoint inside `path` (needs the gguf and accelerate packages)
    compile: bool = False  # torch.compile the forward pass (dynamic shapes); the first calls of each shape compile
    remote: RemoteSpec | None = None
    tokenizer: str | None = None  # remote models: a local folder or hub id holding the model's tokenizer
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # replaces the ids that end a sequence
    # read from the model's tokenizer and generation_config.json (for families whose files are wrong)
    engine: Literal["hf", "vllm"] = "hf"  # vllm: logitfuse serve hosts it in an in-process vLLM engine
    vllm: dict[str, Any] | None = None  # vLLM engine arguments for engine: vllm (names checked at start-up)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.remote is None):
            raise ValueError("a model needs exactly one of 'path' or 'remote'")
        if self.remote is not None and not self.tokenizer:
            raise ValueError("a remote model needs 'tokenizer' (a local folder or hub id with its tokenizer)")
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError("'vllm' engine arguments need 'engine: vllm'")
        if self.engine == "vllm" and (self.remote is not None or self.compile):
            raise ValueError("engine: vllm runs a local checkpoint in vLLM: 'remote' and 'compile' do not apply")
        return self


class RewardSpec(ClosedModel):
    path: str
    dtype: str = "auto"
    device: str = "auto"


class ExpertSpec(ClosedModel):
    tuned: str | None = None
    untuned: str
    adapter: str | None = None  # a PEFT LoRA adapter folder: the tuned model is the untuned one plus it
    cross_tokenizer: bool = False  # the pair's tokenizer differs from the base's: map scores by token text

    @model_validator(mode="after")
    def _one_tuned(self) -> ExpertSpec:
        if (self.tuned is None) == (self.adapter is None):
            raise ValueError("an expert needs exactly one of 'tuned' (a model) or 'adapter' (a LoRA adapter folder)")
        return self


class EnsembleSpec(FusionParams):
    base: str
    method: Method = methods.DEFAULT


class ServerSpec(ClosedModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    memory_budget_mb: int = Field(default=8192, ge=1)  # loaded checkpoints beyond this are evicted, least
    # recently used first; a request whose models cannot fit together is refused (400)
    max_batch: int = Field(default=64, ge=1, le=65536)  # sequences decoded together
    max_queue: int = Field(default=1024, ge=1, le=2**20)  # waiting sequences (submitted, not yet decoding) before 429
    max_logprobs: int = Field(default=20, ge=0, le=2**20)  # the most log-probabilities a request may ask for
    prefix_cache: bool = True  # reuse the KV of prompt prefixes seen before (exact; per model, shared by requests)
    prefix_cache_mb: float = Field(default=512, gt=0, le=2**30)  # its bound, least recently used blocks go first
    max_tokens_default: int | None = Field(default=None, ge=1)  # a request without max_tokens generates up to
    # the rest of the context window (the smallest among its models), at most this many tokens (None: no cap)
    max_tqstar_work: int = Field(default=4096, ge=1)  # k * rollouts * rollout_tokens per generated token
    api_keys: list[str] = []
    preload: bool = True  # load the models of every ensemble at start-up
    read_tokenizers: bool = True  # the server reads every model's tokenizer before it listens (and keeps it)
    on_bad_entry: Literal["refuse", "skip"] = "refuse"  # at start-up: stop on a bad entry, or serve without it
    cpu_threads: int | None = Field(default=None, ge=1, le=1024)  # torch intra-op threads for CPU work
    # (None: torch's default)
    solver_threads: int | None = Field(default=None, ge=1, le=1024)  # threads for DLF's weight search
    # (None: cpu_threads)
    request_timeout: float | None = Field(default=None, gt=0, le=7 * 86400)  # seconds a request may generate
    # for; then it ends with the tokens it has, finish_reason "length" (None: no limit)
    kv_budget_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # KV cache the sequences in
    # flight may need at worst; requests wait in the queue until theirs fits, and one that never fits gets a 400
    # (None: no limit)
    # -- operations (docs/operations.md) --
    max_body_bytes: int = Field(default=512 * 1024, ge=1024, le=2**31)  # larger request bodies get 413, unread
    public_paths: list[str] = ["/health"]  # paths open without a key when api_keys are set (e.g. /metrics, /docs)
    playground: bool = True  # GET /playground: the page loads without a key, its API calls send the one typed in
    max_connections: int | None = Field(default=256, ge=1, le=2**20)  # open connections; beyond it uvicorn answers 503
    header_timeout: float = Field(default=10.0, gt=0, le=3600)  # seconds for a request's headers, then the
    # connection closes
    body_timeout: float = Field(default=30.0, gt=0, le=3600)  # seconds for its body to arrive, then 408
    keep_alive_timeout: float = Field(default=5.0, gt=0, le=3600)  # idle seconds before a kept-alive connection closes
    rollout_lane: bool = True  # requests of a method with rollouts (Transfer Q*) decode in their own engine
    # thread, never in other requests' steps
    remote_lane: bool = True  # requests over a remote model decode in an engine thread of their own per remote
    # model: a server that is slow or asks to retry later holds up only the requests that use it
    load_retry_seconds: float = Field(default=30.0, ge=0, le=86400)  # a model that failed to load from a hub id or
    # remote is retried after this long; a local folder is retried when its files change
    load_timeout: float = Field(default=300.0, gt=0, le=86400)  # seconds a request waits for its models to
    # load (other requests keep decoding meanwhile); then 503 naming the model
