"""FusionLogitsProcessor: a vLLM V1 logits processor that fuses the experts of a logitfuse ensemble into the
base model vLLM runs.

    LOGITFUSE_CONFIG=configs/default.yaml python -m vllm.entrypoints.openai.api_server --model models/base-large \
        --logits-processors logitfuse.vllm:FusionLogitsProcessor --logprobs-mode processed_logprobs

vLLM builds one instance per sampling worker. `update_state` follows the persistent batch (rows added,
removed, moved or swapped); `apply` hands the batch's logits to the fusion core (core.py), which brings each
fused row's experts up to date with the tokens vLLM has fed the base and replaces that row's logits by the
fused scores. Rows without `ensemble` are left untouched. A thin adapter: the handles are batch indexes.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from logitfuse.vllm.core import FusionCore

log = init_logger(__name__)


class FusionLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs in vLLM's front end as each request arrives: a bad ensemble or override is a 400 there."""
        FusionCore.validate(sampling_params.extra_args, sampling_params.prompt_logprobs)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        model = vllm_config.model_config
        self.core = FusionCore(AutoTokenizer.from_pretrained(model.tokenizer), model.get_vocab_size(), device, log)

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the batch: removed, then added, then moved (vLLM's order). Token ids are read in apply."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.core.drop(index)
        for index, params, prompt, outputs in batch_update.added:
            self.core.add(index, params.extra_args, prompt, outputs, seed=params.seed)
        for a, b, how in batch_update.moved:
            self.core.move(a, b, how == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.core.handles:
            return logits
        batch = logits.shape[0]
        return self.core.apply(logits, [(i, i) for i in sorted(self.core.handles) if i < batch])
