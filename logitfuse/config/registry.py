"""The registry: configs/*.yaml validated into frozen pydantic models, and name lookup into fusion plans.

Paths in the file are relative to the file. Unknown names raise UnknownName listing what is known.
The entries' schemas are in specs.py, the fields of `fusion` in methods/params.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from logitfuse import methods
from logitfuse.config.ray import RaySpec
from logitfuse.config.specs import EnsembleSpec, ExpertSpec, ModelSpec, RewardSpec, ServerSpec
from logitfuse.errors import InvalidRequest, UnknownName
from logitfuse.methods.params import FusionParams
from logitfuse.methods.plan import ExpertRef, FusionPlan
from logitfuse.ops.field_names import ClosedModel


class Registry(ClosedModel):
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
