"""logitfuse inside vLLM: `logitfuse.vllm:FusionLogitsProcessor`, a vLLM V1 logits processor that fuses a
registry ensemble's experts into the base model vLLM serves, and `FusionLogitsProcessorV2`, the same for vLLM's
Model Runner V2 (docs/vllm.md).

The class is imported on first use, so the parts that need no vLLM (requests.py, rows.py) load without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FusionLogitsProcessor", "FusionLogitsProcessorV2"]


def __getattr__(name: str) -> Any:
    if name == "FusionLogitsProcessor":
        from logitfuse.vllm.processor import FusionLogitsProcessor

        return FusionLogitsProcessor
    if name == "FusionLogitsProcessorV2":
        from logitfuse.vllm.runner_v2 import FusionLogitsProcessorV2

        return FusionLogitsProcessorV2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
