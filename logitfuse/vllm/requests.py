"""What a vLLM request asks of the fusion processor, and which plans can run inside vLLM. No vLLM import.

A request opts in with `extra_args={"ensemble": NAME}` (offline) or `vllm_xargs` (vLLM's OpenAI server), and
may override the method's parameters with flat keys of the same names as a registry ensemble's (`alpha`,
`beta`, `weights`, `grid`, `mode`, `support`, `experts`, `method`). NAME is an ensemble, or a bare model of the
registry with the method and experts given as overrides (as `fusion` picks them per request in the API).
Inside vLLM the base is vLLM's own model; an expert of the base's tokenizer reads the token ids vLLM feeds it,
a cross-tokenizer one their text in its own tokens, unless the request carries each role's own prompt ids
(`prompts`: model -> ids, or flat `prompt:MODEL` keys), as `logitfuse serve` sends them in engine mode: then
every model prefills its own prompt and reads the same generated tokens after it. Some plans cannot run
there; `unsupported` says why.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from logitfuse import methods
from logitfuse.config.registry import Registry
from logitfuse.config.startup import errors_of
from logitfuse.errors import InvalidRequest, UnknownName
from logitfuse.methods.params import FusionParams
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops.field_names import near_miss

ENV = "LOGITFUSE_CONFIG"  # the registry file
ENV_ENSEMBLES = "LOGITFUSE_ENSEMBLES"  # optional comma-separated ensembles to serve (each must be servable)
ENV_HOST = "LOGITFUSE_HOST_MODEL"  # set by logitfuse serve's engine mode: the registry model vLLM runs
KEY = "ensemble"  # the extra_args key that selects an ensemble
PROMPTS = "prompts"  # optional: model -> its own prompt ids (a role with another prompt format)
PLAN = "plan"  # logitfuse serve's engine mode: the request's whole plan, resolved by the service (plan_dict)
PROMPT_PREFIX = "prompt:"  # the same, flat (vllm_xargs takes flat values): "prompt:MODEL": ids
# flat per-request overrides: every fusion parameter but the nested speculative block
OVERRIDES = tuple(f for f in FusionParams.model_fields if f != "speculative")


@lru_cache(maxsize=4)
def load_registry(path: str | None = None) -> Registry:
    """The registry named by $LOGITFUSE_CONFIG (or path), read once per process."""
    path = path or os.environ.get(ENV)
    if not path:
        raise ValueError(f"logitfuse: set {ENV} to the registry file (e.g. configs/default.yaml)")
    if path.endswith(".json"):  # the copy logitfuse serve's engine mode writes (vllm/engine.py): already checked
        with open(path, encoding="utf-8") as f:
            return Registry.model_validate_json(f.read())
    return Registry.load(path)


def wanted(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether a request asks for fusion at all (requests without the key are left untouched)."""
    return bool(extra_args) and KEY in extra_args


def request_plan(registry: Registry, extra_args: Mapping[str, Any]) -> FusionPlan:
    """The plan of a request's ensemble and overrides (or the whole plan logitfuse serve's engine mode sends);
    InvalidRequest naming the key for bad input."""
    name = extra_args.get(KEY)
    if PLAN in extra_args:
        plan = plan_of(extra_args[PLAN])
        reason = unsupported(registry, plan, role_prompts(extra_args, plan) is not None)
        if reason:
            raise InvalidRequest(f"model {name!r}: {reason}", "model")
        return plan
    if not isinstance(name, str) or name not in registry.names():
        known = ", ".join(registry.ensembles) or "(none)"
        raise InvalidRequest(f"extra_args.ensemble: unknown ensemble {name!r}; available: {known}", KEY)
    others = {k: v for k, v in extra_args.items()
              if k not in (KEY, PROMPTS, PLAN) and not k.startswith(PROMPT_PREFIX) and not _foreign(k)}
    for key in others:
        if key not in OVERRIDES:
            guess = near_miss(key, OVERRIDES)
            hint = f"; did you mean {guess!r}?" if guess else ""
            raise InvalidRequest(f"extra_args.{key}: not a fusion parameter{hint} (known: {', '.join(OVERRIDES)})",
                                 key)
    try:
        params = FusionParams.model_validate(others) if others else None
        plan = registry.plan(name, params)
    except ValidationError as err:
        raise InvalidRequest("; ".join(errors_of(err, "extra_args")), KEY) from None
    except UnknownName as err:
        raise InvalidRequest(f"extra_args: {err}", err.param) from None
    reason = unsupported(registry, plan, role_prompts(extra_args, plan) is not None)
    if reason:
        raise InvalidRequest(f"ensemble {name!r}: {reason}", KEY)
    return plan


def role_prompts(extra_args: Mapping[str, Any], plan: FusionPlan) -> dict[str, list[int]] | None:
    """The roles' own prompt ids a request carries (None: every role reads the host's prompt ids). Every
    expert model of the plan must have one then; InvalidRequest naming the key otherwise."""
    given = dict(extra_args.get(PROMPTS) or {})
    given.update({k[len(PROMPT_PREFIX):]: v for k, v in extra_args.items() if k.startswith(PROMPT_PREFIX)})
    if not given:
        return None
    missing = [n for n in plan.models()[1:] if n not in given]
    if missing:
        raise InvalidRequest(f"extra_args.{PROMPTS}: no prompt ids for {', '.join(map(repr, missing))} (a request "
                             "that gives roles their own prompts gives one to every model of the plan)", PROMPTS)
    for n, ids in given.items():
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise InvalidRequest(f"extra_args.{PROMPTS}.{n}: must be a non-empty list of token ids", PROMPTS)
    return {n: list(ids) for n, ids in given.items()}


def plan_dict(plan: FusionPlan) -> dict:
    """A plan as plain data (what extra_args carries to vLLM's engine process)."""
    return dataclasses.asdict(plan)


def plan_of(data: Mapping[str, Any]) -> FusionPlan:
    """The plan plan_dict wrote; InvalidRequest where it is not one."""
    try:
        plan = _rebuild(FusionPlan, data)
        methods.get(plan.method)
        return plan
    except (TypeError, KeyError, ValueError, AttributeError, UnknownName, InvalidRequest) as err:
        raise InvalidRequest(f"extra_args.{PLAN}: not a fusion plan ({err})", PLAN) from None


def _rebuild(kind: Any, value: Any) -> Any:
    """A value of type `kind` from plain data: dataclasses from mappings, tuples from lists."""
    if value is None:
        return None
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _rebuild(hints[f.name], value[f.name])
                       for f in dataclasses.fields(kind) if f.name in value})
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_rebuild(args[0], v) for v in value)
        return tuple(_rebuild(a, v) for a, v in zip(args, value))
    return value


def _foreign(key: str) -> bool:
    """Keys vLLM itself puts into extra_args (KV and encoder-cache transfer parameters)."""
    return key.endswith("_transfer_params")


def unsupported(registry: Registry | None, plan: FusionPlan, own_prompts: bool = False) -> str | None:
    """Why a plan cannot run as a vLLM logits processor, or None when it can. own_prompts: the request gives
    every role its own prompt ids (then roles may format prompts differently, and the registry is not read)."""
    method = methods.get(plan.method)
    if plan.tqstar is not None:
        reason = rollouts_problem(registry, plan)
        if reason:
            return reason
    elif method.work(plan):
        return (f"method {plan.method!r} looks ahead in a way this logits processor does not run; serve it with "
                "`logitfuse serve`")
    elif not method.needs_experts:
        return f"method {plan.method!r} fuses no experts; send the request without extra_args.ensemble"
    if plan.speculative is not None:
        return ("speculative fusion drafts with the tuned expert and verifies in the base, which vLLM runs; "
                "vLLM refuses custom logits processors under its own speculative decoding, so drop "
                "`speculative` from the ensemble")
    if plan.influence:
        return "influence reports come from logitfuse's own engine; drop fusion.influence"
    return None if own_prompts else formats_differ(registry, plan)


def rollouts_problem(registry: Registry | None, plan: FusionPlan) -> str | None:
    """Why a Transfer Q* plan cannot run beside vLLM: its rollouts continue every row in the baseline's own KV
    state, kept in this process like an expert's (vLLM keeps its base's to itself), at the server's cap of
    work per token."""
    tq = plan.tqstar
    if tq.baseline == plan.base:
        return (f"Transfer Q*'s baseline {tq.baseline!r} is the base model vLLM runs: the rollouts continue each "
                "row in the baseline's own KV state, which vLLM does not share; name another model as baseline, "
                "or serve it with `logitfuse serve`")
    limit = registry.server.max_tqstar_work if registry is not None else None  # None: the caller checked it
    if limit is not None and tq.work > limit:
        return (f"Transfer Q*'s work top_k * rollouts * rollout_tokens = {tq.work} is over the registry's "
                f"server.max_tqstar_work ({limit})")
    return None


def formats_differ(registry: Registry, plan: FusionPlan) -> str | None:
    """Why roles cannot all read the host's prompt ids: they format chat prompts differently (a cross-
    tokenizer model reads the text of vLLM's prompt ids, as logitfuse serve does for a prompt of ids)."""
    formats = {n: registry.model_spec(n).chat_template for n in plan.models() if n not in plan.cross_models()}
    if len(set(formats.values())) > 1:
        listed = ", ".join(f"{n}: {v}" for n, v in formats.items())
        return ("its roles format chat prompts differently (chat_template " + listed + "); inside vLLM every "
                "role reads the token ids vLLM feeds the base unless the request gives each role its own prompt "
                f"ids (extra_args.{PROMPTS}: model -> ids, as `logitfuse serve` does in engine mode)")
    return None


def served_names() -> list[str] | None:
    """The ensembles $LOGITFUSE_ENSEMBLES names (None: every ensemble of the registry)."""
    raw = os.environ.get(ENV_ENSEMBLES, "").strip()
    return [n.strip() for n in raw.split(",") if n.strip()] or None if raw else None
