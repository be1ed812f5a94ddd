"""OpenAI's and vLLM's default for max_tokens: a request without it may generate up to the rest of the
context window (the smallest among the ensemble's models), not 16 tokens; server.max_tokens_default caps it."""

import openai
import pytest

from logitfuse.service.app import start_in_thread
from logitfuse.training.tiny import TINY_CONFIG

WINDOW = 256  # max_position_embeddings of the tiny family


def serve(path):
    url, server = start_in_thread(path)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused"), server


@pytest.fixture(scope="module")
def sdk(config_file):
    client, server = serve(config_file)
    yield client
    server.should_exit = True


def test_chat_without_max_tokens_runs_to_the_window(sdk):
    out = sdk.chat.completions.create(model="proxy-a", messages=[{"role": "user", "content": "the red city"}],
                                      temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == WINDOW - out.usage.prompt_tokens > 16


def test_completion_without_max_tokens_runs_to_the_window(sdk):
    out = sdk.completions.create(model="eft-ab", prompt="king queen river", temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == WINDOW - out.usage.prompt_tokens


def test_a_server_cap_bounds_the_default_and_an_explicit_value_wins(family, tmp_path):
    text = TINY_CONFIG.format(**{k: str(v) for k, v in family.items()})
    path = tmp_path / "capped.yaml"
    path.write_text(text.replace("server: {memory_budget_mb: 512,", "server: {max_tokens_default: 20, "
                                                                     "memory_budget_mb: 512,"))
    client, server = serve(path)
    try:
        msgs = [{"role": "user", "content": "one two"}]
        capped = client.chat.completions.create(model="proxy-a", messages=msgs, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert capped.usage.completion_tokens == 20 and capped.choices[0].finish_reason == "length"
        asked = client.chat.completions.create(model="proxy-a", messages=msgs, temperature=0, max_tokens=30,
                                               extra_body={"ignore_eos": True})
        assert asked.usage.completion_tokens == 30
    finally:
        server.should_exit = True
