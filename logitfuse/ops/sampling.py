"""Pure: logit_bias, temperature, top-k / top-p / min-p on fused scores, seeded per-row sampling, logprobs.

All functions take per-row parameters as (B,) tensors so one batch can mix requests. A row with
temperature below MIN_TEMPERATURE is greedy (dividing by a tinier one overflows: vLLM's rule too); a top_k
beyond the vocabulary keeps it all. Each row samples with its own torch.Generator, so a seeded request gives
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
MIN_TEMPERATURE = 1e-5  # below it a row is greedy: scores / T would overflow to inf and softmax to NaN
MAX_TOP_K = 2**31 - 1  # any larger top_k keeps every token (and would overflow an int64 tensor)


@dataclass(frozen=True)
class SamplingTensors:
    temperature: torch.Tensor  # (B,) 0 = greedy
    top_k: torch.Tensor  # (B,) int, <= 0 = off
    top_p: torch.Tensor  # (B,) in (0, 1]
    min_p: torch.Tensor  # (B,) in [0, 1]
    # which steps any row needs, known on the host: deciding them never waits for the device
    all_greedy: bool = False
    any_top_k: bool = True
    any_top_p: bool = True
    any_min_p: bool = True
    bias: torch.Tensor | None = None  # (B, V) added to the scores before anything else (logit_bias); None: none

    @staticmethod
    def build(rows: list[tuple[float, int, float, float]], device: torch.device | str = "cpu",
              biases: list[tuple[tuple[int, float], ...]] | None = None, width: int | None = None) -> SamplingTensors:
        """From (temperature, top_k, top_p, min_p) per row, and optionally each row's (token id, bias) pairs
        over a vocabulary of `width`."""
        t, k, p, m = zip(*rows) if rows else ((), (), (), ())
        t = tuple(0.0 if x < MIN_TEMPERATURE else float(x) for x in t)
        k = tuple(min(int(x), width or MAX_TOP_K, MAX_TOP_K) for x in k)
        f = dict(dtype=torch.float32, device=device)
        bias = None
        if biases and any(biases):
            bias = torch.zeros(len(rows), width, dtype=torch.float32)
            for i, pairs in enumerate(biases):
                if pairs:
                    ids, values = _bias_index(pairs)
                    bias[i, ids] = values
            bias = bias.to(device)
        return SamplingTensors(
            torch.tensor(t, **f), torch.tensor(k, dtype=torch.long, device=device), torch.tensor(p, **f),
            torch.tensor(m, **f), all_greedy=all(x <= 0 for x in t), any_top_k=any(x > 0 for x in k),
            any_top_p=any(x < 1 for x in p), any_min_p=any(x > 0 for x in m), bias=bias,
        )


_BIAS_INDEX: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}  # id(pairs) -> (pairs, ids, values)
_BIAS_INDEX_SIZE = 256


def _bias_index(pairs: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's logit_bias as (ids, values) tensors, built once per request rather than at every step (a
    list of thousands of banned tokens would otherwise cost a Python loop per row and step). Keyed by the
    tuple's identity, which the cache keeps alive, so a key cannot be reused by another tuple; a token named
    twice keeps its last value."""
    hit = _BIAS_INDEX.get(id(pairs))
    if hit is not None and hit[0] is pairs:
        return hit[1], hit[2]
    last = dict(pairs)
    ids = torch.tensor(list(last), dtype=torch.long)
    values = torch.tensor(list(last.values()), dtype=torch.float32)
    if len(_BIAS_INDEX) >= _BIAS_INDEX_SIZE:
        _BIAS_INDEX.pop(next(iter(_BIAS_INDEX)))  # the oldest entry
    _BIAS_INDEX[id(pairs)] = (pairs, ids, values)
    return ids, values


def apply_bias(scores: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """scores + each row's logit_bias (OpenAI's: -100 about bans a token, +100 about forces it)."""
    return scores if params.bias is None else scores + params.bias.to(scores.dtype)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """scores / T per row; greedy rows (T = 0) are left as they are."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(scores.dtype)
    return scores / t.unsqueeze(-1)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best scores (k <= 0 keeps all). (B, V)."""
    v = scores.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))  # (B, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of best tokens whose probability reaches top_p (at least one)."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    drop_sorted = before >= top_p.to(probs.dtype).unsqueeze(-1)
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the best token's probability."""
    logp = torch.log_softmax(scores, dim=-1)
    threshold = logp.max(dim=-1, keepdim=True).values + torch.log(min_p.to(logp.dtype).clamp(min=1e-30)).unsqueeze(-1)
    drop = (logp < threshold) & (min_p > 0).unsqueeze(-1)
    return scores.masked_fill(drop, NEG_INF)


def warp(scores: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The sampling distribution's scores: logit_bias, temperature, then top-k, top-p, min-p (vLLM's order)."""
    out = apply_temperature(apply_bias(scores, params), params.temperature)
    if params.any_top_k:
        out = apply_top_k(out, params.top_k)
    if params.any_top_p:
        out = apply_top_p(out, params.top_p)
    if params.any_min_p:
        out = apply_min_p(out, params.min_p)
    return out


def sample(scores: torch.Tensor, params: SamplingTensors, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax (of the biased scores) for greedy rows, else a draw from
    softmax(warp(scores)). (B, V) -> (B,)."""
    tokens = apply_bias(scores, params).argmax(dim=-1)
    if params.all_greedy:
        return tokens
    greedy = params.temperature <= 0
    probs = torch.softmax(warp(scores, params).float(), dim=-1).cpu()
    tokens = tokens.cpu()
    for i in torch.nonzero(~greedy.cpu()).flatten().tolist():
        tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i]).item()
    return tokens.to(scores.device)


def invalid_rows(scores: torch.Tensor) -> torch.Tensor:
    """Rows that are not a distribution to sample from: a NaN or +inf anywhere, or no finite score. (B,)."""
    # one pass: a row's maximum is NaN where it holds a NaN (amax propagates it), +inf where it holds +inf,
    # and -inf where nothing is finite; else it is finite
    return ~torch.isfinite(scores.amax(dim=-1))


def token_logprobs(scores: torch.Tensor, tokens: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Log-probability of each chosen token under the fused distribution (before sampling warps). (B,).
    normalise=False: the scores already are the log-probabilities to report (a remote base's own top N)."""
    logp = torch.log_softmax(scores.float(), dim=-1) if normalise else scores.float()
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def top_logprobs(scores: torch.Tensor, n: int, normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most likely tokens of the fused distribution and their log-probabilities, each (B, n)."""
    logp = torch.log_softmax(scores.float(), dim=-1) if normalise else scores.float()
    top = torch.topk(logp, min(n, logp.shape[-1]), dim=-1)
    return top.indices, top.values


def make_generator(seed: int | None) -> torch.Generator:
    """A per-row CPU generator: seeded when the request gave a seed, else from fresh entropy."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
