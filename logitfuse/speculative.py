"""Speculative EFT up-scaling (Mitchell et al., 2023, section on speculative decoding), inside the engine.

The small tuned expert drafts up to k tokens; the large base and the small untuned model score the whole
block in one pass each; draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) where p is the fused
(proxy/EFT) sampling distribution and q the draft's; at the first rejection the token is resampled from
norm(max(0, p_i - q_i)); when every draft is accepted a bonus token comes from p after the last one. The
output distribution is exactly the fused one; under greedy decoding the tokens are those of plain fused
greedy decoding. A row stops drafting early where the draft's own top probability is below min_draft_prob
(decided from the draft model alone, before the draft token is drawn, so the rule stays exact).

Rows of a group accept different numbers of drafts: rejected positions are forgotten per row
(backend.forget_last), never recomputed. A group keeps its own KV states (its rows advance by different
numbers of tokens per step, unlike the engine's shared slots); rows join at step boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from logitfuse.plan import FusionPlan, SpecPlan, speculation_fits
from logitfuse.request import GenerationRequest, InvalidRequest
from logitfuse.sampling import SamplingTensors, sample, top_logprobs, warp


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def __sub__(self, other: SpecStats) -> SpecStats:
        return SpecStats(self.rounds - other.rounds, self.drafted - other.drafted, self.accepted - other.accepted)

    def __add__(self, other: SpecStats) -> SpecStats:
        return SpecStats(self.rounds + other.rounds, self.drafted + other.drafted, self.accepted + other.accepted)


def accept_block(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator | None
                 ) -> tuple[int, int]:
    """Speculative sampling for one row. p (k+1, V) fused probs, q (k, V) draft probs, drafts (k,).
    Returns (accepted drafts, next token). gen None means greedy (accept while the draft is p's argmax)."""
    k = len(drafts)
    for i, d in enumerate(drafts):
        if gen is None:
            if int(p[i].argmax()) != d:
                return i, int(p[i].argmax())
            continue
        ratio = (p[i, d] / q[i, d]).item() if q[i, d] > 0 else 1.0
        if torch.rand((), generator=gen).item() >= ratio:
            residual = (p[i] - q[i]).clamp(min=0)
            residual = residual if residual.sum() > 0 else p[i]
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    if gen is None:
        return k, int(p[k].argmax())
    return k, int(torch.multinomial(p[k], 1, generator=gen))


def check_plan(plan: FusionPlan) -> None:
    if not speculation_fits(plan.method, plan.experts):
        raise InvalidRequest("speculative decoding needs one eft/proxy plan with exactly one expert sharing the "
                             "base's tokenizer", "fusion")


class SpecGroup:
    """The engine's rows of one speculative plan group (same base, expert, k and threshold)."""

    def __init__(self, engine, plan: FusionPlan) -> None:
        check_plan(plan)
        self.engine = engine
        self.spec: SpecPlan = plan.speculative
        get = engine.get_backend
        self.models = [get(plan.base), get(plan.experts[0].tuned), get(plan.experts[0].untuned)]
        self.align = engine.fuser.alignment(plan)
        self.device = self.models[0].device
        self.rows: list = []  # engine Sequences; each row's last emitted token is not yet fed to any model
        self.states: list | None = None

    # -- rows in and out ---------------------------------------------------------------------------------
    def join(self, seqs: list, prefilled: dict[str, tuple], events: list) -> list[str]:
        """New rows after their prefill (model name -> (state, logits (b, V))): sample each row's first token
        from the fused prefill scores, keep the rows that go on. Returns the rids that finished."""
        scores = self._fuse(seqs, *(prefilled[m.name][1].to(self.device) for m in self.models))
        finished = self.engine._sample_group(seqs, scores, None, events)
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
    def _fuse(self, seqs: list, z_large: torch.Tensor, z_tuned: torch.Tensor, z_small: torch.Tensor
              ) -> torch.Tensor:
        """Fused scores for any leading shape (B, ..., V) through the engine's own combine (per-row plans)."""
        per_row = z_large[0].numel() // z_large.shape[-1]
        flat = {m.name: z.reshape(-1, z.shape[-1]) for m, z in zip(self.models, (z_large, z_tuned, z_small))}
        plans = [s.req.plan for s in seqs for _ in range(per_row)]
        scores, _ = self.engine.fuser.combine(plans, flat.__getitem__)
        return scores.reshape(*z_large.shape[:-1], -1)

    def _params(self, repeat: int = 1) -> SamplingTensors:
        sp = [s.req.sampling for s in self.rows for _ in range(repeat)]
        return SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], self.device)

    def _gens(self) -> list[torch.Generator | None]:
        return [None if s.req.sampling.temperature <= 0 else s.generator for s in self.rows]

    def _draft(self) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Up to k drafts per row from the tuned expert, fewer where the row's remaining max_tokens or the
        draft's confidence says so, none while the group is larger than max_batch (a plain step then);
        drafting ends when no row proposes. Returns drafts (B, m), each row's
        number of proposed drafts (<= m), the tuned logits (B, m+1, V) after pending, d_1..d_m, and q (B, m, V)."""
        tuned, dev = self.models[1], self.device
        params, gens = self._params(), self._gens()
        paused = self.spec.max_batch is not None and len(self.rows) > self.spec.max_batch
        cap = torch.tensor([0 if paused else min(self.spec.k, s.req.sampling.max_tokens - s.stopper.generated - 1)
                            for s in self.rows], device=dev)
        tok = torch.tensor([s.last_token for s in self.rows], device=dev)
        lengths = torch.zeros(len(self.rows), dtype=torch.long, device=dev)
        active = cap > 0
        drafts, logits, q = [], [], []
        for i in range(self.spec.k + 1):
            lg = tuned.decode(self.states[1], tok.view(-1, 1))[:, 0].to(dev)  # (B, V)
            logits.append(lg)
            if i == self.spec.k:
                break
            scores = self.align.apply(lg)
            qi = torch.softmax(warp(scores, params), dim=-1)
            active &= cap > i
            if self.spec.min_draft_prob > 0:
                active &= qi.max(dim=-1).values >= self.spec.min_draft_prob
            if not bool(active.any()):
                break
            lengths += active.long()
            q.append(qi)
            tok = sample(scores, params, gens)
            drafts.append(tok)
        b = len(self.rows)
        d = torch.stack(drafts, 1) if drafts else torch.zeros(b, 0, dtype=torch.long, device=dev)
        qs = torch.stack(q, 1) if q else torch.zeros(b, 0, logits[0].shape[-1], device=dev)
        return d, lengths.tolist(), torch.stack(logits, 1), qs

    def round(self, events: list, stats: SpecStats) -> list[str]:
        """Draft, verify and emit for every row; returns the rids that finished."""
        rows, dev = self.rows, self.device
        drafts, lengths, z_tuned, q = self._draft()
        m = drafts.shape[1]
        block = torch.cat([torch.tensor([[s.last_token] for s in rows], device=dev), drafts], dim=1)  # (B, m+1)
        z_large = self.models[0].decode(self.states[0], block).to(dev)  # (B, m+1, V)
        z_small = self.models[2].decode(self.states[2], block).to(dev)
        scores = self._fuse(rows, z_large, z_tuned, z_small)  # (B, m+1, V)
        b, v = scores.shape[0], scores.shape[-1]
        logp = torch.log_softmax(scores, dim=-1)
        gens = self._gens()
        # greedy rows: accept while the draft is the fused argmax (one comparison for the whole batch)
        best = scores.argmax(dim=-1)  # (B, m+1)
        n_greedy = (best[:, :m] == drafts).long().cumprod(dim=1).sum(dim=1).tolist()
        p = None
        if any(g is not None for g in gens):
            p = torch.softmax(warp(scores.reshape(-1, v), self._params(m + 1)), -1).reshape(b, m + 1, v)
        emitted = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1)  # accepted drafts, then the next token
        accepted = []
        for i, gen in enumerate(gens):
            n = lengths[i]
            if gen is None:
                n_acc = min(n_greedy[i], n)
                nxt = int(best[i, n_acc])
            else:
                # generators are CPU ones (seeded per request), so the draws happen on the CPU
                n_acc, nxt = accept_block(p[i, : n + 1].cpu(), q[i, :n].cpu(), drafts[i, :n].tolist(), gen)
            emitted[i, n_acc] = nxt
            accepted.append(n_acc)
            stats.drafted += n
            stats.accepted += n_acc
        stats.rounds += 1
        finished = self._emit(emitted, accepted, logp, events)
        for mdl, s in zip(self.models, self.states):
            mdl.forget_last(s, [m - n for n in accepted])
        return finished

    def _emit(self, emitted: torch.Tensor, accepted: list[int], logp: torch.Tensor, events: list) -> list[str]:
        chosen = logp.gather(-1, emitted.unsqueeze(-1))[..., 0].tolist()  # (B, m+1)
        n_top = max((s.req.sampling.logprobs or 0) for s in self.rows)
        top_ids, top_lp = top_logprobs(logp, n_top) if n_top else (None, None)  # (B, m+1, n)
        tok = self.models[0].tokenizer
        tokens = emitted.tolist()
        ids, lps = (top_ids.tolist(), top_lp.tolist()) if n_top else (None, None)
        finished = []
        for i, s in enumerate(self.rows):
            for j in range(accepted[i] + 1):
                ev = s.emit(tokens[i][j], chosen[i][j], ids and ids[i][j], lps and lps[i][j], tok)
                events.append(ev)
                if ev.finish_reason:
                    finished.append(s.req.rid)
                    break
        return finished


class SpeculativeEFT:
    """Library convenience: run one-expert proxy/EFT requests speculatively through the engine and keep
    the draft statistics of its calls. (Ensembles and requests can ask for it too: `fusion.speculative`.)"""

    def __init__(self, lf, k: int = 4, min_draft_prob: float = 0.0, max_batch: int | None = None) -> None:
        if k < 1:
            raise ValueError("k (draft tokens per round) must be at least 1")
        self.lf, self.spec, self.stats = lf, SpecPlan(k, min_draft_prob, max_batch), SpecStats()

    def generate(self, reqs: list[GenerationRequest]):
        from logitfuse.api import Completion

        for r in reqs:
            check_plan(r.plan)
        reqs = [replace(r, plan=replace(r.plan, speculative=self.spec)) for r in reqs]
        before = replace(self.lf.engine.spec_stats)
        done = {r.rid: Completion(r.rid) for r in reqs}
        for ev in self.lf.engine.run(reqs):
            done[ev.rid].add(ev)
        self.stats = self.stats + (self.lf.engine.spec_stats - before)
        return [done[r.rid] for r in reqs]
