"""`logitfuse generate --server URL`: the same job against a running OpenAI-compatible server.

Bounded concurrency; retries with backoff on 429/503 and connection errors (honouring Retry-After); a
4xx other than 429 is final and becomes the line's error record; a request that still fails after its
retries is not written, so the next run retries it.
"""

from __future__ import annotations

import asyncio
import random

import httpx
from tqdm import tqdm

from logitfuse.batch_io import Record, Writer

RETRY_STATUS = {429, 500, 502, 503, 504}


def request_body(args, rec: Record, params: dict) -> tuple[str, dict]:
    body: dict = {"model": args.model, **params}
    fusion = (args.fusion or {}) | (rec.fusion or {})
    if fusion:
        body["fusion"] = fusion
    if rec.messages is not None:
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body.pop("logprobs"), True
        return "/chat/completions", body | {"messages": rec.messages}
    return "/completions", body | {"prompt": rec.prompt}


def to_record(args, rec: Record, data: dict, params: dict) -> dict:
    parts = []
    for c in data["choices"]:
        text = c["message"]["content"] if "message" in c else c["text"]
        part = {"text": text, "finish_reason": c["finish_reason"]}
        if "logprobs" in params:
            part["logprobs"] = c.get("logprobs")
        parts.append(part)
    out = {"id": rec.id, "model": args.model}
    out |= parts[0] if len(parts) == 1 else {"choices": parts}
    usage = data.get("usage") or {}
    out["prompt_tokens"], out["completion_tokens"] = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if data.get("fusion_diagnostics"):
        out["fusion_diagnostics"] = data["fusion_diagnostics"]
    return out


async def _send(client: httpx.AsyncClient, path: str, body: dict, retries: int) -> httpx.Response | None:
    for attempt in range(retries + 1):
        try:
            r = await client.post(path, json=body)
            if r.status_code not in RETRY_STATUS:
                return r
            wait = float(r.headers.get("retry-after", 0) or 0)
        except httpx.TransportError:
            wait = 0.0
        if attempt < retries:
            await asyncio.sleep(max(wait, min(8.0, 0.25 * 2**attempt)) + random.random() * 0.1)
    return None


async def _run(args, todo: list[Record], writer: Writer, stats, transport: httpx.AsyncBaseTransport | None):
    from logitfuse.batch import line_params

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=len(todo), desc="generate", unit="rec")
    async with httpx.AsyncClient(base_url=args.server.rstrip("/") + ("" if args.server.rstrip("/").endswith("/v1")
                                 else "/v1"), timeout=args.timeout, headers=headers, transport=transport) as client:

        async def one(rec: Record) -> None:
            params = line_params(args, rec)
            path, body = request_body(args, rec, params)
            async with sem:
                r = await _send(client, path, body, args.retries)
            if r is None:
                stats.failed += 1
            elif r.status_code == 200:
                out = to_record(args, rec, r.json(), params)
                stats.tokens += out["completion_tokens"] or 0
                writer.write(out)
                stats.written += 1
            else:
                err = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
                writer.write({"id": rec.id, "error": {"message": err.get("message", r.text), "param": err.get("param"),
                                                      "status": r.status_code}})
                stats.errors += 1
                stats.written += 1
            bar.update(1)

        await asyncio.gather(*(one(rec) for rec in todo))
    bar.close()


def run_remote(args, todo: list[Record], writer: Writer, stats, transport: httpx.AsyncBaseTransport | None = None
               ) -> None:
    asyncio.run(_run(args, todo, writer, stats, transport))
