"""A batch line's parameters validated into engine sampling parameters, the same way in local and
`--server` jobs: a mistake on a line gets the same error record whichever way the job runs."""

from __future__ import annotations

import argparse
import difflib
import math

from pydantic import ValidationError

from logitfuse.batch.records import BadLine, Record
from logitfuse.engine.output_format import GUIDED, structured_spec
from logitfuse.engine.request import SamplingParams, logit_bias_pairs
from logitfuse.errors import InvalidRequest, UnknownName
from logitfuse.methods.params import FusionParams
from logitfuse.ops.field_names import error_path

SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "logprobs")  # also command options
INTS = ("max_tokens", "top_k", "seed", "logprobs", "n", "min_tokens")
FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
STRUCTURED = ("response_format", "structured_outputs", *GUIDED)  # -> one StructuredSpec (engine/output_format.py)
MAX_N = 64  # as the server's `n`
NO_LIMIT = 2**31  # remote jobs leave the logprobs limit to the server


def _typed(params: dict) -> dict:
    """Each field of its JSON type (ints stay ints, numbers become floats), else an error naming it."""
    out = dict(params)
    for k, v in params.items():
        if k in INTS and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidRequest(f"{k} must be an integer, got {v!r}", k)
        if k in FLOATS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidRequest(f"{k} must be a number, got {v!r}", k)
            out[k] = float(v)
        if k in BOOLS and not isinstance(v, bool):
            raise InvalidRequest(f"{k} must be true or false, got {v!r}", k)
        if k == "stop":
            stops = [v] if isinstance(v, str) else v
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise InvalidRequest(f"stop must be a string or a list of strings, got {v!r}", k)
            out[k] = tuple(stops)
        if k in ("stop_token_ids", "allowed_token_ids"):
            if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise InvalidRequest(f"{k} must be a list of token ids, got {v!r}", k)
            out[k] = tuple(v)
        if k == "bad_words":
            if not isinstance(v, list) or not all(isinstance(w, str) for w in v):
                raise InvalidRequest(f"bad_words must be a list of strings, got {v!r}", k)
            out[k] = tuple(v)
        if k == "logit_bias":
            if not isinstance(v, dict):
                raise InvalidRequest(f"logit_bias must map token ids to biases, got {v!r}", k)
            out[k] = logit_bias_pairs(v)
    return out


def sampling(params: dict, max_logprobs: int = NO_LIMIT) -> tuple[SamplingParams, int]:
    """The line's SamplingParams (checked) and its number of samples n."""
    typed = _typed(params)
    structured = structured_spec({k: typed.pop(k) for k in STRUCTURED if k in typed})
    if structured is not None:
        typed["structured"] = structured
    n = typed.pop("n", 1)
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}], got {n}", "n")
    return SamplingParams(**typed).check(max_logprobs), n


def fusion(cli_fusion: dict | None, rec: Record) -> FusionParams | None:
    """The line's fusion override merged over the command's, validated (without a registry)."""
    merged = (cli_fusion or {}) | (rec.fusion or {})
    if not merged:
        return None
    try:
        return FusionParams.model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(p for p in ("fusion", error_path(first)) if p)
        raise InvalidRequest(f"{where}: {first['msg']}", where) from None


def bad_line(rec_id: str, err: Exception) -> BadLine:
    """The error record of a line the registry or the checks above refused."""
    status = 404 if isinstance(err, UnknownName) else 400
    return BadLine(rec_id, str(err), getattr(err, "param", None), status)


def sampling_defaults(args: argparse.Namespace) -> dict:
    """The command's sampling options that were given: defaults for lines that do not set them."""
    return {k: getattr(args, k) for k in SAMPLING_OPTIONS if getattr(args, k) is not None}


def known_model(model: str, names: list[str], where: str = "") -> None:
    """Raise UnknownName listing what is known, the closest names first."""
    if model in names:
        return
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownName(f"model {model!r} not found{where}{hint}; available: {', '.join(names)}", "model")
