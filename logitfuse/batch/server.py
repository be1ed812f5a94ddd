"""`logitfuse generate --server URL`: the same job against a running OpenAI-compatible server.

Bounded concurrency; retries on 429/5xx and connection errors (backends/remote/retry.py: Retry-After in
seconds or as an HTTP date, capped at MAX_WAIT, jittered); a
4xx other than 429 is final and becomes the line's error record; a request that still fails after its
retries is not written, so the next run retries it. Lines are validated here exactly as a local job
validates them, and responses are read back into the local job's sequences, so both write the same
records (logprobs need a server that speaks vLLM's `return_tokens_as_token_ids`, as logitfuse does).
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
from tqdm import tqdm

from logitfuse.backends.remote.retry import RETRY_STATUS, retry_wait
from logitfuse.batch import line_params as batch_lines
from logitfuse.batch.records import BadLine, Record, Writer, line_params, result_record
from logitfuse.engine.output import CompletionOutput
from logitfuse.engine.request import TopLogprob
from logitfuse.errors import InvalidRequest

MAX_WAIT = 60.0  # seconds: the longest wait before a retry, whatever Retry-After asks
ID_PREFIX = "token_id:"


def api_root(server: str) -> str:
    root = server.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def _headers(args: argparse.Namespace) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def remote_source(args: argparse.Namespace) -> dict:
    """Check that the server answers and serves --model; what the job's model is (for its job file)."""
    url = api_root(args.server) + "/models"
    try:
        r = httpx.get(url, headers=_headers(args), timeout=args.timeout)
    except httpx.HTTPError as err:
        raise ValueError(f"cannot reach the server at {url}: {err}") from None
    if r.status_code != 200:
        raise ValueError(f"the server at {url} answered {r.status_code}: {r.text[:200]}")
    batch_lines.known_model(args.model, [m["id"] for m in r.json().get("data", [])], f" on {args.server}")
    return {"server": api_root(args.server)}


def request_body(args: argparse.Namespace, rec: Record, params: dict) -> tuple[str, dict]:
    body: dict = {"model": args.model, **params}
    fusion = (args.fusion or {}) | (rec.fusion or {})
    if fusion:
        body["fusion"] = fusion
    if "logprobs" in body:
        body["return_tokens_as_token_ids"] = True  # exact token ids back, as the local record has them
    if rec.messages is not None:
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body.pop("logprobs"), True
        return "/chat/completions", body | {"messages": rec.messages}
    return "/completions", body | {"prompt": rec.prompt}


def _token_id(name: str) -> int | None:
    return int(name[len(ID_PREFIX):]) if name.startswith(ID_PREFIX) else None


def _part(c: dict, top_n: int | None) -> CompletionOutput:
    """One response choice as the sequence a local job would have accumulated."""
    part = CompletionOutput("", text=c["message"]["content"] if "message" in c else c["text"],
                      finish_reason=c["finish_reason"], influence=c.get("influence"))
    lp = c.get("logprobs") or {}
    if "content" in lp:  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        for e in lp["content"] or []:
            part.token_ids.append(_token_id(e["token"]))
            part.logprobs.append(e["logprob"])
            part.top_logprobs.append([TopLogprob(_token_id(t["token"]), "", t["logprob"]) for t in e["top_logprobs"]])
    elif lp:  # completions: parallel lists; each top dict also holds the chosen token, last when outside the top-N
        part.token_ids += [_token_id(t) for t in lp["tokens"]]
        part.logprobs += lp["token_logprobs"]
        part.top_logprobs += [[TopLogprob(_token_id(k), "", v) for k, v in list(top.items())[:top_n or 0]]
                              for top in lp["top_logprobs"]]
    return part


def to_record(args: argparse.Namespace, rec: Record, data: dict, params: dict) -> dict:
    top_n = params.get("logprobs")
    parts = [_part(c, top_n) for c in data["choices"]]
    usage = data.get("usage") or {}
    parts[0].prompt_tokens = usage.get("prompt_tokens", 0)  # usage counts the prompt once and sums the choices
    parts[0].completion_tokens = usage.get("completion_tokens", 0)
    return result_record(rec.id, args.model, parts, "logprobs" in params, data.get("fusion_diagnostics"))


def error_record(rec: Record, r: httpx.Response) -> dict:
    err = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
    message, param = err.get("message", r.text), err.get("param")
    if param == "top_logprobs":  # a chat line's `logprobs` travels as top_logprobs: name the line's field
        message, param = message.replace("top_logprobs", "logprobs", 1), "logprobs"
    return BadLine(rec.id, message, param, r.status_code).record()


async def _send(client: httpx.AsyncClient, path: str, body: dict, retries: int,
                max_wait: float) -> httpx.Response | None:
    for attempt in range(retries + 1):
        try:
            r = await client.post(path, json=body)
            if r.status_code not in RETRY_STATUS:
                return r
            asked = r.headers.get("retry-after")
        except httpx.TransportError:
            asked = None
        if attempt < retries:
            await asyncio.sleep(retry_wait(attempt, asked, max_wait))
    return None


async def _run(args, todo: list[Record], writer: Writer, stats, transport: httpx.AsyncBaseTransport | None):
    sem = asyncio.Semaphore(args.concurrency)
    max_wait = getattr(args, "retry_max_wait", None) or MAX_WAIT
    bar = tqdm(total=len(todo), desc="generate", unit="rec")
    async with httpx.AsyncClient(base_url=api_root(args.server), timeout=args.timeout, headers=_headers(args),
                                 transport=transport) as client:

        async def one(rec: Record) -> None:
            params = line_params(batch_lines.sampling_defaults(args), rec, args.seed)
            try:
                batch_lines.sampling(params)
                batch_lines.fusion(args.fusion, rec)
            except InvalidRequest as err:
                return stats.write(writer, batch_lines.bad_line(rec.id, err).record(), bar, error=True)
            path, body = request_body(args, rec, params)
            async with sem:
                r = await _send(client, path, body, args.retries, max_wait)
            if r is None:
                stats.failed += 1
                bar.update(1)
            elif r.status_code == 200:
                out = to_record(args, rec, r.json(), params)
                stats.tokens += out["completion_tokens"] or 0
                stats.write(writer, out, bar)
            else:
                stats.write(writer, error_record(rec, r), bar, error=True)

        await asyncio.gather(*(one(rec) for rec in todo))
    bar.close()


def run_remote(args, todo: list[Record], writer: Writer, stats, transport: httpx.AsyncBaseTransport | None = None
               ) -> None:
    asyncio.run(_run(args, todo, writer, stats, transport))
