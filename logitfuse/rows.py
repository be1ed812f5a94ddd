"""The per-row failure path of a step: sampling a fused group's rows so that one row's fault ends that row.

A row whose fused scores are not a distribution (a NaN, +inf, or no finite score) ends with an error event
before sampling; if drawing the others' tokens still fails, each row is drawn alone and only the rows that
fail end. The rows around a failing one get the tokens they would have got without it.
"""

from __future__ import annotations

import torch

from logitfuse.request import GenerationRequest, TokenEvent
from logitfuse.sampling import SamplingTensors, invalid_rows, sample, token_logprobs, top_logprobs


def failed(req: GenerationRequest, err: Exception | str, generated: int = 0) -> TokenEvent:
    """The error event that ends one request's sequence."""
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return TokenEvent(req.rid, None, "", finish_reason="error", error=msg, prompt_tokens=len(req.prompt_ids),
                      completion_tokens=generated)


def draw(seqs: list, scores: torch.Tensor) -> tuple[list[int], list[float], list | None, list | None]:
    """Each row's token, its logprob, and the top-N ids and logprobs the rows ask for. scores (b, V)."""
    sp = [s.req.sampling for s in seqs]
    params = SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], scores.device,
                                   [p.logit_bias for p in sp], scores.shape[-1])
    tokens = sample(scores, params, [s.generator for s in seqs])
    # the tokens and their logprobs reach the host in one copy: the stop checks need them, nothing else waits
    host = torch.stack([tokens.double(), token_logprobs(scores, tokens).double()]).tolist()
    n_top = max((p.logprobs or 0) for p in sp)
    if not n_top:
        return [int(t) for t in host[0]], host[1], None, None
    top_ids, top_lp = top_logprobs(scores, n_top)
    return [int(t) for t in host[0]], host[1], top_ids.tolist(), top_lp.tolist()


def sample_rows(seqs: list, scores: torch.Tensor, diags: list | None, tokenizer, events: list) -> list[str]:
    """Sample and emit every row of a group; returns the ids of the sequences that finished (or failed)."""
    bad = invalid_rows(scores).tolist()
    finished = []
    for s, b in zip(seqs, bad):
        if b:
            events.append(failed(s.req, "fused scores are not a distribution (NaN, +inf or no finite score)",
                                 s.stopper.generated))
            finished.append(s.req.rid)
    keep = [i for i, b in enumerate(bad) if not b]
    if not keep:
        return finished
    if len(keep) < len(seqs):
        seqs, scores, diags = [seqs[i] for i in keep], scores[keep], diags and [diags[i] for i in keep]
    try:
        token_ids, chosen, ids, lps = draw(seqs, scores)
    except Exception as err:
        if len(seqs) == 1:
            events.append(failed(seqs[0].req, err, seqs[0].stopper.generated))
            return finished + [seqs[0].req.rid]
        for i, s in enumerate(seqs):  # one row's fault must not end the others: each row alone
            finished += sample_rows([s], scores[i:i + 1], diags and [diags[i]], tokenizer, events)
        return finished
    for i, (s, t) in enumerate(zip(seqs, token_ids)):
        try:
            ev = s.emit(t, chosen[i], ids and ids[i], lps and lps[i], tokenizer, diags[i] if diags else None)
        except Exception as err:
            ev = failed(s.req, err, s.stopper.generated)
        events.append(ev)
        if ev.finish_reason:
            finished.append(s.req.rid)
    return finished
