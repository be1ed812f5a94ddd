"""Speculative EFT up-scaling (Mitchell et al., 2023, section on speculative decoding).

The small tuned expert drafts k tokens; the large base and the small untuned model score the whole block
in one pass each; draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) where p is the fused
(EFT) sampling distribution and q the draft's; at the first rejection the token is resampled from
norm(max(0, p_i - q_i)); when all k are accepted a bonus token comes from p_{k+1}. The output distribution
is exactly the fused one; under greedy decoding the tokens are those of plain fused greedy decoding.
Rows of a batch accept different numbers of drafts: rejected positions are forgotten per row
(backend.forget_last), never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logitfuse import fusion
from logitfuse.api import Completion, LogitFuse
from logitfuse.request import GenerationRequest, InvalidRequest
from logitfuse.sampling import SamplingTensors, make_generator, sample, warp
from logitfuse.stopping import StopChecker


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Row:
    req: GenerationRequest
    stopper: StopChecker
    gen: torch.Generator
    out: Completion
    pending: int = -1  # the last emitted token, not yet fed to any model


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


class SpeculativeEFT:
    """Speculative decoding for a batch of EFT (or proxy) requests with one expert."""

    def __init__(self, lf: LogitFuse, k: int = 4, min_draft_prob: float = 0.0) -> None:
        if k < 1:
            raise ValueError("k (draft tokens per round) must be at least 1")
        self.lf, self.k, self.min_draft_prob, self.stats = lf, k, min_draft_prob, SpecStats()

    def generate(self, reqs: list[GenerationRequest]) -> list[Completion]:
        plan = reqs[0].plan
        if plan.method not in ("eft", "proxy") or len(plan.experts) != 1 or any(r.plan != plan for r in reqs):
            raise InvalidRequest("speculative decoding needs one eft/proxy plan with exactly one expert", "fusion")
        get = self.lf.pool.get
        self.models = [get(plan.base), get(plan.experts[0].tuned), get(plan.experts[0].untuned)]
        self.align = self.lf.engine.fuser.alignment(plan)
        for r in reqs:
            self.lf.engine.check(r)  # context length, vocabularies: the engine's own checks
        dev = self.models[0].device
        self.coef = torch.tensor([[plan.coef[0]]], device=dev)
        self.outs: dict[str, Completion] = {}
        rows = [self._row(r) for r in reqs]
        states, logits = zip(*(m.prefill([r.prompts[m.name] for r in reqs]) for m in self.models))
        states = list(states)
        scores = self._fuse(*(z.to(dev) for z in logits))  # (B, V)
        first = sample(scores, self._params(rows, device=dev), [self._gen(r) for r in rows])
        first_lp = torch.log_softmax(scores, -1).gather(-1, first.view(-1, 1))[:, 0].tolist()
        live = [i for i, row in enumerate(rows) if not self._emit(row, [int(first[i])], [first_lp[i]])]
        states = [m.select(s, live) for m, s in zip(self.models, states)] if live else []
        rows = [rows[i] for i in live]
        while rows:
            rows, states = self._round(rows, states)
        return [self.outs[r.rid] for r in reqs]

    def _row(self, r: GenerationRequest) -> Row:
        stop = StopChecker.for_request(r, self.models[0].tokenizer, min(m.max_context for m in self.models))
        row = Row(r, stop, make_generator(r.sampling.seed), Completion(r.rid, prompt_tokens=len(r.prompt_ids)))
        self.outs[r.rid] = row.out
        return row

    @staticmethod
    def _gen(row: Row) -> torch.Generator | None:
        return None if row.req.sampling.temperature <= 0 else row.gen

    def _fuse(self, z_large: torch.Tensor, z_tuned: torch.Tensor, z_small: torch.Tensor) -> torch.Tensor:
        """EFT scores for any leading shape (..., V)."""
        shape = z_large.shape
        a = self.align.apply
        flat = [a(z).reshape(-1, a(z).shape[-1]) for z in (z_large, z_tuned, z_small)]
        n = flat[0].shape[0]
        out = fusion.eft(flat[0], flat[1].unsqueeze(1), flat[2], torch.ones(n, device=flat[0].device),
                         self.coef.expand(n, 1))
        return out.reshape(*shape[:-1], -1)

    @staticmethod
    def _params(rows: list[Row], repeat: int = 1, device: torch.device | str = "cpu") -> SamplingTensors:
        sp = [r.req.sampling for r in rows for _ in range(repeat)]
        return SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], device)

    def _emit(self, row: Row, tokens: list[int], logprobs: list[float] | None = None) -> bool:
        """Feed emitted tokens to the row's output; True when the row has finished."""
        for j, t in enumerate(tokens):
            delta, reason = row.stopper.add(t)
            row.out.add_token(t, delta, logprobs[j] if logprobs else None, reason)
            if reason:
                return True
        row.pending = tokens[-1]
        return False

    def _draft(self, rows: list[Row], state) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Up to k draft tokens per row from the tuned expert.

        A row stops proposing at the first position where the draft's own top probability is below
        min_draft_prob (decided before the draft token is drawn, from the draft model alone, so the
        acceptance rule stays exact); drafting ends when no row proposes. Returns drafts (B, m), each row's
        number of proposed drafts (<= m), the tuned logits (B, m+1, V) after pending, d_1..d_m, and q (B, m, V).
        """
        tuned, k = self.models[1], self.k
        params = self._params(rows, device=self.models[0].device)
        gens = [self._gen(r) for r in rows]
        dev = self.models[0].device
        tok = torch.tensor([r.pending for r in rows], device=dev)
        active = torch.ones(len(rows), dtype=torch.bool, device=dev)
        lengths = torch.zeros(len(rows), dtype=torch.long, device=dev)
        drafts, logits, q = [], [], []
        for i in range(k + 1):
            lg = tuned.decode(state, tok.view(-1, 1))[:, 0].to(dev)  # (B, V)
            logits.append(lg)
            if i == k:
                break
            scores = self.align.apply(lg)
            qi = torch.softmax(warp(scores, params), dim=-1)
            if self.min_draft_prob > 0:
                active &= qi.max(dim=-1).values >= self.min_draft_prob
                if not bool(active.any()):
                    break
            lengths += active.long()
            q.append(qi)
            tok = sample(scores, params, gens)
            drafts.append(tok)
        b = len(rows)
        d = torch.stack(drafts, 1) if drafts else torch.zeros(b, 0, dtype=torch.long, device=dev)
        qs = torch.stack(q, 1) if q else torch.zeros(b, 0, logits[0].shape[-1], device=dev)
        return d, lengths.tolist(), torch.stack(logits, 1), qs

    def _round(self, rows: list[Row], states: list) -> tuple[list[Row], list]:
        drafts, lengths, z_tuned, q = self._draft(rows, states[1])
        m = drafts.shape[1]
        dev = drafts.device
        block = torch.cat([torch.tensor([[r.pending] for r in rows], device=dev), drafts], dim=1)  # (B, m+1)
        z_large = self.models[0].decode(states[0], block).to(dev)  # (B, m+1, V)
        z_small = self.models[2].decode(states[2], block).to(dev)
        scores = self._fuse(z_large, z_tuned, z_small)  # (B, m+1, V)
        b, v = scores.shape[0], scores.shape[-1]
        logp = torch.log_softmax(scores, dim=-1)
        greedy = [self._gen(r) is None for r in rows]
        # greedy rows: accept while the draft is the fused argmax (one comparison for the whole batch)
        best = scores.argmax(dim=-1)  # (B, m+1)
        agree = (best[:, :m] == drafts).long().cumprod(dim=1)  # (B, m)
        n_greedy = agree.sum(dim=1).tolist()
        p = None
        if not all(greedy):
            p = torch.softmax(warp(scores.reshape(-1, v), self._params(rows, m + 1, dev)), -1).reshape(b, m + 1, v)
        emitted = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1)  # (B, m+1): accepted drafts, then next
        accepted = []
        for i, row in enumerate(rows):
            n = lengths[i]
            if greedy[i]:
                n_acc = min(n_greedy[i], n)
                nxt = int(best[i, n_acc])
            else:
                n_acc, nxt = accept_block(p[i, : n + 1], q[i, :n], drafts[i, :n].tolist(), row.gen)
            emitted[i, n_acc] = nxt
            accepted.append(n_acc)
            self.stats.drafted += n
            self.stats.accepted += n_acc
        lps = logp.gather(-1, emitted.unsqueeze(-1))[..., 0].tolist()  # (B, m+1)
        tokens = emitted.tolist()
        forget, live = [], []
        for i, row in enumerate(rows):
            n_acc = accepted[i]
            forget.append(m - n_acc)
            if not self._emit(row, tokens[i][: n_acc + 1], lps[i][: n_acc + 1]):
                live.append(i)
        self.stats.rounds += 1
        for mdl, s in zip(self.models, states):
            mdl.forget_last(s, forget)
        if not live:
            return [], []
        return [rows[i] for i in live], [mdl.select(s, live) for mdl, s in zip(self.models, states)]
