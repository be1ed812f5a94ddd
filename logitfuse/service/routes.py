"""The thin router: parse, hand to Serving, shape the response. Keys, body limits, request ids and the
access log are checked and written in front of it (middleware.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from logitfuse.engine.request import GenerationRequest
from logitfuse.service.error_handlers import APIError
from logitfuse.service.formats import ChatChoice, CompletionChoice
from logitfuse.service.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from logitfuse.service.serving import Serving, diagnostics, json_safe, usage

router = APIRouter()
log = logging.getLogger("logitfuse.service")


def serving(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", **serving(request).lf.health()}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return serving(request).models()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    """One model or ensemble (the SDK's models.retrieve); 404 for a name the registry does not know."""
    return serving(request).model(model_id)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """The token ids generation would give the base of `model` (the vocabulary of logit_bias, token-id
    prompts and stop_token_ids), with the chat template applied as it would be for `messages`."""
    sv = serving(request)
    prompt, messages = body.source()
    async with sv.models_ready(body.model, None):
        req = (await asyncio.to_thread(sv.lf.requests, body.model, prompt, None, None, messages))[0]
        ids = req.prompt_ids
        return {"count": len(ids), "max_model_len": sv.lf.model(req.plan.base).max_context, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    sv = serving(request)
    base = sv.lf.plan(body.model).base
    async with sv.models_ready(base, None):  # the base alone: the text is its tokenizer's
        backend = sv.lf.model(base)
    width = len(backend.tokenizer)
    if any(not 0 <= t < width for t in body.tokens):
        bad = next(t for t in body.tokens if not 0 <= t < width)
        raise APIError(400, f"tokens must be ids in [0, {width}), got {bad}", "tokens")
    return {"prompt": backend.tokenizer.decode(body.tokens)}


def count(request: Request, model: str, choices: list) -> None:
    m = request.app.state.metrics
    u = usage(choices)
    m.tokens.labels(model).inc(u["completion_tokens"])
    m.prompt_tokens.labels(model).inc(u["prompt_tokens"])
    request.state.usage = (u["prompt_tokens"], u["completion_tokens"])  # for the access log line


def note(request: Request, body) -> None:
    """What the access log line says about this request (escaped there)."""
    request.state.model, request.state.user = body.model, body.user


def _first_of_prompt(reqs: list[GenerationRequest], n: int) -> list[bool]:
    return [i % n == 0 for i in range(len(reqs))]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    sv = serving(request)
    note(request, body)
    sp = body.to_sampling_params(sv.server.max_logprobs)
    prompts = body.prompts()
    async with sv.models_ready(body.model, body.fusion):
        reqs = await asyncio.to_thread(sv.build, body.model, prompts, sp, body.fusion, body.n, False)
        tok = sv.lf.model(reqs[0].plan.base).tokenizer
        firsts = _first_of_prompt(reqs, body.n)

        def make(i: int, r: GenerationRequest) -> CompletionChoice:
            echo = tok.decode(r.prompt_ids) if body.echo else None
            return CompletionChoice(i, tok, firsts[i], echo, body.logprobs is not None, sp.prompt_logprobs,
                                    body.return_tokens_as_token_ids, r.plan.influence)

        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        return await respond(sv, request, body, reqs, make, head, "text_completion", "text_completion")


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    sv = serving(request)
    note(request, body)
    sp = body.to_sampling_params(sv.server.max_logprobs)
    async with sv.models_ready(body.model, body.fusion):
        reqs = await asyncio.to_thread(sv.build, body.model, [None], sp, body.fusion, body.n, True,
                                       body.message_dicts())
        tok = sv.lf.model(reqs[0].plan.base).tokenizer
        firsts = _first_of_prompt(reqs, body.n)

        def make(i: int, r: GenerationRequest) -> ChatChoice:
            return ChatChoice(i, tok, firsts[i], body.logprobs, body.return_tokens_as_token_ids, r.plan.influence)

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        return await respond(sv, request, body, reqs, make, head, "chat.completion.chunk", "chat.completion")


async def respond(sv: Serving, request: Request, body, reqs: list[GenerationRequest], make, head: dict,
                  chunk_object: str, final_object: str):
    """Submit the engine requests; answer with an SSE stream or one JSON body (both API shapes)."""
    job = await sv.submit(reqs, streaming=body.stream)
    headers = body.ignored_header()
    if body.stream:
        include = body.stream_options is not None and body.stream_options.include_usage
        chunk = {**head, "object": chunk_object}
        return StreamingResponse(sv.stream(
            job, request, make, lambda c, d: {**chunk, "choices": [d]},
            (lambda cs: {**chunk, "choices": [], "usage": usage(cs)}) if include else None,
            lambda cs: count(request, body.model, cs)), media_type="text/event-stream", headers=headers)
    choices = await sv.collect(job, request, make)
    count(request, body.model, choices)
    out = {**head, "object": final_object, "choices": [c.final() for c in choices], "usage": usage(choices)}
    if (d := diagnostics(choices, reqs[0].plan)) is not None:
        out["fusion_diagnostics"] = d
    return JSONResponse(json_safe(out), headers=headers)
