"""FusionLogitsProcessor: a vLLM V1 logits processor that fuses the experts of a logitfuse ensemble into the
base model vLLM runs.

    LOGITFUSE_CONFIG=configs/default.yaml python -m vllm.entrypoints.openai.api_server --model models/base-large \
        --logits-processors logitfuse.vllm:FusionLogitsProcessor --logprobs-mode processed_logprobs

vLLM builds one instance per sampling worker. `update_state` follows the persistent batch (rows added,
removed, moved or swapped); `apply` hands the batch's logits to the fusion core (core.py), which brings each
fused row's experts up to date with the tokens vLLM has fed the base and replaces that row's logits by the
fused scores. Rows without `ensemble` are left untouched. A thin adapter: the handles are batch indexes.

Overlap ($LOGITFUSE_VLLM_OVERLAP, core.py): vLLM calls `update_state` every step from
`InputBatch.refresh_metadata`, at the end of `GPUModelRunner._update_states` and before the forward, and by then
(synchronous scheduling) every row's output list holds the token sampled at the previous step. So the end of
`update_state` starts the experts' catch-up for the batch's fused rows, and `apply` joins it. A worker that never
samples (a pipeline stage before the last) gets `update_state` but no `apply`: it starts nothing until its first
`apply`.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from logitfuse.vllm.core import FusionCore, overlap_setting

log = init_logger(__name__)


class FusionLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs in vLLM's front end as each request arrives: a bad ensemble or override is a 400 there."""
        FusionCore.validate(sampling_params.extra_args, sampling_params.prompt_logprobs)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        model = vllm_config.model_config
        self.core = FusionCore(AutoTokenizer.from_pretrained(model.tokenizer), model.get_vocab_size(), device, log,
                               overlap=overlap_setting(device))
        self.batch = 0  # rows in vLLM's batch after the latest update
        self.sampling = False  # this worker has sampled (run `apply`) at least once
        if self.core.overlap:
            log.info("logitfuse: the experts' catch-up overlaps the base's forward (%s)",
                     "a side CUDA stream" if self.core.device.type == "cuda" else "a worker thread")

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the batch: removed, then added, then moved (vLLM's order); then, with overlap on, start the
        experts' catch-up of the batch's fused rows (their tokens so far), which `apply` joins."""
        self.core.join()
        if batch_update is not None:
            self.batch = batch_update.batch_size
            for index in batch_update.removed:
                self.core.drop(index)
            for index, params, prompt, outputs in batch_update.added:
                self.core.add(index, params.extra_args, prompt, outputs, seed=params.seed)
            for a, b, how in batch_update.moved:
                self.core.move(a, b, how == MoveDirectionality.SWAP)
        if self.sampling and self.core.handles:
            self.core.start(self.rows(self.batch))

    def rows(self, batch: int) -> list[int]:
        """The fused handles of a batch of `batch` rows, in the order `apply` hands them to the core."""
        return [i for i in sorted(self.core.handles) if i < batch]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.sampling = True
        if not self.core.handles:
            return logits
        return self.core.apply(logits, [(i, i) for i in self.rows(logits.shape[0])])
