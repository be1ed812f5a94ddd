import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.tiny import build_family


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"))


TINY_CONFIG = """
models:
  base-large: {{path: {base-large}, dtype: float32, chat_template: true}}
  base-small: {{path: {base-small}, dtype: float32, chat_template: true}}
  tuned-a: {{path: {tuned-a}, dtype: float32, chat_template: true}}
  tuned-b: {{path: {tuned-b}, dtype: float32, chat_template: true}}
  padded: {{path: {padded}, dtype: float32}}
  foreign: {{path: {foreign}, dtype: float32}}
  foreign-small: {{path: {foreign-small}, dtype: float32}}
rewards:
  rm: {{path: {reward}, dtype: float32}}
experts:
  a: {{tuned: tuned-a, untuned: base-small}}
  b: {{tuned: tuned-b, untuned: base-small}}
  pad: {{tuned: padded, untuned: base-small}}
  alien: {{tuned: foreign, untuned: base-small}}
  xa: {{tuned: foreign, untuned: foreign-small, cross_tokenizer: true}}
ensembles:
  proxy-a: {{base: base-large, method: proxy, experts: [a], alpha: 1.0}}
  eft-ab: {{base: base-large, method: eft, experts: [a, b], weights: [0.5, 0.5], beta: 1.0}}
  dlf-ab: {{base: base-large, method: dlf, experts: [a, b]}}
  tq: {{base: base-large, method: tqstar, baseline: tuned-a, reward: rm, top_k: 4, rollout_tokens: 3}}
server: {{memory_budget_mb: 512, max_batch: 16}}
"""


@pytest.fixture(scope="session")
def config_file(family, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(**{k: str(v) for k, v in family.items()}))
    return path


@pytest.fixture(scope="session")
def lf(config_file):
    from logitfuse import LogitFuse

    return LogitFuse(config_file)


@pytest.fixture(scope="module")
def client(config_file):
    """The real app in-process on the tiny family (lifespan and engine thread), one per test module."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(config_file)) as c:
        yield c


@pytest.fixture(scope="module")
def ref(config_file):
    """A library instance on the same registry, to compare the server's answers with."""
    from logitfuse import LogitFuse

    return LogitFuse(config_file)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every Ray test of the session; skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
