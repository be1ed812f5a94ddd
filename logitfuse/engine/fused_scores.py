"""From the models' logits to fused scores for a group of rows: gather, align vocabularies, dispatch.

The math is in fusion.py and weights.py, each method's use of it in logitfuse/methods/; this module only
gathers each row's logits from the models' batched slots, applies the ensemble's vocabulary alignment and
hands the rows to the plan's method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from logitfuse import methods
from logitfuse.backends.base import CausalLM, RewardModel
from logitfuse.engine import influence
from logitfuse.engine.request import GenerationRequest, PromptScores, TopLogprob
from logitfuse.engine.rollouts import RowRollouts
from logitfuse.engine.stopping import token_piece
from logitfuse.errors import InvalidRequest, VocabMismatchError
from logitfuse.methods.base import Step
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import candidates, fusion
from logitfuse.ops.vocab import Alignment, align

# a base's log-probabilities completed on the union of supports: (base (b, V), the experts' (tuned, untuned)
# thunk, their coefficients (b, T)) -> base with the candidates outside its top N filled in
Complete = Callable[[torch.Tensor, Callable[[], tuple[torch.Tensor, torch.Tensor]], torch.Tensor], torch.Tensor]


class Fuser:
    def __init__(self, get_backend: Callable[[str], CausalLM], get_reward: Callable[[str], RewardModel] | None,
                 solver_threads: int | None = None) -> None:
        self.get_backend = get_backend
        self.get_reward = get_reward
        self.solver_threads = solver_threads  # torch intra-op threads for the DLF weight search (None: as is)
        self._alignments: dict[tuple[str, ...], Alignment] = {}

    def alignment(self, plan: FusionPlan) -> Alignment:
        """The shared vocabulary of the plan's models, checked once per set of models."""
        cross = plan.cross_models()
        key = (plan.models(), cross)
        if key not in self._alignments:
            info = lambda n, texts=False: self.get_backend(n).vocab_info(with_texts=texts)  # noqa: E731
            try:
                same = [info(plan.base, bool(cross))] + [info(n) for n in plan.models()[1:] if n not in cross]
                pairs = [(info(e.tuned, True), info(e.untuned, True)) for e in plan.experts if e.cross]
                self._alignments[key] = align(same, pairs)
            except VocabMismatchError as err:
                raise InvalidRequest(str(err), "model") from None
        return self._alignments[key]

    def fuse(self, seqs: list, slots: dict, trace: list | None = None) -> tuple[torch.Tensor, list | None]:
        """Fused scores (b, V) for rows sharing one plan group, and per-row diagnostics (trace: combine's)."""
        rids = [s.req.rid for s in seqs]

        def rows_of(name: str) -> torch.Tensor:
            slot = slots[name]
            where = slot.index()
            idx = torch.tensor([where[r] for r in rids], dtype=torch.long, device=slot.logits.device)
            return slot.logits.index_select(0, idx)

        plan = seqs[0].req.plan
        backend = self.get_backend(plan.base)
        complete = None
        if backend.remote and plan.experts and getattr(backend, "candidates", 0) > 0:
            slot = slots[plan.base]
            where = slot.index()
            rows = [where[r] for r in rids]
            stops = [sorted(s.stopper.stop_ids) for s in seqs]
            # a greedy row needs only the tokens that could win; a sampled one those within MARGIN of the best
            margins = [0.0 if s.req.sampling.temperature == 0 else candidates.MARGIN for s in seqs]
            complete = lambda base, experts, coef: self.complete_base(  # noqa: E731
                backend, slot.state, rows, stops, base, experts, coef, margins)
        return self.combine([s.req.plan for s in seqs], rows_of, RowRollouts(seqs, slots), complete, trace)

    @staticmethod
    def complete_base(backend, state, rows: list[int], stops: list[list[int]], base: torch.Tensor,
                      experts: Callable[[], tuple[torch.Tensor, torch.Tensor]], coef: torch.Tensor,
                      margins: list[float]) -> torch.Tensor:
        """A remote base's top-N log-probabilities widened to the union of supports (ops/candidates.py): the
        candidates outside its top N get the server's own log-probability (one more round of calls) or, where
        the server cannot give one, the stated estimate."""
        tuned, untuned = experts()
        e, guess = candidates.push_and_guess(tuned, untuned, coef)
        miss = candidates.missing(base, e, guess, backend.candidates, stops,
                                  torch.tensor(margins, dtype=base.dtype, device=base.device))
        if not any(miss):
            return base
        values = backend.score_tokens(state, rows, miss)
        if values is None:  # the server cannot score them: the stated estimate, one value per row
            est = candidates.estimate(base, torch.tensor([len(ids) for ids in miss], device=base.device)).tolist()
            values = [[v] * len(ids) for v, ids in zip(est, miss)]
        out = base.clone()
        for i, ids in enumerate(miss):
            if ids:
                out[i, ids] = torch.tensor(values[i], dtype=out.dtype, device=out.device)
        return out

    def combine(self, plans: list[FusionPlan], rows_of: Callable[[str], torch.Tensor],
                rollouts: RowRollouts | None = None, complete: Complete | None = None, trace: list | None = None
                ) -> tuple[torch.Tensor, list | None]:
        """The plans' method (one group) on their rows; rows_of(model) -> (b, V). rollouts: on a decode step.
        complete: a remote base's top N widened to the union of supports before the method runs. trace: a
        list that gets what the call saw, for influence (engine/influence.py)."""
        plan = plans[0]
        al = self.alignment(plan)
        base = al.apply(rows_of(plan.base)).float()  # (b, V)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        owns: dict[str, torch.Tensor] = {}

        def own(name: str) -> torch.Tensor:
            """A cross-tokenizer model's log-probabilities in its own vocabulary (b, V_e), once per step."""
            if name not in owns:
                owns[name] = torch.log_softmax(rows_of(name).to(base.device).float(), -1)
            return owns[name]

        def aligned(name: str) -> torch.Tensor:
            if name in al.maps:  # what al.apply computes, from the log-probabilities native() shares
                return al.gather(own(name), name)
            return al.apply(rows_of(name), name).to(base.device).float()

        def experts() -> tuple[torch.Tensor, torch.Tensor]:
            if not cache:
                tuned = torch.stack([aligned(e.tuned) for e in plan.experts], 1)
                untuned = torch.stack([aligned(e.untuned) for e in plan.experts], 1)
                cache.append((tuned, untuned))
            return cache[0]  # (b, T, V) each

        if complete is not None:
            n = len(plan.experts)
            coef = torch.tensor([p.coef if len(p.coef) == n else (1.0,) * n for p in plans], dtype=torch.float32,
                                device=base.device)
            base = complete(base, experts, coef)

        def native() -> tuple[torch.Tensor, torch.Tensor]:
            """A cross-tokenizer pair's log-probabilities in its own vocabulary, (b, T, V_e) each."""
            return (torch.stack([own(e.tuned) for e in plan.experts], 1),
                    torch.stack([own(e.untuned) for e in plan.experts], 1))

        cross = any(e.cross for e in plan.experts)
        push = None
        if cross and len(plan.experts) == 1:
            def push(coef: torch.Tensor) -> torch.Tensor:
                """The pair's push of log-ratios in its own vocabulary, mapped once (a base token without a
                counterpart gets 0): what the mapped tuned and untuned scores give, at a fraction of the work
                when the base's vocabulary is the larger (two (b, V) maps and a (b, V) difference saved)."""
                own_tuned, own_untuned = native()
                return al.gather(fusion.steering(own_tuned, own_untuned, coef.to(base.device)), plan.experts[0].tuned)

        step = Step(plans, base, experts, self.solver_threads, self.get_reward, rollouts, native if cross else None,
                    push)
        scores, diags = methods.get(plan.method).combine(step)
        if trace is not None:
            trace.append(influence.trace_of(step, diags))
        return scores, diags


def score_prompt(fuser: Fuser, req: GenerationRequest, logits: dict[str, torch.Tensor]) -> PromptScores:
    """Fused log-probability of each prompt token given the tokens before it (first is None).

    logits maps each model to its (L, V) logits over the prompt; position j predicts token j + 1.
    """
    ids = req.prompt_ids
    n = len(ids)
    plans = [req.plan] * (n - 1)
    scores, _ = fuser.combine(plans, lambda name: logits[name][: n - 1]) if n > 1 else (None, None)
    tok = fuser.get_backend(req.plan.base).tokenizer
    top_n = req.sampling.logprobs or 0
    lps: list[float | None] = [None]
    tops: list[list[TopLogprob] | None] = [None]
    if scores is not None:
        logp = torch.log_softmax(scores.float(), dim=-1)  # (L-1, V)
        nxt = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
        lps += logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).tolist()
        if top_n:
            top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
            tops += [[TopLogprob(j, token_piece(tok, j), v) for j, v in zip(i_row, v_row)]
                     for i_row, v_row in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops += [[] for _ in range(n - 1)]
    # the first token as the text starts, the others as they continue it: the pieces join into the prompt text
    pieces = [tok.decode([ids[0]])] + [token_piece(tok, i) for i in ids[1:]]
    return PromptScores(req.rid, list(ids), pieces, lps, tops)
