"""The OpenAI app on Ray Serve (a local cluster): the openai SDK gets the same greedy answers, streams, errors
and key checks as from `logitfuse serve`, and each request reaches the replicas that hold its model."""

import socket

import httpx
import pytest

pytest.importorskip("ray")
pytest.importorskip("openai")

import openai
from ray import serve

from logitfuse.service.app import start_in_thread
from logitfuse.service.ray_serve import build

KEY = "sk-ray"
RAY_SECTION = """
ray:
  num_cpus: 0
  deployments:
    fused: {models: [proxy-a, eft-ab]}
    plain: {models: [base-large], replicas: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grouped_config(config_file, tmp_path_factory):
    text = config_file.read_text().replace("server: {memory_budget_mb: 512, max_batch: 16}",
                                           f"server: {{memory_budget_mb: 512, max_batch: 16, api_keys: [{KEY}]}}")
    path = tmp_path_factory.mktemp("ray-serve") / "grouped.yaml"
    path.write_text(text + RAY_SECTION)
    return path


@pytest.fixture(scope="module")
def urls(ray_cluster, grouped_config):
    """(Ray Serve URL, `logitfuse serve` URL) on the same registry."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(str(grouped_config)), name="logitfuse", route_prefix="/")
    ref_url, server = start_in_thread(grouped_config)
    yield f"http://127.0.0.1:{port}", ref_url
    server.should_exit = True
    serve.shutdown()


def clients(urls):
    return [openai.OpenAI(base_url=f"{u}/v1", api_key=KEY, max_retries=0) for u in urls]


def test_completions_chat_and_streams_match_logitfuse_serve(urls):
    answers = []
    for c in clients(urls):
        comp = c.completions.create(model="proxy-a", prompt="the red city", max_tokens=6, temperature=0, logprobs=1)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="proxy-a", prompt="the red city", max_tokens=6, temperature=0, stream=True) if ch.choices)
        msgs = [{"role": "user", "content": "king queen"}]
        chat = c.chat.completions.create(model="eft-ab", messages=msgs, max_tokens=6, temperature=0)
        chunks = list(c.chat.completions.create(model="eft-ab", messages=msgs, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        plain = c.completions.create(model="base-large", prompt="the red city", max_tokens=6, temperature=0)
        assert streamed == comp.choices[0].text
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            chat.choices[0].message.content
        answers.append((comp.choices[0].text, comp.choices[0].logprobs.token_logprobs,
                        chat.choices[0].message.content, chunks[-1].usage.completion_tokens, plain.choices[0].text))
    ray_answer, local_answer = answers
    assert ray_answer[0] == local_answer[0] and ray_answer[2:] == local_answer[2:]
    assert ray_answer[1] == pytest.approx(local_answer[1], abs=1e-5)
    assert len(ray_answer[0]) > 0


def test_each_group_holds_only_its_models(urls):
    fused = serve.get_deployment_handle("logitfuse-fused", app_name="logitfuse").loaded.remote().result()
    plain = serve.get_deployment_handle("logitfuse-plain", app_name="logitfuse").loaded.remote().result()
    assert set(fused) == {"base-large", "base-small", "tuned-a", "tuned-b"}
    assert plain == ["base-large"]


def test_errors_and_keys_are_the_same_envelopes(urls):
    bodies = [{"model": "proxy-a", "prompt": "x", "temperature": -2}, {"model": "nope", "prompt": "x"},
              {"model": "proxy-a"}]
    for body in bodies:
        got = [httpx.post(f"{u}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
               for u in urls]
        assert got[0].status_code == got[1].status_code and got[0].status_code in (400, 404, 422)
        assert got[0].json() == got[1].json() and got[0].json()["error"]["message"]
    assert httpx.post(f"{urls[0]}/v1/completions", content=b"{bad", timeout=60).status_code == 401
    bad = [httpx.post(f"{u}/v1/completions", content=b"{bad", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) for u in urls]
    assert bad[0].status_code == bad[1].status_code == 400 and bad[0].json() == bad[1].json()
    wrong = httpx.post(f"{urls[0]}/v1/chat/completions", json={"model": "eft-ab", "messages": []},
                       headers={"Authorization": "Bearer other"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"]
    with pytest.raises(openai.NotFoundError, match="available"):
        clients(urls)[0].completions.create(model="nope", prompt="x")
    assert {m.id for m in clients(urls)[0].models.list()} >= {"proxy-a", "eft-ab", "base-large"}


def test_replica_resources_and_counts_come_from_the_config(config_file, tmp_path):
    from logitfuse.config.registry import Registry
    from logitfuse.service.ray_serve import _options

    path = tmp_path / "r.yaml"
    path.write_text(config_file.read_text() + """
ray:
  num_gpus: 0.5
  autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
  deployments:
    big: {models: [proxy-a], num_gpus: 1, autoscaling: null}
    rest: {models: [eft-ab], replicas: 3}
""")
    ray = Registry.load(path).ray
    assert _options(ray, ray.deployments["big"], None) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0},
                                                           "autoscaling_config": {
                                                               "min_replicas": 1, "max_replicas": 4,
                                                               "target_ongoing_requests": 8.0}}
    rest = _options(ray, ray.deployments["rest"], None)
    assert rest["ray_actor_options"]["num_gpus"] == 0.5 and rest["autoscaling_config"]["max_replicas"] == 4
    plain = Registry.load(config_file).ray
    assert _options(plain, None, 5) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0}, "num_replicas": 5}
    path.write_text(config_file.read_text() + "ray: {deployments: {x: {models: [nope]}}}\n")
    with pytest.raises(ValueError, match=r"ray.deployments.x.models: unknown name 'nope'; available: proxy-a"):
        build(str(path))
