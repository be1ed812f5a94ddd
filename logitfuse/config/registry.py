"""The registry: configs/*.yaml validated into frozen pydantic models, and name lookup into fusion plans.

Paths in the file are relative to the file. Unknown names raise UnknownName listing what is known.
The fields a request's `fusion` object may set live here; what each method does with them (and its
defaults) lives in its file under logitfuse/methods/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from logitfuse import methods
from logitfuse.config.field_names import reject_unknown
from logitfuse.config.ray import RaySpec
from logitfuse.errors import InvalidRequest, UnknownName
from logitfuse.methods.plan import ExpertRef, FusionPlan

Method = Literal[methods.NAMES]  # type: ignore[valid-type]  # the method table's names, in its order


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        """An unknown key is an error that names it, the field it resembles and every known field."""
        return reject_unknown(data, list(cls.model_fields))


class RemoteSpec(Frozen):
    """A model behind an OpenAI-compatible completions endpoint (backends/remote.py)."""

    url: str  # the API root, e.g. http://host:8000/v1
    model: str  # the name the endpoint serves it under
    api_key_env: str | None = None  # environment variable holding the key sent as a bearer token
    top_logprobs: int = Field(default=20, ge=1)  # the top-N log-probabilities asked for each step
    max_context: int = Field(default=4096, ge=1)
    timeout: float = Field(default=60.0, gt=0)  # seconds per HTTP call
    retries: int = Field(default=2, ge=0)  # on connection errors, 429 and 5xx, with exponential backoff
    max_concurrency: int = Field(default=32, ge=1)  # rows of a step requested at once


class ModelSpec(Frozen):
    path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    chat_template: bool = False  # this role formats chat prompts with its tokenizer's template
    gguf_file: str | None = None  # a GGUF checkpoint inside `path` (needs the gguf and accelerate packages)
    compile: bool = False  # torch.compile the forward pass (dynamic shapes); the first calls of each shape compile
    remote: RemoteSpec | None = None
    tokenizer: str | None = None  # remote models: a local folder or hub id holding the model's tokenizer

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.remote is None):
            raise ValueError("a model needs exactly one of 'path' or 'remote'")
        if self.remote is not None and not self.tokenizer:
            raise ValueError("a remote model needs 'tokenizer' (a local folder or hub id with its tokenizer)")
        return self


class RewardSpec(Frozen):
    path: str
    dtype: str = "auto"
    device: str = "auto"


class ExpertSpec(Frozen):
    tuned: str | None = None
    untuned: str
    adapter: str | None = None  # a PEFT LoRA adapter folder: the tuned model is the untuned one plus it
    cross_tokenizer: bool = False  # the pair's tokenizer differs from the base's: map scores by token text

    @model_validator(mode="after")
    def _one_tuned(self) -> ExpertSpec:
        if (self.tuned is None) == (self.adapter is None):
            raise ValueError("an expert needs exactly one of 'tuned' (a model) or 'adapter' (a LoRA adapter folder)")
        return self


class SpeculativeParams(Frozen):
    k: int = Field(default=4, ge=0, le=16)  # draft tokens per round; 0 turns speculation off
    min_draft_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    max_batch: int | None = Field(default=None, ge=1)  # draft only while this many rows or fewer share a step


COEF = methods.COEF  # fusion coefficients stay finite in float16/32 arithmetic within +-COEF
Coef = Annotated[float, Field(ge=-COEF, le=COEF, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class FusionParams(Frozen):
    """Method parameters: the same fields in an ensemble entry and in a request's `fusion` object."""

    method: Method | None = None
    experts: list[str] | None = None
    alpha: Finite | None = None  # proxy's coefficient (checked against COEF there) or tqstar's temperature
    beta: Coef | None = None
    weights: list[Coef] | None = None
    grid: tuple[Finite, Finite, Finite] | None = None
    mode: Literal["one_expert", "joint"] | None = None
    support: int | None = Field(default=None, ge=1)  # dlf: search on the models' top-`support` tokens + the rest
    baseline: str | None = None
    reward: str | None = None
    baseline_reward: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)
    rollouts: int | None = Field(default=None, ge=1, le=16)
    rollout_tokens: int | None = Field(default=None, ge=1, le=256)
    speculative: SpeculativeParams | None = None

    def merged(self, override: FusionParams | None) -> FusionParams:
        """Fields set in override replace ours; new experts without new weights get the default weights."""
        if override is None:
            return self
        update = override.model_dump(exclude_unset=True, exclude_none=True)
        if "experts" in update and "weights" not in update:
            update["weights"] = None
        return FusionParams.model_validate(self.model_dump(exclude_unset=True) | update)


class EnsembleSpec(FusionParams):
    base: str
    method: Method = methods.DEFAULT


class ServerSpec(Frozen):
    host: str = "127.0.0.1"
    port: int = 8000
    memory_budget_mb: int = 8192  # loaded checkpoints beyond this are evicted, least recently used first
    max_batch: int = 64  # sequences decoded together
    max_queue: int = Field(default=1024, ge=1)  # waiting sequences (submitted, not yet decoding) before 429
    max_logprobs: int = 20
    max_tqstar_work: int = 4096  # k * rollouts * rollout_tokens per generated token
    api_keys: list[str] = []
    preload: bool = True  # load the models of every ensemble at start-up
    on_bad_entry: Literal["refuse", "skip"] = "refuse"  # at start-up: stop on a bad entry, or serve without it
    cpu_threads: int | None = None  # torch intra-op threads for CPU work (None: torch's default)
    solver_threads: int | None = Field(default=None, ge=1)  # threads for DLF's weight search (None: cpu_threads)
    request_timeout: float | None = Field(default=None, gt=0)  # seconds a request may generate for; then it
    # ends with the tokens it has, finish_reason "length" (None: no limit)
    kv_budget_mb: float | None = Field(default=None, gt=0)  # KV cache the sequences in flight may need at
    # worst; requests wait in the queue until theirs fits, and one that never fits gets a 400 (None: no limit)
    # -- operations (docs/operations.md) --
    max_body_bytes: int = Field(default=512 * 1024, ge=1024)  # larger request bodies get 413, unread
    public_paths: list[str] = ["/health"]  # paths open without a key when api_keys are set (e.g. /metrics, /docs)
    max_connections: int | None = Field(default=256, ge=1)  # open connections; beyond it uvicorn answers 503
    header_timeout: float = Field(default=10.0, gt=0)  # seconds for a request's headers, then the connection closes
    body_timeout: float = Field(default=30.0, gt=0)  # seconds for its body to arrive, then 408
    keep_alive_timeout: float = Field(default=5.0, gt=0)  # idle seconds before a kept-alive connection closes
    rollout_lane: bool = True  # requests of a method with rollouts (Transfer Q*) decode in their own engine
    # thread, never in other requests' steps
    load_retry_seconds: float = Field(default=30.0, ge=0)  # a model that failed to load from a hub id or
    # remote is retried after this long; a local folder is retried when its files change


class Registry(Frozen):
    models: dict[str, ModelSpec]
    rewards: dict[str, RewardSpec] = {}
    experts: dict[str, ExpertSpec] = {}
    ensembles: dict[str, EnsembleSpec] = {}
    server: ServerSpec = ServerSpec()
    ray: RaySpec = RaySpec()  # Ray Serve replicas (logitfuse.service.ray_serve)
    root: str = "."  # the folder paths are relative to (set by load)
    skipped: dict[str, str] = {}  # bad entries left out under server.on_bad_entry: skip, with the reason (by load)

    @model_validator(mode="after")
    def _references(self) -> Registry:
        for name, e in self.experts.items():
            for role in ("tuned", "untuned") if e.adapter is None else ("untuned",):
                if getattr(e, role) not in self.models:
                    raise ValueError(f"experts.{name}.{role}: unknown model {getattr(e, role)!r}")
            if e.adapter is not None and self.models[e.untuned].path is None:
                raise ValueError(f"experts.{name}.untuned: an adapter needs a local model, {e.untuned!r} is remote")
            if e.adapter is not None and self.tuned_name(name) in self.models:
                raise ValueError(f"experts.{name}: the name {self.tuned_name(name)!r} of its adapter model is taken")
        for name in self.ensembles:
            try:
                self.plan(name)
            except (UnknownName, InvalidRequest) as err:
                raise ValueError(f"ensembles.{name}: {err}") from None
        return self

    @staticmethod
    def load(path: str | Path) -> Registry:
        """Read and validate a YAML registry, every entry on its own, before anything loads; errors name
        the offending keys, all of them at once (registry_check.py; `server.on_bad_entry: skip` keeps the
        good entries and lists the others in `skipped`)."""
        from logitfuse.config import startup as rc

        path, data = Path(path), _read_yaml(Path(path))
        root = str(path.resolve().parent)
        # whole-file sections (server, ray, ...): every Registry field that is not a table of entries
        whole = [k for k in Registry.model_fields if k not in (*rc.SECTIONS, "root", "skipped")]
        known = (*rc.SECTIONS, *whole)
        fatal = [f"{k}: unknown section (known: {', '.join(known)})" for k in data if k not in known]
        fatal += [] if "models" in data else ["models: missing"]
        settings = {}
        for key in whole:
            try:
                settings[key] = Registry.model_fields[key].annotation.model_validate(data.get(key) or {})
            except ValidationError as err:
                fatal += rc.errors_of(err, key)
        if fatal:
            raise ValueError(rc.report(path, {"": fatal}))
        server = settings["server"]
        specs = {"models": ModelSpec, "rewards": RewardSpec, "experts": ExpertSpec, "ensembles": EnsembleSpec}
        good, bad = rc.check_entries(data, specs, root)

        def build(sections: dict, skipped: dict | None = None) -> Registry:
            return Registry.model_validate({**sections, **settings, "root": root, "skipped": skipped or {}})

        good = rc.check_references(good, build, bad)
        if bad and (server.on_bad_entry == "refuse" or not good["models"]):
            raise ValueError(rc.report(path, bad))
        return build(good, {key: "; ".join(lines) for key, lines in bad.items()})

    def resolve_path(self, p: str) -> str:
        """Relative paths are relative to the registry file; anything else (a hub id) is left alone."""
        local = Path(self.root) / p
        return str(local) if not Path(p).is_absolute() and (local.exists() or p.startswith(".")) else p

    def tuned_name(self, expert: str) -> str:
        """The model name of an expert's tuned role (an adapter expert's is `<untuned>+<expert>`)."""
        e = self.experts[expert]
        return e.tuned if e.adapter is None else f"{e.untuned}+{expert}"

    def model_spec(self, name: str) -> ModelSpec:
        """A model's entry; an adapter model's is its untuned model's (same tokenizer, config and place)."""
        view = self.adapter_views().get(name)
        return self.models[view[1] if view else name]

    def adapter_views(self) -> dict[str, tuple[str, str, str]]:
        """Adapter models by name: (expert, untuned model, adapter folder)."""
        return {self.tuned_name(n): (n, e.untuned, self.resolve_path(e.adapter))
                for n, e in self.experts.items() if e.adapter is not None}

    def adapter_hosts(self) -> set[str]:
        """Untuned models that adapters run over: loaded once, shared by every adapter on them."""
        return {e.untuned for e in self.experts.values() if e.adapter is not None}

    def names(self) -> list[str]:
        """Everything a request's `model` can name: ensembles first, then bare models."""
        return list(self.ensembles) + list(self.models)

    def plan(self, model: str, fusion: FusionParams | dict | None = None) -> FusionPlan:
        """The plan for a request naming `model` (an ensemble or a bare model) with optional overrides."""
        if isinstance(fusion, dict):
            fusion = FusionParams.model_validate(fusion)
        if model in self.ensembles:
            spec = self.ensembles[model]
            params, base = FusionParams(**spec.model_dump(exclude={"base"})).merged(fusion), spec.base
        elif model in self.models:
            params, base = FusionParams(method=methods.PLAIN).merged(fusion), model
        else:
            raise UnknownName(f"model {model!r} not found; available: {', '.join(self.names())}", param="model")
        if base not in self.models:
            raise UnknownName(f"base model {base!r} not found; available: {', '.join(self.models)}", param="base")
        # the ensemble's own settings must hold; under overrides, only a speculative the request asks for
        asked = fusion is None or "speculative" in fusion.model_fields_set
        return methods.build_plan(self, params, base, ensemble=model, speculative_asked=asked)

    # -- the name lookups a method makes while building its plan (methods.base.Names) -------------------
    def expert_ref(self, name: str) -> ExpertRef:
        e = self._lookup(self.experts, name, "expert", "fusion.experts")
        return ExpertRef(name, self.tuned_name(name), e.untuned, e.cross_tokenizer)

    def check_model(self, name: str, param: str) -> None:
        self._lookup(self.models, name, "model", param)

    def check_reward(self, name: str, param: str) -> None:
        self._lookup(self.rewards, name, "reward model", param)

    def _lookup(self, table: dict, name: str, kind: str, param: str):
        if name not in table:
            raise UnknownName(f"{kind} {name!r} not found; available: {', '.join(table) or '(none)'}", param=param)
        return table[name]


def _read_yaml(path: Path) -> dict:
    """The file's mapping; a missing file or malformed YAML is a ValueError saying so."""
    if not path.is_file():
        raise ValueError(f"no such config file {path.resolve()}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"invalid YAML in {path}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"invalid registry {path}: the file must be a mapping with models, experts, ensembles, "
                         f"rewards and server sections, got {type(data).__name__}")
    return data
