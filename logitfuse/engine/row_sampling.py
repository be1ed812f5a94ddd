"""The per-row failure path of a step: sampling a fused group's rows so that one row's fault ends that row.

A row whose fused scores are not a distribution (a NaN, +inf, or no finite score) ends with an error event
before sampling, and so does a row whose token controls (a grammar, allowed_token_ids, ...) leave no token;
if drawing the others' tokens still fails, each row is drawn alone and only the rows that fail end. The rows
around a failing one get the tokens they would have got without it.
"""

from __future__ import annotations

import torch

from logitfuse.engine import influence, token_controls
from logitfuse.engine.request import ErrorDetail, GenerationRequest, TokenEvent
from logitfuse.ops.sampling import SamplingTensors, invalid_rows, sample, token_logprobs, top_logprobs

NOT_A_DISTRIBUTION = "fused scores are not a distribution (NaN, +inf or no finite score)"
NOTHING_ALLOWED = ("no token is allowed: the request's token controls (structured output, allowed_token_ids, "
                   "bad_words, min_tokens) leave no token the fused distribution gives any probability (a method "
                   "that keeps only its top candidates, as tqstar does, can exclude every allowed token)")
FAULTS = {NOT_A_DISTRIBUTION: "not_a_distribution", NOTHING_ALLOWED: "no_token_allowed"}  # faults raise nothing


def failed(req: GenerationRequest, err: Exception | str, generated: int = 0) -> TokenEvent:
    """The error event that ends one request's sequence, with the exception's type and traceback."""
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    detail = ErrorDetail(FAULTS.get(err, "engine_fault")) if isinstance(err, str) else ErrorDetail.of(err)
    return TokenEvent(req.rid, None, "", finish_reason="error", error=msg, prompt_tokens=len(req.prompt_ids),
                      completion_tokens=generated, error_detail=detail)


def draw(seqs: list, scores: torch.Tensor, tokenizer=None, raw: bool = False
         ) -> tuple[list[str | Exception | None], list[int], list[float], list | None, list | None]:
    """Each row's fault (None: none), token, its logprob, and the top-N ids and logprobs the rows ask for.
    scores (b, V). A row that is not a distribution is drawn from zeros instead (its token is thrown away), so
    the check travels to the host in the same copy as the tokens: one device sync per group and step. The
    logprobs are the fused distribution's, before the rows' controls and warps; raw: the scores are already
    the log-probabilities to report (a remote base alone: the server's own numbers, not renormalised over its
    top N)."""
    bad = invalid_rows(scores)  # (b,)
    scores = scores.masked_fill(bad[:, None], 0.0)
    sp = [s.req.sampling for s in seqs]
    params = SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], scores.device,
                                   [p.logit_bias for p in sp], scores.shape[-1])
    shaped, params = token_controls.shape(seqs, scores, params, tokenizer)
    empty = (~torch.isfinite(shaped).any(-1) & ~bad) if shaped is not scores else torch.zeros_like(bad)
    # (b,) the controls left no token (only rows with controls can: plain rows skip the full-vocabulary pass)
    shaped = shaped.masked_fill(empty[:, None], 0.0)
    tokens = sample(shaped, params, [s.generator for s in seqs])
    # the flags, tokens and logprobs reach the host in one copy: the stop checks need them, nothing else waits
    host = torch.stack([bad.double() + 2 * empty.double(), tokens.double(),
                        token_logprobs(scores, tokens, not raw).double()]).tolist()
    faults = [None if f == 0 else NOT_A_DISTRIBUTION if f == 1 else token_controls.dead_end(s) or NOTHING_ALLOWED
              for f, s in zip(host[0], seqs)]  # a grammar at a dead end says what it needed
    n_top = max((p.logprobs or 0) for p in sp)
    if not n_top:
        return faults, [int(t) for t in host[1]], host[2], None, None
    top_ids, top_lp = top_logprobs(scores, n_top, not raw)
    return faults, [int(t) for t in host[1]], host[2], top_ids.tolist(), top_lp.tolist()


def sample_rows(seqs: list, scores: torch.Tensor, diags: list | None, tokenizer, events: list, raw: bool = False,
                trace: influence.Trace | None = None) -> list[str]:
    """Sample and emit every row of a group; returns the ids of the sequences that finished (or failed).
    trace: what the group's fusion saw, for the rows that ask for influence."""
    try:
        bad, token_ids, chosen, ids, lps = draw(seqs, scores, tokenizer, raw)
    except Exception as err:
        if len(seqs) == 1:
            events.append(failed(seqs[0].req, err, seqs[0].stopper.generated))
            return [seqs[0].req.rid]
        finished = []
        for i, s in enumerate(seqs):  # one row's fault must not end the others: each row alone
            finished += sample_rows([s], scores[i:i + 1], diags and [diags[i]], tokenizer, events, raw,
                                    trace and trace.row(i))
        return finished
    infl = _influence(seqs, bad, trace, scores, token_ids, tokenizer, raw) if trace else None
    finished = []
    for i, (s, t) in enumerate(zip(seqs, token_ids)):
        if bad[i] or isinstance(infl and infl[i], Exception):
            ev = failed(s.req, bad[i] or infl[i], s.stopper.generated)
        else:
            try:
                token_controls.take(s, t)
                ev = s.emit(t, chosen[i], ids and ids[i], lps and lps[i], tokenizer, diags[i] if diags else None,
                            infl and infl[i])
            except Exception as err:
                ev = failed(s.req, err, s.stopper.generated)
        events.append(ev)
        if ev.finish_reason:
            finished.append(s.req.rid)
    return finished


def _influence(seqs: list, bad: list, trace: influence.Trace, scores: torch.Tensor, tokens: list[int], tokenizer,
               raw: bool) -> list:
    """Each row's influence entry (None where the row does not ask); if reading them fails, the rows that
    ask get the error instead (they end with it, the others go on)."""
    wants = [s.req.plan.influence and not bad[i] for i, s in enumerate(seqs)]
    try:
        return influence.collect(wants, trace, scores, tokens, tokenizer, raw)
    except Exception as err:
        return [err if w else None for w in wants]
