"""Every numeric setting of the registry has a range, and a value outside it is refused at start-up by key."""

import types
import typing

import annotated_types
import pytest
from pydantic import BaseModel

from logitfuse.config.ray import AutoscalingSpec, DeploymentSpec, RaySpec
from logitfuse.config.registry import Registry
from logitfuse.config.specs import ModelSpec, RemoteSpec, RewardSpec, ServerSpec

from .test_registry import write

BASE = "models: {a: {path: a}}\n"


@pytest.mark.parametrize("section, value, key", [
    ("server", "{max_batch: 0}", "server.max_batch"),
    ("server", "{port: -1}", "server.port"),
    ("server", "{port: 70000}", "server.port"),
    ("server", "{memory_budget_mb: -5}", "server.memory_budget_mb"),
    ("server", "{max_logprobs: -1}", "server.max_logprobs"),
    ("server", "{max_queue: 0}", "server.max_queue"),
    ("server", "{max_tqstar_work: 0}", "server.max_tqstar_work"),
    ("server", "{cpu_threads: 0}", "server.cpu_threads"),
    ("server", "{kv_budget_mb: .inf}", "server.kv_budget_mb"),
    ("server", "{request_timeout: 0}", "server.request_timeout"),
    ("server", "{header_timeout: .nan}", "server.header_timeout"),
    ("server", "{load_timeout: 0}", "server.load_timeout"),
    ("server", "{load_retry_seconds: -1}", "server.load_retry_seconds"),
    ("server", "{max_body_bytes: 10}", "server.max_body_bytes"),
    ("ray", "{replicas: 0}", "ray.replicas"),
    ("ray", "{num_cpus: -1}", "ray.num_cpus"),
    ("ray", "{autoscaling: {max_replicas: 0}}", "ray.autoscaling.max_replicas"),
    ("ray", "{autoscaling: {min_replicas: 3, max_replicas: 2}}", "ray.autoscaling"),
    ("ray", "{deployments: {g: {models: [a], num_gpus: -0.5}}}", "ray.deployments.g.num_gpus"),
])
def test_an_out_of_range_setting_is_refused_naming_its_key(tmp_path, section, value, key):
    with pytest.raises(ValueError) as err:
        Registry.load(write(tmp_path, f"{BASE}{section}: {value}\n"))
    assert f"{key}: " in str(err.value)


@pytest.mark.parametrize("field, value", [("retries", -1), ("retry_max_wait", 0), ("top_logprobs", 0),
                                          ("timeout", 7200), ("max_concurrency", 0), ("max_context", 0)])
def test_a_remote_model_with_an_out_of_range_number_is_refused_naming_its_key(tmp_path, field, value):
    text = f"models: {{r: {{remote: {{url: 'http://x/v1', model: m, {field}: {value}}}, tokenizer: a}}}}\n"
    with pytest.raises(ValueError) as err:
        Registry.load(write(tmp_path, text))
    assert f"models.r.remote.{field}: " in str(err.value)


def test_settings_in_range_load(tmp_path):
    reg = Registry.load(write(tmp_path, BASE + "server: {max_batch: 1, port: 65535, memory_budget_mb: 1, "
                                       "max_logprobs: 0, load_timeout: 0.5}\n"
                                       "ray: {autoscaling: {min_replicas: 0, max_replicas: 2, extra_key: 1}}\n"))
    assert (reg.server.max_batch, reg.server.port, reg.server.load_timeout) == (1, 65535, 0.5)
    assert reg.ray.autoscaling.as_config() == {"min_replicas": 0, "max_replicas": 2, "extra_key": 1}


def _numeric(annotation) -> bool:
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_numeric(a) for a in args if a is not type(None))
    return annotation in (int, float)


SCHEMAS = [ServerSpec, RemoteSpec, ModelSpec, RewardSpec, RaySpec, DeploymentSpec, AutoscalingSpec]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_numeric_field_has_a_lower_bound(schema: type[BaseModel]):
    numeric = {n: f for n, f in schema.model_fields.items() if _numeric(f.annotation)}
    unbounded = [n for n, f in numeric.items()
                 if not any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in f.metadata)]
    assert unbounded == []
    if schema not in (ModelSpec, RewardSpec):  # these two have no plain numbers of their own
        assert len(numeric) >= 3  # the check above looked at the schema's numbers
