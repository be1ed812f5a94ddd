"""logitfuse: decoding-time adaptation of a large model by small expert pairs.

The public names load on first use, so that the command line's `--help` and `--version` import no torch.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from logitfuse.api import LogitFuse
    from logitfuse.config.registry import Registry
    from logitfuse.engine.output import CompletionOutput
    from logitfuse.engine.request import GenerationRequest, SamplingParams
    from logitfuse.methods.params import FusionParams

_HOMES = {"CompletionOutput": "logitfuse.engine.output", "FusionParams": "logitfuse.methods.params",
          "GenerationRequest": "logitfuse.engine.request", "LogitFuse": "logitfuse.api",
          "Registry": "logitfuse.config.registry", "SamplingParams": "logitfuse.engine.request"}
__all__ = ["CompletionOutput", "FusionParams", "GenerationRequest", "LogitFuse", "Registry", "SamplingParams"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def default_config() -> str:
    """The registry a command reads without --config: $LOGITFUSE_CONFIG, else the embedded family's."""
    return os.environ.get("LOGITFUSE_CONFIG", str(DEFAULT_CONFIG))


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'logitfuse' has no attribute {name!r}")
