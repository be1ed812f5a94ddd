"""logitfuse: decoding-time adaptation of a large model by small expert pairs."""

from logitfuse.api import Completion, LogitFuse
from logitfuse.registry import FusionParams, Registry
from logitfuse.request import GenerationRequest, SamplingParams

__all__ = ["Completion", "FusionParams", "GenerationRequest", "LogitFuse", "Registry", "SamplingParams"]
