"""The `ray:` section of a registry: resources of `generate --ray` workers and Ray Serve replicas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DeploymentSpec(BaseModel):
    """A group of names (ensembles or bare models) served by their own replicas; unset fields take `ray:`'s."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    models: list[str] = Field(min_length=1)
    replicas: int | None = Field(default=None, ge=1)
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    autoscaling: dict | None = None


class RaySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(default=1, ge=1)  # Serve replicas per deployment (without autoscaling)
    num_cpus: float = Field(default=1.0, ge=0)  # per replica
    num_gpus: float = Field(default=0.0, ge=0)  # per replica (fractions share a GPU)
    autoscaling: dict | None = None  # Serve's autoscaling_config: min_replicas, max_replicas, target_ongoing_requests
    deployments: dict[str, DeploymentSpec] = {}  # none: one deployment serves every name
