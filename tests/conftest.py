import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from logitfuse.training.tiny import TINY_CONFIG, build_family


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"))



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

    from logitfuse.service.app import create_app

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
