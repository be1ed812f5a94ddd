"""In-process stand-ins for two OpenAI-compatible servers logitfuse did not write, answering with the shapes
and quirks of llama.cpp's llama-server and of llama-cpp-python[server] (as read from their sources, version
0.3.36 of llama-cpp-python and the llama.cpp it vendors), over any next-token distribution `dist(ids)`.

llama-server: any model name; token-id prompts; /tokenize at the server root ({"content"}; a body without it
gets no tokens); completions
logprobs in the chat form with ids; a zero probability written as the lowest float; echo refused with a 500
("Only no echo is supported"); the generated EOS listed like any token.
llama-cpp-python: any model name; text prompts only (a token-id prompt is a 500 carrying a validation
error); /extras/tokenize at the root ({"input"}); logprobs keyed by token text, special tokens named "" (one dict key,
the last written wins); return_tokens_as_token_ids ignored; an answer whose greedy token is EOS has empty
tokens and top_logprobs; echo lists the prompt tokens only, each position holding the distribution *after*
its token (the first None). `echo` may be overridden: "refuse", "ignore" (prompt positions left out) or
"shift" (each prompt position holds the distribution *before* its token, the generated one left out).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FakeServer:
    def __init__(self, kind: str, tokenizer, dist: Callable[[list[int]], torch.Tensor], echo: str | None = None,
                 served: str = "smollm2.gguf") -> None:
        self.kind, self.tok, self.dist, self.served = kind, tokenizer, dist, served
        self.echo = echo or ("refuse" if kind == "llama-server" else "after")
        self.bodies: list[dict] = []  # every completions body received
        special = set(tokenizer.all_special_ids)
        self.texts = ["" if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]
        routes = [Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"])]
        routes.append(Route("/tokenize", self.tokenize, methods=["POST"]) if kind == "llama-server" else
                      Route("/extras/tokenize", self.tokenize, methods=["POST"]))
        self.app = Starlette(routes=routes)

    def models(self, request: Request) -> JSONResponse:
        owner = "llamacpp" if self.kind == "llama-server" else "me"
        return JSONResponse({"object": "list", "data": [{"id": self.served, "object": "model", "owned_by": owner}]})

    async def tokenize(self, request: Request) -> JSONResponse:
        body = await request.json()
        text = body.get("content" if self.kind == "llama-server" else "input")
        if text is None:  # another dialect's body: llama-server tokenizes nothing, llama-cpp-python refuses
            return (JSONResponse({"tokens": []}) if self.kind == "llama-server" else
                    JSONResponse({"detail": [{"type": "missing", "loc": ["body", "input"]}]}, status_code=422))
        return JSONResponse({"tokens": list(self.tok(text).input_ids)})

    async def completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body["prompt"]
        if isinstance(prompt, list) and self.kind == "llama-cpp-python":
            return JSONResponse({"error": {"message": "1 validation error for CreateCompletionRequest\nprompt\n  "
                                           "Input should be a valid string", "type": "internal_server_error"}},
                                status_code=500)
        if body.get("echo") and self.echo == "refuse":
            return JSONResponse({"error": {"code": 500, "message": "Only no echo is supported",
                                           "type": "server_error"}}, status_code=500)
        ids = list(prompt) if isinstance(prompt, list) else list(self.tok(prompt).input_ids)
        lp = self.dist(ids)
        for tid, bias in (body.get("logit_bias") or {}).items():
            lp = lp.clone()
            lp[int(tid)] += bias  # the greedy pick only; logprobs stay the model's own, as in both servers
        token = int(lp.argmax())
        n = int(body.get("logprobs") or 0)
        if self.kind == "llama-server":
            return JSONResponse(self._chat_form(token, self.dist(ids), n))
        return JSONResponse(self._legacy_form(ids, token, n, bool(body.get("echo"))))

    def _entry(self, tid: int, lp: float) -> dict:
        return {"id": tid, "token": self.texts[tid], "bytes": list(self.texts[tid].encode()),
                "logprob": lp if lp > float("-inf") else -3.4028234663852886e38}

    def _chat_form(self, token: int, lp: torch.Tensor, n: int) -> dict:
        top = lp.topk(n)
        entry = self._entry(token, float(lp[token])) | {
            "top_logprobs": [self._entry(int(i), float(v)) for v, i in zip(top.values, top.indices)]}
        finish = "stop" if token == self.tok.eos_token_id else "length"
        return {"object": "text_completion", "model": self.served, "choices": [
            {"text": self.texts[token], "index": 0, "logprobs": {"content": [entry]}, "finish_reason": finish}]}

    def _top_dict(self, lp: torch.Tensor, n: int, own: int | None) -> dict:
        top = lp.topk(n)
        out = {self.texts[int(i)]: float(v) for v, i in zip(top.values, top.indices)}
        if own is not None:
            out[self.texts[own]] = float(lp[own])
        return out

    def _legacy_form(self, ids: list[int], token: int, n: int, echo: bool) -> dict:
        eos = token == self.tok.eos_token_id
        tokens, tops = ([], []) if eos else ([self.texts[token]], [self._top_dict(self.dist(ids), n, token)])
        if echo and self.echo == "after":  # position i: the distribution after ids[:i + 1]
            tokens = [self.texts[t] for t in ids]
            tops = [None] + [self._top_dict(self.dist(ids[:i + 1]), n, ids[i]) for i in range(1, len(ids))]
        elif echo and self.echo == "shift":  # position i: the distribution before its token
            tokens = [self.texts[t] for t in ids]
            tops = [None] + [self._top_dict(self.dist(ids[:i]), n, ids[i]) for i in range(1, len(ids))]
        text = "" if eos else self.texts[token]
        return {"object": "text_completion", "model": self.served, "choices": [
            {"text": text, "index": 0, "finish_reason": "stop" if eos else "length",
             "logprobs": {"tokens": tokens, "text_offset": [0] * len(tokens),
                          "token_logprobs": [None] * len(tokens), "top_logprobs": tops}}]}


def serve(app) -> tuple[str, uvicorn.Server]:
    """Run an ASGI app on a free loopback port in a daemon thread; (API root URL, server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return f"http://127.0.0.1:{port}/v1", server
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("fake server did not start")
