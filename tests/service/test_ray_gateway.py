"""The Ray Serve gateway's own app (no cluster needed): the guard of `logitfuse serve` in front, routing by
model, and the replica's answer passed back with every header."""

import json

import pytest

pytest.importorskip("ray")

from fastapi.testclient import TestClient

from logitfuse.service.middleware import Limits
from logitfuse.service.ray_serve import gateway_app

KEY = "sk-gw"
LIMITS = Limits((KEY,), ("/health",), 2048, 5.0)


def client(calls: list):
    async def forward(group, method, path, query, headers, body):
        calls.append((group, method, path, dict(headers), body))
        yield {"status": 201, "headers": [("content-type", "application/json"), ("set-cookie", "a=1"),
                                          ("set-cookie", "b=2"), ("x-request-id", "replica-own")]}
        yield b'{"ok": '
        yield b"true}"

    return TestClient(gateway_app({"proxy-a": "fused", "base-large": "plain"}, forward, LIMITS))


def test_a_missing_key_is_a_401_and_an_oversized_body_a_413_before_anything_is_forwarded():
    calls: list = []
    c = client(calls)
    r = c.post("/v1/completions", json={"model": "proxy-a", "prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    big = json.dumps({"model": "proxy-a", "prompt": "x" * 5000})
    r = c.post("/v1/completions", content=big, headers={"authorization": f"Bearer {KEY}",
                                                         "content-type": "application/json"})
    assert r.status_code == 413 and "server.max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no content-length: the guard counts the bytes as they arrive
        yield big[:1000].encode()
        yield big[1000:].encode()

    r = c.post("/v1/completions", content=chunks(), headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    assert calls == []


def test_requests_reach_their_group_with_one_request_id_and_every_header_comes_back():
    calls: list = []
    c = client(calls)
    auth = {"authorization": f"Bearer {KEY}", "x-request-id": "client-7"}
    r = c.post("/v1/completions", json={"model": "base-large", "prompt": "x"}, headers=auth)
    assert r.status_code == 201 and r.json() == {"ok": True}
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers.get_list("x-request-id") == ["client-7"]
    group, method, path, headers, body = calls[0]
    assert (group, method, path, json.loads(body)["model"]) == ("plain", "POST", "/v1/completions", "base-large")
    assert headers[b"x-request-id"] == b"client-7"
    c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert calls[1][:3] == (None, "GET", "/v1/models")  # no model: the first group answers
