"""Pure math of fusion over a base that shows only its top N (a remote base behind an OpenAI-style API).

The base's scores are known on its top N tokens and unknown elsewhere (-inf in the tensor). The experts are
local and known everywhere, and so is their push `e(v) = sum_i c_i (tuned_i(v) - untuned_i(v))`. No token
outside the top N has more than `ceiling = min(lp_N, log R)` (lp_N the N-th log-probability, R the mass the
top N leave), so its fused score is at most `ceiling + e(v)`. The candidate set is the base's top N plus,
among the tokens whose bound comes within a margin of the best known token's fused score, the stop tokens
and the k the small untuned model predicts best (it approximates the base's family). A candidate outside
the top N gets the base's exact log-probability where the server can score it, and otherwise the estimate
`min(lp_N, log(R / m))`, m the number of such candidates (docs/algorithms.md, "A base that shows only its
top N").
"""

from __future__ import annotations

import math

import torch

MARGIN = math.log(1e4)  # nats: a token whose fused score cannot come this close to the best is left out (its
# probability is at most 1e-4 of the best token's)


def push_and_guess(tuned: torch.Tensor, untuned: torch.Tensor, coef: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, guess), each (b, V) from (b, T, V) and (b, T), on one pass of log-softmax:

    e(v) = sum_i coef_i (log_softmax(tuned_i) - log_softmax(untuned_i)), the experts' push (tokens either model
    masks: -inf, never pushed); guess(v) = mean_i log_softmax(untuned_i) + e(v), the fused score the token would
    get if the base agreed with the untuned small model(s), which approximate it (same family, same data). With
    one expert and coefficient 1, guess is the tuned model's own log-probability."""
    lt, lu = torch.log_softmax(tuned.float(), -1), torch.log_softmax(untuned.float(), -1)
    finite = torch.isfinite(lt) & torch.isfinite(lu)
    diff = torch.where(finite, lt - lu, torch.zeros_like(lt))
    e = (coef.float().unsqueeze(-1) * diff).sum(1)
    e = torch.where(finite.all(1), e, torch.full_like(e, float("-inf")))
    return e, lu.mean(1) + e


def _known(base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lp_N, log R) per row (b,) of base (b, V) holding the known log-probabilities and -inf elsewhere: the
    lowest known value and the log of the mass the known tokens leave."""
    known = torch.isfinite(base)
    lp_n = torch.where(known, base, torch.full_like(base, float("inf"))).min(-1).values
    mass = torch.where(known, base.double().exp(), torch.zeros((), dtype=torch.float64, device=base.device)).sum(-1)
    log_rest = (1.0 - mass).clamp(min=1e-12).log().to(base.dtype)  # rounding can take a server's top N past 1
    return lp_n, log_rest


def ceiling(base: torch.Tensor) -> torch.Tensor:
    """(b,) per row: min(lp_N, log R), the most any token outside the known top N can have."""
    return torch.minimum(*_known(base))


def estimate(base: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(b,) the value given each of a row's m (b,) candidates outside its top N where the server cannot score
    them: min(lp_N, log(R / m)), never above the ceiling. A row with nothing known gets -inf."""
    lp_n, log_rest = _known(base)
    out = torch.minimum(lp_n, log_rest - m.to(log_rest.dtype).clamp(min=1).log())
    return torch.where(torch.isfinite(base).any(-1), out, torch.full_like(out, float("-inf")))


def missing(base: torch.Tensor, e: torch.Tensor, guess: torch.Tensor, k: int, stops: list[list[int]],
            margin: float | torch.Tensor = MARGIN) -> list[list[int]]:
    """Each row's candidates outside the base's known top N, ascending ids, at most k plus the stop tokens.

    Only tokens whose fused score could come within `margin` of the best known token's are eligible
    (`ceiling + e(v) >= max over the known of base + e - margin`); of those, every stop token, then the k with
    the highest `guess` (push_and_guess(): what the fused score would be if the base agreed with the small model).
    margin: one for all rows or (b,) per row (0 for a greedy row: only a token that could win matters)."""
    b, width = base.shape
    if k <= 0:
        return [[] for _ in range(b)]
    known = torch.isfinite(base)
    best = torch.where(known, base + e, torch.full_like(base, float("-inf"))).max(-1).values  # (b,)
    upper = ceiling(base).unsqueeze(-1) + e  # (b, V)
    margin = torch.as_tensor(margin, dtype=base.dtype, device=base.device).expand(b)
    eligible = ~known & torch.isfinite(e) & torch.isfinite(guess) & (upper >= (best - margin).unsqueeze(-1))
    top = torch.where(eligible, guess, torch.full_like(guess, float("-inf"))).topk(min(k, width), -1)
    out = []
    for i in range(b):
        ids = {j for j, v in zip(top.indices[i].tolist(), top.values[i].tolist()) if v > float("-inf")}
        ok = [j for j in stops[i] if 0 <= j < width] if i < len(stops) else []
        if ok:
            ids |= {j for j, flag in zip(ok, eligible[i, ok].tolist()) if flag}
        out.append(sorted(ids))
    return out


def _left_out_upper(base: torch.Tensor, e: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """(b, V): ceiling + e(v) for every token left out of `fused` (the candidates' scores, -inf elsewhere), -inf
    for the candidates."""
    out = ~torch.isfinite(fused) & torch.isfinite(e)
    return torch.where(out, ceiling(base).unsqueeze(-1) + e, torch.full_like(e, float("-inf")))


def omitted(base: torch.Tensor, e: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """(b,) an upper bound on the fused probability mass of every token left out of `fused` (b, V: the fused
    scores on the candidates, -inf elsewhere, on the scale of base + e), relative to the candidates' mass:
    sum over the left-out v of exp(ceiling + e(v) - logsumexp(fused)). Exact for proxy-tuning and EFT."""
    upper = _left_out_upper(base, e, fused)
    return (torch.logsumexp(upper.double(), -1) - torch.logsumexp(fused.double(), -1)).exp()


def certified(base: torch.Tensor, e: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """(b,) True where the fused argmax over the candidates is the argmax over the whole vocabulary, for fusion
    of the form `base + e` (proxy-tuning and EFT with the plan's coefficients): every left-out token v scores at
    most ceiling + e(v). base: the known top N only (-inf elsewhere); fused: the candidates' scores."""
    return fused.max(-1).values >= _left_out_upper(base, e, fused).max(-1).values
