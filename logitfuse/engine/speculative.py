"""Speculative EFT up-scaling (the emulated fine-tuning paper's section on speculative decoding), inside the engine.

The small tuned expert drafts up to k tokens; the large base and the small untuned model score the whole
block in one pass each; draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) where p is the fused
(proxy/EFT) sampling distribution and q the draft's; at the first rejection the token is resampled from
norm(max(0, p_i - q_i)); when every draft is accepted a bonus token comes from p after the last one. The
output distribution is exactly the fused one; under greedy decoding the tokens are those of plain fused
greedy decoding. A row stops drafting early where the draft's own top probability is below min_draft_prob
(decided from the draft model alone, before the draft token is drawn, so the rule stays exact).

Cost of a round: the tuned expert's k passes while drafting (greedy drafts need only an argmax), one pass
each of the base and the untuned model over the block, and the tuned pass over d_k only when some row
accepted every draft (the bonus token needs it; otherwise it is never made, and nothing is forgotten).

Rows of a group accept different numbers of drafts: rejected positions are forgotten per row
(backend.forget_last), never recomputed. A group keeps its own KV states (its rows advance by different
numbers of tokens per step, unlike the engine's shared slots); rows join at step boundaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

import torch

from logitfuse import methods
from logitfuse.engine import influence
from logitfuse.errors import InvalidRequest
from logitfuse.methods.plan import FusionPlan, SpecPlan
from logitfuse.ops.sampling import SamplingTensors, apply_bias, sample, top_logprobs, warp

if TYPE_CHECKING:
    from logitfuse.backends.base import CausalLM
    from logitfuse.engine.fused_scores import Fuser


@dataclass
class SpecStats:
    rounds: int = 0  # group rounds
    drafted: int = 0
    accepted: int = 0
    row_rounds: int = 0  # rows taking part, summed over rounds: each emits its accepted drafts + 1 token

    @property
    def tokens_per_row_round(self) -> float:
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def __sub__(self, other: SpecStats) -> SpecStats:
        return SpecStats(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def __add__(self, other: SpecStats) -> SpecStats:
        return SpecStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator | None
                  ) -> tuple[int, int | None]:
    """The acceptance half of speculative sampling for one row: p (>= n, V) fused probs at the drafts'
    positions, q (n, V) draft probs, drafts (n,). Returns (accepted drafts, the token resampled from
    norm(max(0, p - q)) at the first rejection, or None when every draft was accepted). gen None means greedy
    (accept while the draft is p's argmax)."""
    if gen is None:  # one argmax over the row's positions, then the first mismatch
        best = p[: len(drafts)].argmax(dim=-1).tolist()
        n = next((i for i, (b, d) in enumerate(zip(best, drafts)) if b != d), len(drafts))
        return n, best[n] if n < len(drafts) else None
    for i, d in enumerate(drafts):
        ratio = (p[i, d] / q[i, d]).item() if q[i, d] > 0 else 1.0
        if torch.rand((), generator=gen).item() >= ratio:
            residual = (p[i] - q[i]).clamp(min=0)
            residual = residual if residual.sum() > 0 else p[i]
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), None


def bonus_token(p: torch.Tensor, gen: torch.Generator | None) -> int:
    """The token after a fully accepted block, from p (V,) the fused probs there."""
    return int(p.argmax()) if gen is None else int(torch.multinomial(p, 1, generator=gen))


def accept_row(p: torch.Tensor | None, q: torch.Tensor | None, drafts: list[int], gen: torch.Generator | None
               ) -> tuple[int, int | None]:
    """The acceptance rule as the engine runs it, for one row of a round, greedy or sampled. drafts (n,);
    p (n or n+1, V): with gen None, scores whose argmax is the greedy choice (logit_bias applied), else the
    fused sampling probabilities; q (n, V) the draft's probabilities (unused when greedy). Returns (accepted
    drafts, next token), the next token None when every draft was accepted and p stops at the last draft
    (its bonus needs the position after it, which the round scores only when some row gets there)."""
    if not drafts:
        return 0, None if p is None or len(p) == 0 else bonus_token(p[0], gen)
    n, nxt = accept_drafts(p, q, drafts, gen)
    if nxt is None and n < len(p):
        nxt = bonus_token(p[n], gen)
    return n, nxt


def check_plan(plan: FusionPlan) -> None:
    if not methods.speculation_fits(plan.method, plan.experts):
        raise InvalidRequest(methods.speculation_rule(), "fusion")


SampleRows = Callable[..., list[str]]  # (rows, scores, diags, events, influence trace) -> the rids done


class SpecGroup:
    """The engine's rows of one speculative plan group (same base, expert, k and threshold). It fuses through
    the engine's fuser and samples a round's first token through the engine's sample_rows hook."""

    def __init__(self, plan: FusionPlan, get_backend: Callable[[str], CausalLM], fuser: Fuser,
                 sample_rows: SampleRows) -> None:
        check_plan(plan)
        self.spec: SpecPlan = plan.speculative
        self.fuser, self.sample_rows = fuser, sample_rows
        self.models = [get_backend(n) for n in (plan.base, plan.experts[0].tuned, plan.experts[0].untuned)]
        self.align = fuser.alignment(plan)
        self.device = self.models[0].device
        self.rows: list = []  # engine Sequences; each row's last emitted token is not yet fed to any model
        self.states: list | None = None

    # -- rows in and out ---------------------------------------------------------------------------------
    def join(self, seqs: list, prefilled: dict[str, tuple], events: list) -> list[str]:
        """New rows after their prefill (model name -> (state, logits (b, V))): sample each row's first token
        from the fused prefill scores, keep the rows that go on. Returns the rids that finished."""
        trace = influence.wanted(seqs)
        scores = self._fuse(seqs, *(prefilled[m.name][1].to(self.device) for m in self.models), trace=trace)
        finished = self.sample_rows(seqs, scores, None, events, trace and trace[0])
        live = [i for i, s in enumerate(seqs) if s.req.rid not in finished]
        if live:
            new = [m.select(prefilled[m.name][0], live) for m in self.models]
            self.states = new if self.states is None else [
                m.concat([old, st]) for m, old, st in zip(self.models, self.states, new)]
            self.rows += [seqs[i] for i in live]
        return finished

    def drop(self, gone: set[str]) -> None:
        keep = [i for i, s in enumerate(self.rows) if s.req.rid not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.states = [m.select(s, keep) for m, s in zip(self.models, self.states)] if keep else None

    # -- one round -------------------------------------------------------------------------------------
    def _fuse(self, seqs: list, z_large: torch.Tensor, z_tuned: torch.Tensor, z_small: torch.Tensor,
              trace: list | None = None) -> torch.Tensor:
        """Fused scores for any leading shape (B, ..., V) through the engine's own combine (per-row plans)."""
        per_row = z_large[0].numel() // z_large.shape[-1]
        flat = {m.name: z.reshape(-1, z.shape[-1]) for m, z in zip(self.models, (z_large, z_tuned, z_small))}
        plans = [s.req.plan for s in seqs for _ in range(per_row)]
        scores, _ = self.fuser.combine(plans, flat.__getitem__, trace=trace)
        return scores.reshape(*z_large.shape[:-1], -1)

    def _params(self, repeat: int = 1) -> SamplingTensors:
        sp = [s.req.sampling for s in self.rows for _ in range(repeat)]
        return SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], self.device,
                                     [p.logit_bias for p in sp], self.align.width)

    def _gens(self) -> list[torch.Generator | None]:
        return [None if s.req.sampling.temperature <= 0 else s.generator for s in self.rows]

    def _draft(self) -> tuple[torch.Tensor, list[int], list[torch.Tensor], torch.Tensor | None]:
        """Up to k drafts per row from the tuned expert, fewer where the row's remaining max_tokens or the
        draft's confidence says so, none while the group is larger than max_batch (a plain step then);
        drafting ends when no row proposes. Returns drafts (B, m), each row's number of proposed drafts
        (<= m), the tuned logits (B, V) after pending, d_1, ... (m of them, or m + 1 when a confidence
        check needed the last one: the tuned pass over d_m is otherwise left to `round`, which makes it only
        when some row accepts all m drafts), and q (B, m, V), the draft distributions, which only sampled
        rows need (None when every row is greedy)."""
        tuned, dev = self.models[1], self.device
        params, gens = self._params(), self._gens()
        need_q, min_prob = not params.all_greedy, self.spec.min_draft_prob
        paused = self.spec.max_batch is not None and len(self.rows) > self.spec.max_batch
        caps = [0 if paused else min(self.spec.k, s.req.sampling.max_tokens - s.stopper.generated - 1)
                for s in self.rows]
        cap = torch.tensor(caps, device=dev)
        tok = torch.tensor([s.last_token for s in self.rows], device=dev)
        active = cap > 0
        drafts, logits, q, actives = [], [], [], []
        for i in range(self.spec.k):
            active = active & (cap > i)
            if not bool(active.any()):  # nobody drafts d_(i+1): the pass over tok can wait
                break
            lg = tuned.decode(self.states[1], tok.view(-1, 1))[:, 0].to(dev)  # (B, V)
            logits.append(lg)
            scores = self.align.apply(lg)
            if need_q or min_prob > 0:  # greedy drafts need neither the distribution nor its softmax
                qi = torch.softmax(warp(scores, params), dim=-1)
                if min_prob > 0:
                    active &= qi.max(dim=-1).values >= min_prob
                    if not bool(active.any()):
                        break
                if need_q:
                    q.append(qi)
            actives.append(active)
            tok = sample(scores, params, gens)
            drafts.append(tok)
        b = len(self.rows)
        d = torch.stack(drafts, 1) if drafts else torch.zeros(b, 0, dtype=torch.long, device=dev)
        # a row drafts while active: its number of drafts is the count of its active steps (active only falls)
        lengths = torch.stack(actives, 1).sum(dim=1).tolist() if actives else [0] * b
        qs = None
        if need_q:
            qs = torch.stack(q, 1) if q else torch.zeros(b, 0, logits[0].shape[-1] if logits else 0, device=dev)
        return d, lengths, logits, qs

    def round(self, events: list, stats: SpecStats) -> list[str]:
        """Draft, verify and emit for every row; returns the rids that finished."""
        rows, dev = self.rows, self.device
        drafts, lengths, z_tuned, q = self._draft()
        b, m = drafts.shape
        pending = torch.tensor([[s.last_token] for s in rows], device=dev)
        block = torch.cat([pending, drafts], dim=1)  # (B, m+1)
        z_large = self.models[0].decode(self.states[0], block).to(dev)  # (B, m+1, V)
        z_small = self.models[2].decode(self.states[2], block).to(dev)
        gens = self._gens()
        sampled = any(g is not None for g in gens)

        biased = any(s.req.sampling.logit_bias for s in rows)

        def fused(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """Fused scores (B, hi-lo, V) at positions lo..hi-1 (those logprobs report), the scores greedy rows
            take their argmax of (with logit_bias), and, for sampled rows, the sampling probabilities."""
            sc = self._fuse(rows, z_large[:, lo:hi], torch.stack(z_tuned[lo:hi], 1), z_small[:, lo:hi])
            if not (sampled or biased):
                return sc, sc, None
            v, params = sc.shape[-1], self._params(hi - lo)
            flat = sc.reshape(-1, v)
            greedy = apply_bias(flat, params).reshape(sc.shape)
            return sc, greedy, torch.softmax(warp(flat, params), -1).reshape(sc.shape) if sampled else None

        scores, decide, p = fused(0, m) if m else (None, None, None)
        accepted, nexts = [], []  # nexts: the token after the accepted drafts, None = the bonus after d_m
        for i, gen in enumerate(gens):
            n = lengths[i]
            # positions 0..n of the row (n + 1 of them: the bonus after a short row's last draft is among them);
            # generators are CPU ones (seeded per request), so the draws happen on the CPU
            row_p = ((decide if gen is None else p)[i, : n + 1].cpu()) if m else None
            row_q = None if gen is None else q[i, :n].cpu()
            n_acc, nxt = accept_row(row_p, row_q, drafts[i, :n].tolist(), gen)
            accepted.append(n_acc)
            nexts.append(nxt)
            stats.drafted += n
            stats.accepted += n_acc
        stats.rounds += 1
        stats.row_rounds += b
        tuned_fed = len(z_tuned)
        if any(x is None for x in nexts):  # some row accepted all m drafts: the tuned pass over d_m is due
            if tuned_fed == m:
                z_tuned.append(self.models[1].decode(self.states[1], block[:, m:])[:, 0].to(dev))
                tuned_fed += 1
            last, last_decide, p_last = fused(m, m + 1)
            scores = last if scores is None else torch.cat([scores, last], dim=1)
            for i, gen in enumerate(gens):
                if nexts[i] is None:
                    nexts[i] = bonus_token((last_decide if gen is None else p_last)[i, 0].cpu(), gen)
        emitted = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1)[:, : scores.shape[1]]
        emitted[torch.arange(b, device=dev), torch.tensor(accepted, device=dev)] = torch.tensor(nexts, device=dev)
        trace = None
        if any(s.req.plan.influence for s in rows):  # the block's scores as the fuser took them
            n = scores.shape[1]  # the positions scored: m, or m + 1 with a bonus
            trace = influence.block_trace([s.req.plan for s in rows], self.align, tuple(m.name for m in self.models),
                                          z_large[:, :n], torch.stack(z_tuned[:n], 1), z_small[:, :n])
        finished = self._emit(emitted, accepted, scores, events, trace)
        # each model keeps the prefix through the last accepted draft; the emitted token is the next pending
        for mdl, s, fed in zip(self.models, self.states, (m + 1, tuned_fed, m + 1)):
            mdl.forget_last(s, [fed - 1 - n for n in accepted])
        return finished

    def _emit(self, emitted: torch.Tensor, accepted: list[int], scores: torch.Tensor, events: list,
              trace: influence.Trace | None) -> list[str]:
        logp = torch.log_softmax(scores, dim=-1)  # (B, P, V)
        chosen = logp.gather(-1, emitted.unsqueeze(-1))[..., 0].tolist()  # (B, P)
        n_top = max((s.req.sampling.logprobs or 0) for s in self.rows)
        top_ids, top_lp = top_logprobs(logp, n_top) if n_top else (None, None)  # (B, m+1, n)
        tok = self.models[0].tokenizer
        tokens = emitted.tolist()
        ids, lps = (top_ids.tolist(), top_lp.tolist()) if n_top else (None, None)
        infl = self._influence(trace, scores, tokens, accepted) if trace else None
        finished = []
        for i, s in enumerate(self.rows):
            for j in range(accepted[i] + 1):
                ev = s.emit(tokens[i][j], chosen[i][j], ids and ids[i][j], lps and lps[i][j], tok, None,
                            infl and infl[i][j])
                events.append(ev)
                if ev.finish_reason:
                    finished.append(s.req.rid)
                    break
        return finished

    def _influence(self, trace: influence.Trace, scores: torch.Tensor, tokens: list[list[int]], accepted: list[int]
                   ) -> list[list[dict | None]]:
        """The influence entries of a round's emitted tokens, (B, P) (None where a row does not ask or a position
        is not emitted)."""
        b, p = scores.shape[:2]
        wants = [s.req.plan.influence and j <= accepted[i] for i, s in enumerate(self.rows) for j in range(p)]
        flat = influence.collect(wants, trace, scores.reshape(b * p, -1), [t for row in tokens for t in row],
                                 self.models[0].tokenizer)
        return [flat[i * p:(i + 1) * p] for i in range(b)]
