"""The real server (uvicorn on a loopback port) driven by the official openai SDK."""

import openai
import pytest

from logitfuse.service.app import start_in_thread


@pytest.fixture(scope="module")
def base_url(config_file):
    url, server = start_in_thread(config_file)
    yield f"{url}/v1"
    server.should_exit = True


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused")


def test_completions_streaming_and_fusion_override(client):
    out = client.completions.create(model="proxy-a", prompt="the red city", max_tokens=5, temperature=0, logprobs=2)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    assert len(out.choices[0].logprobs.token_logprobs) == out.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="proxy-a", prompt="the red city", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].text
    other = client.completions.create(model="proxy-a", prompt="the red city", max_tokens=5, temperature=0,
                                      extra_body={"fusion": {"method": "dlf", "experts": ["a", "b"]}})
    assert other.model_extra["fusion_diagnostics"]["method"] == "dlf"


def test_chat_and_chat_streaming(client):
    msgs = [{"role": "user", "content": "king queen"}]
    out = client.chat.completions.create(model="eft-ab", messages=msgs, max_tokens=5, temperature=0)
    assert out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="eft-ab", messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sdk_sees_errors_as_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="available"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="proxy-a", prompt="x", temperature=-2)
    assert next(m.id for m in client.models.list()) == "proxy-a"
