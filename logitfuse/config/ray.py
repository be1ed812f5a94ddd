"""The `ray:` section of a registry: resources of `generate --ray` workers and Ray Serve replicas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingSpec(BaseModel):
    """Serve's autoscaling_config: the numeric fields checked here, any other key passed to Serve as written."""

    model_config = ConfigDict(frozen=True, extra="allow")
    min_replicas: int | None = Field(default=None, ge=0, le=10_000)
    initial_replicas: int | None = Field(default=None, ge=0, le=10_000)
    max_replicas: int | None = Field(default=None, ge=1, le=10_000)
    target_ongoing_requests: float | None = Field(default=None, gt=0, le=1_000_000)
    max_ongoing_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    upscale_delay_s: float | None = Field(default=None, ge=0, le=86400)
    downscale_delay_s: float | None = Field(default=None, ge=0, le=86400)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_replicas ({low}) exceeds max_replicas ({high})")
        return self

    def as_config(self) -> dict:
        """The dict Serve takes, without the fields left unset."""
        return self.model_dump(exclude_none=True)


class DeploymentSpec(BaseModel):
    """A group of names (ensembles or bare models) served by their own replicas; unset fields take `ray:`'s."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    models: list[str] = Field(min_length=1)
    replicas: int | None = Field(default=None, ge=1, le=10_000)
    num_cpus: float | None = Field(default=None, ge=0, le=4096)
    num_gpus: float | None = Field(default=None, ge=0, le=1024)
    autoscaling: AutoscalingSpec | None = None


class RaySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(default=1, ge=1, le=10_000)  # Serve replicas per deployment (without autoscaling)
    num_cpus: float = Field(default=1.0, ge=0, le=4096)  # per replica
    num_gpus: float = Field(default=0.0, ge=0, le=1024)  # per replica (fractions share a GPU)
    autoscaling: AutoscalingSpec | None = None  # Serve's autoscaling_config: min_replicas, max_replicas,
    # target_ongoing_requests, ...
    deployments: dict[str, DeploymentSpec] = {}  # none: one deployment serves every name
