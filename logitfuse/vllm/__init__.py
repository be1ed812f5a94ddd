"""logitfuse inside vLLM: `logitfuse.vllm:FusionLogitsProcessor`, a vLLM V1 logits processor that fuses a
registry ensemble's experts into the base model vLLM serves (docs/vllm.md).

The class is imported on first use, so the parts that need no vLLM (requests.py, rows.py) load without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FusionLogitsProcessor"]


def __getattr__(name: str) -> Any:
    if name == "FusionLogitsProcessor":
        from logitfuse.vllm.processor import FusionLogitsProcessor

        return FusionLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
