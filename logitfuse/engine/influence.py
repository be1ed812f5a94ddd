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
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    norm = (lambda x: x.float()) if raw else (lambda x: torch.log_softmax(x.float(), -1))
    tok = torch.tensor([chosen[i] for i in rows], dtype=torch.long, device=dev)
    tuned = untuned = None
    if trace.names:
        tuned, untuned = (x.index_select(0, idx.to(x.device)) for x in trace.experts())
    method = methods.get(trace.method)
    log_probs = torch.tensor([method.push_on_log_probs and not c for c in trace.cross], dtype=torch.bool)
    nums = ops.influence(norm(trace.base.index_select(0, idx.to(trace.base.device))).to(dev),
                         norm(scores.index_select(0, idx)), tuned, untuned, trace.coef.index_select(0, idx.to(
                             trace.coef.device)), tok, log_probs)
    pieces: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in pieces:
            pieces[t] = token_piece(tokenizer, t)
        return pieces[t]

    for j, row in enumerate(_host(nums)):
        i = rows[j]
        diag = trace.diags[i] if trace.diags else None
        out[i] = _entry(row, chosen[i], trace.names, piece) | method.influence_extra(diag, chosen[i])
    return out


def _host(n: ops.Influence) -> list[tuple]:
    """Every number of every row in one copy to the host: per row (lp, rank, base lp, base rank, top ids, top
    lps, base top ids, base top lps, pushes, weights)."""
    scalars = torch.stack([n.logprob.double(), n.rank.double(), n.base_logprob.double(), n.base_rank.double()], 1)
    parts = [scalars, n.top_ids.double(), n.top_logprobs.double(), n.base_top_ids.double(),
             n.base_top_logprobs.double(), n.push.double(), n.weight.double()]
    host = torch.cat([p.to(scalars.device) for p in parts], 1).tolist()
    widths = [4, n.top_ids.shape[1], n.top_ids.shape[1], n.base_top_ids.shape[1], n.base_top_ids.shape[1],
              n.push.shape[1], n.weight.shape[1]]
    rows = []
    for values in host:
        cut, at = [], 0
        for w in widths:
            cut.append(values[at: at + w])
            at += w
        rows.append((*cut[0], *cut[1:]))
    return rows


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
