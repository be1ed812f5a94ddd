"""The base's own log-probability of tokens of our choosing after a row's sequence: the values fusion over the
union of supports needs for its candidates outside the base's top N (ops/candidates.py).

How is found by the probe at load (remote/probe.py, `Capabilities.scoring`):
- "allowed": one answer per (row, token), restricted by `allowed_token_ids` to the token; its logprob is the
  raw one (vLLM's default logprobs mode, logitfuse's). The calls go out concurrently; vLLM's prefix cache
  serves each row's sequence.
- "echo": the sequence extended by the token, echoed with logprobs; the last prompt position's logprob. In
  calls of several prompts where the server takes them, else one per (row, token).
"""

from __future__ import annotations

from logitfuse.backends.remote.wire import PROMPTS_PER_CALL, generated, prompt_logprob
from logitfuse.errors import RemoteError


def score(lm, sequences: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """values[j][i]: log p(tokens[j][i] | sequences[j]) from the server `lm` (a RemoteCausalLM)."""
    jobs = [(ids, t) for ids, ts in zip(sequences, tokens) for t in ts]
    if lm.caps.scoring == "allowed":
        values = lm.map(lambda job: _allowed(lm, *job), jobs)
    elif lm.caps.multi_prompt:
        values = []
        for start in range(0, len(jobs), PROMPTS_PER_CALL):
            chunk = jobs[start:start + PROMPTS_PER_CALL]
            answers = lm.ask_many([ids + [t] for ids, t in chunk], echo=True)
            values += [_echoed(lm, choice, len(ids)) for (ids, _), choice in zip(chunk, answers)]
    else:
        values = lm.map(lambda job: _echoed(lm, lm.ask(job[0] + [job[1]], echo=True)["choices"][0], len(job[0])),
                        jobs)
    out, at = [], 0
    for ts in tokens:
        out.append(values[at:at + len(ts)])
        at += len(ts)
    return out


def _allowed(lm, ids: list[int], token: int) -> float:
    choice = lm.ask(ids, allowed_token_ids=[token], logprobs=1)["choices"][0]
    got, _ = generated(choice)
    value = prompt_logprob(choice, 0)
    if not got or lm.token_id(got[0]) != token or value is None:
        raise RemoteError(f"model {lm.name!r}: {lm.url} did not score token {token} as asked "
                          f"(allowed_token_ids answered {got[:1]})")
    return value


def _echoed(lm, choice: dict, position: int) -> float:
    value = prompt_logprob(choice, position)
    if value is None:
        raise RemoteError(f"model {lm.name!r}: {lm.url} gave no prompt logprob at position {position}")
    return value
