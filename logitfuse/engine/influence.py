"""Per-token influence: what a fusion call saw, kept for the rows that ask, and their response entries.

A fusion call of a group whose rows ask for influence (`fusion.influence`) leaves a Trace: the base's scores
as the method took them, the experts' scores, the coefficients it applied. Once the tokens are chosen,
`collect` reads the numbers off those tensors (ops/influence.py: no model runs again) and builds each asking
row's entry in the API's shape (docs/influence.md). Rows that do not ask cost nothing: no Trace is made
unless one row of the group asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from logitfuse import methods
from logitfuse.engine.stopping import token_piece
from logitfuse.methods.base import Step
from logitfuse.ops import influence as ops
from logitfuse.ops.vocab import Alignment


@dataclass
class Trace:
    """What one fusion call of b rows saw, for influence."""

    method: str
    base: torch.Tensor  # (b, V) the base's scores as the method took them (aligned; a remote base widened)
    experts: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # (b, T, V) tuned, (b, T, V) untuned
    coef: torch.Tensor  # (b, T) the coefficient each expert got
    names: tuple[str, ...]  # the experts
    cross: tuple[bool, ...]  # per expert: its scores are mapped log-probabilities
    diags: list | None = None  # the method's per-row diagnostics

    def row(self, i: int) -> Trace:
        """Row i alone (a group whose draw failed samples its rows one by one)."""
        experts = lambda: tuple(x[i:i + 1] for x in self.experts())  # noqa: E731
        return Trace(self.method, self.base[i:i + 1], experts, self.coef[i:i + 1], self.names, self.cross,
                     self.diags and [self.diags[i]])


def wanted(seqs: list) -> list | None:
    """A list to collect Traces in when a row of the group asks for influence, else None (no cost)."""
    return [] if any(s.req.plan.influence for s in seqs) else None


def trace_of(step: Step, diags: list | None) -> Trace:
    """The Trace of a fusion call, from its Step and the method's diagnostics."""
    method = methods.get(step.plan.method)
    experts = step.plan.experts
    return Trace(method.name, step.base, step.experts, method.applied(step, diags), tuple(e.name for e in experts),
                 tuple(e.cross for e in experts), diags)


def block_trace(plans: list, align: Alignment, names: tuple[str, str, str], z_base: torch.Tensor,
                z_tuned: torch.Tensor, z_untuned: torch.Tensor) -> Trace:
    """The Trace of a speculative block: (B, P, V) raw logits of the base, the tuned and the untuned model at
    the P emitted positions, aligned as the fuser aligns them; plans one per row (proxy or EFT, one expert)."""
    b, p = z_base.shape[:2]
    flat = lambda z, name=None: align.apply(z.reshape(b * p, z.shape[-1]), name).float()  # noqa: E731
    tuned, untuned = flat(z_tuned, names[1]).unsqueeze(1), flat(z_untuned, names[2]).unsqueeze(1)
    coef = torch.tensor([pl.coef for pl in plans for _ in range(p)], dtype=torch.float32, device=tuned.device)
    expert = plans[0].experts[0]
    return Trace(plans[0].method, flat(z_base), lambda: (tuned, untuned), coef, (expert.name,), (expert.cross,))


def collect(wants: list[bool], trace: Trace, scores: torch.Tensor, chosen: list[int], tokenizer,
            raw: bool = False) -> list[dict | None]:
    """Each row's influence entry (None for rows that do not ask). scores (b, V) the fused scores the tokens
    were drawn from; chosen (b,); raw: the scores are already log-probabilities (a remote base alone)."""
    rows = [i for i, w in enumerate(wants) if w]
    out: list[dict | None] = [None] * len(wants)
    if not rows:
        return out
    dev = scores.device
    idx = None if len(rows) == len(wants) else torch.tensor(rows, dtype=torch.long, device=dev)
    pick = lambda x: x if idx is None else x.index_select(0, idx.to(x.device))  # noqa: E731  (asking rows)
    norm = (lambda x: x.float()) if raw else (lambda x: torch.log_softmax(x.float(), -1))
    tok = torch.tensor([chosen[i] for i in rows], dtype=torch.long, device=dev)
    tuned = untuned = None
    if trace.names:
        tuned, untuned = (pick(x) for x in trace.experts())
    method = methods.get(trace.method)
    log_probs = torch.tensor([method.push_on_log_probs and not c for c in trace.cross], dtype=torch.bool)
    nums = ops.influence(norm(pick(trace.base)).to(dev), norm(pick(scores)), tuned, untuned, pick(trace.coef), tok,
                         log_probs)
    pieces = _pieces(tokenizer)

    def piece(t: int) -> str:
        text = pieces.get(t)
        if text is None:
            text = pieces[t] = token_piece(tokenizer, t)
        return text

    for j, row in enumerate(_host(nums)):
        i = rows[j]
        diag = trace.diags[i] if trace.diags else None
        out[i] = _entry(row, chosen[i], trace.names, piece) | method.influence_extra(diag, chosen[i])
    return out


def _pieces(tokenizer) -> dict[int, str]:
    """The token texts decoded so far, kept on the tokenizer (as stopping.py keeps its anchor there): a
    token's text never changes, and decoding it at every step would cost more than the numbers."""
    cache = getattr(tokenizer, "_logitfuse_pieces", None)
    if cache is None:
        cache = {}
        tokenizer._logitfuse_pieces = cache
    return cache


def _host(n: ops.Influence) -> list[tuple]:
    """Every number of every row in one copy to the host: per row (lp, rank, base lp, base rank, top ids, top
    lps, base top ids, base top lps, pushes, weights)."""
    # float32 holds every id and rank exactly (< 2**24) and the log-probabilities are float32 already
    scalars = torch.stack([n.logprob.float(), n.rank.float(), n.base_logprob.float(), n.base_rank.float()], 1)
    parts = [n.top_ids, n.top_logprobs, n.base_top_ids, n.base_top_logprobs, n.push, n.weight]
    host = torch.cat([scalars] + [p.float().to(scalars.device) for p in parts], 1).tolist()
    ends = [4]
    for p in parts:
        ends.append(ends[-1] + p.shape[1])
    spans = list(pairwise(ends))
    return [(*v[:4], *(v[a:b] for a, b in spans)) for v in host]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _tokens(ids: list[float], lps: list[float], piece) -> list[dict]:
    return [{"token": piece(int(t)), "token_id": int(t), "logprob": lp} for t, lp in zip(ids, lps)
            if math.isfinite(lp)]


def _entry(row: tuple, token: int, names: tuple[str, ...], piece) -> dict:
    """One token's entry in the API's shape; a base value that is not finite (a token outside a remote base's
    top N) is null, and so is a push on a token an expert masks."""
    lp, rank, base_lp, base_rank, top_ids, top_lps, base_ids, base_lps, push, weight = row
    base_ok = math.isfinite(base_lp)
    base_top = _tokens(base_ids, base_lps, piece)
    return {"token": piece(token), "token_id": token, "logprob": lp, "rank": int(rank),
            "base_logprob": base_lp if base_ok else None, "base_rank": int(base_rank) if base_ok else None,
            "shift": lp - base_lp if base_ok else None,
            "base_choice": base_top[0] if base_top and base_top[0]["token_id"] != token else None,
            "top": _tokens(top_ids, top_lps, piece), "base_top": base_top,
            "experts": [{"expert": n, "push": _finite(p), "weight": w} for n, p, w in zip(names, push, weight)]}
