"""The checks a remote base passes at load: the server tokenizes like the local tokenizer, and what it can do
(capabilities), each found by asking it once, never by its name or version.

- tokenizer: a probe text through the server's /tokenize (vLLM, logitfuse, llama-server, llama-cpp-python
  dialects) compared id for id with the local tokenizer; without such an endpoint, the echo of the text;
- token-id prompts: a prompt sent as ids; a server that refuses them gets the text, which the backend checks
  re-tokenizes to the same ids before every call (backends/remote.py);
- token ids in logprobs: the answer's keys are ids (llama-server's chat form, vLLM's token_id:N) or texts;
- exact echo: echo's distributions at the last two prompt positions equal two one-position answers
  (llama-server refuses echo; speculative blocks need it);
- EOS: an answer pushed to EOS by logit_bias that carries no logprobs (llama-cpp-python's), read again by
  echo where echo is exact;
- scoring a chosen token (fusion over the union of supports): an answer restricted by `allowed_token_ids` to a
  token ranked below the first, whose logprob must be the one the top-N list gives it (raw, not renormalised
  over the allowed tokens: vLLM's default, logitfuse's); else the echo of the sequence extended by the token,
  whose last prompt logprob must be that value; else none (an estimate is used);
- several prompts per call: a list of two token-id prompts answered with one choice each, as one-prompt calls.
A refusal seen here is never retried: retrying cannot turn it into an answer.
"""

from __future__ import annotations

from dataclasses import replace

from logitfuse.backends.remote.wire import (
    Capabilities,
    first_difference,
    generated,
    positions,
    prompt_logprob,
    tokenize_ids,
    tokenize_requests,
)
from logitfuse.errors import RemoteError

TOKENIZER_PROBE = "The quick brown fox, 12 + 30 = 42; naïve café!"
PROMPT_PROBE = "the red city of the north is the"  # plain words: its text re-tokenizes to its ids
NEUTRAL = {"temperature": 0, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
# llama.cpp's samplers default to min_p 0.05 and top_k 40, and llama-cpp-python to repeat_penalty 1.1: they
# change which token a greedy answer generates (its logprobs are the model's own either way)
LLAMA_NEUTRAL = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "mirostat": 0}
ECHO_TOLERANCE = 0.05  # llama.cpp's logprobs move by ~0.005 with its cache and batch history


def probe(lm) -> Capabilities:
    """Set and return lm.caps, or raise RemoteError naming what the server cannot do."""

    dialect = check_tokenizer(lm)
    lm.caps = Capabilities(dialect=dialect, neutral=NEUTRAL | (LLAMA_NEUTRAL if dialect != "openai" else {}))
    ids = lm.encode(PROMPT_PROBE)
    try:
        first = lm.ask(ids, retry=False)
    except RemoteError as err:
        if err.status is None:
            raise
        lm.caps = replace(lm.caps, token_prompts=False)
        try:
            first = lm.ask(ids, retry=False)
        except RemoteError as again:
            raise RemoteError(f"model {lm.name!r}: {lm.url} refuses token-id prompts ({err}) and text prompts "
                              f"({again})", again.status) from None
    tops = positions(first["choices"][0].get("logprobs"))
    if not tops or tops[-1] is None:
        raise RemoteError(f"model {lm.name!r}: {lm.url} returned no top_logprobs for a probe prompt: it cannot "
                          f"serve as a base (logprobs: {lm.top_n} is needed)")
    lm.caps = replace(lm.caps, ids_exact=all(isinstance(k, int) for k, _ in tops[-1]))
    lm.caps = replace(lm.caps, exact_echo=_echo_is_exact(lm, ids, tops[-1]), eos_empty=_eos_is_empty(lm, ids))
    lm.caps = replace(lm.caps, scoring=_scoring(lm, ids, tops[-1]), multi_prompt=_multi_prompt(lm, ids, tops[-1]))
    return lm.caps


def check_tokenizer(lm) -> str:
    """Raise RemoteError unless the server tokenizes a probe text as the local tokenizer does; return the
    dialect of the /tokenize endpoint that answered ("openai" where none did)."""

    local = lm.encode(TOKENIZER_PROBE)
    for dialect, path, body in tokenize_requests(lm.model, TOKENIZER_PROBE):
        answer = lm.get_json(path, body)
        remote = tokenize_ids(answer) if answer is not None else None
        if not remote:  # another dialect's body (llama-server answers one without "content" with no tokens)
            continue
        if remote != local:
            raise RemoteError(f"model {lm.name!r}: the local tokenizer does not match {lm.url}'s {lm.model!r} "
                              f"({dialect} /tokenize) on a probe text: {first_difference(local, remote)}")
        return dialect
    remote = _echoed_ids(lm, len(local))
    if remote != local:
        raise RemoteError(f"model {lm.name!r}: the local tokenizer does not match {lm.url}'s {lm.model!r} "
                          f"(echo of a probe text; the server has no /tokenize): {first_difference(local, remote)}")
    return "openai"


def _echoed_ids(lm, n_local: int) -> list[int]:
    """The probe text's ids as an echo shows them (the generated token, where the server lists it, dropped)."""
    body = {"model": lm.model, "prompt": TOKENIZER_PROBE, "max_tokens": 1, "echo": True, "logprobs": 0,
            "temperature": 0, "return_tokens_as_token_ids": True}
    tokens, _ = generated(lm.post(body, retry=False)["choices"][0])
    ids = [lm.token_id(t) for t in tokens]
    return ids[:n_local] if len(ids) == n_local + 1 else ids


def _echo_is_exact(lm, ids: list[int], last: list) -> bool:
    """Echo's last two prompt positions against one-position answers for the same prefixes."""

    try:
        echo = positions(lm.ask(ids, echo=True, retry=False)["choices"][0].get("logprobs"))
        before = positions(lm.ask(ids[:-1], retry=False)["choices"][0].get("logprobs"))
    except RemoteError as err:
        if err.status is None:
            raise
        return False  # refused (llama-server: "Only no echo is supported")
    if len(echo) < 2 or not before or any(t is None for t in (echo[-2], echo[-1], before[-1])):
        return False
    return _same(echo[-2], before[-1], lm.top_n) and _same(echo[-1], last, lm.top_n)


def _scoring(lm, ids: list[int], top: list) -> str:
    """How the server scores a token of our choosing after `ids`: "allowed", "echo" or ""."""
    known = [(lm.token_id(k), v) for k, v in top[: lm.top_n]]
    known = [(t, v) for t, v in known if t is not None and v > -1e30]
    if len(known) < 2:
        return ""  # nothing below the first to check an answer against
    token, want = known[-1]
    try:
        choice = lm.ask(ids, retry=False, allowed_token_ids=[token], logprobs=1)["choices"][0]
        got, _ = generated(choice)
        value = prompt_logprob(choice, 0)
        if got and lm.token_id(got[0]) == token and value is not None and abs(value - want) <= ECHO_TOLERANCE:
            return "allowed"
    except RemoteError as err:
        if err.status is None:
            raise
    if not lm.caps.exact_echo:
        return ""
    try:
        choice = lm.ask(ids + [token], echo=True, retry=False)["choices"][0]
    except RemoteError as err:
        if err.status is None:
            raise
        return ""
    value = prompt_logprob(choice, len(ids))
    return "echo" if value is not None and abs(value - want) <= ECHO_TOLERANCE else ""


def _multi_prompt(lm, ids: list[int], top: list) -> bool:
    """Whether a list of token-id prompts gets one choice per prompt, each as its one-prompt call answers."""
    if not lm.caps.token_prompts:
        return False
    try:
        choices = lm.ask_many([ids, ids], retry=False)
    except RemoteError as err:
        if err.status is None:
            raise
        return False
    if len(choices) != 2:
        return False
    tops = [positions(c.get("logprobs")) for c in choices]
    return all(t and t[-1] is not None and _same(t[-1], top, lm.top_n) for t in tops)


def _same(a: list, b: list, n: int) -> bool:
    a, b = dict(a[:n]), dict(b[:n])
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= ECHO_TOLERANCE for k in a)


def _eos_is_empty(lm, ids: list[int]) -> bool:
    """Whether an answer whose greedy token is EOS (pushed there by logit_bias) comes without logprobs."""

    eos = lm.tokenizer.eos_token_id
    if eos is None:
        return False
    try:
        choice = lm.ask(ids, retry=False, logit_bias={str(eos): 100})["choices"][0]
    except RemoteError as err:
        if err.status is None:
            raise
        return False  # no logit_bias: unknown here; an empty answer is still handled when it comes
    return not positions(choice.get("logprobs")) and choice.get("finish_reason") == "stop"
