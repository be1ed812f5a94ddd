"""FusionLogitsProcessorV2: the fusion processor for vLLM's Model Runner V2 (vllm/v1/worker/gpu), a thin adapter
over the fusion core (core.py) that the V1 adapter (processor.py) shares.

    VLLM_USE_V2_MODEL_RUNNER=1 LOGITFUSE_CONFIG=configs/default.yaml vllm serve models/base-large \
        --logits-processors logitfuse.vllm:FusionLogitsProcessorV2 --logprobs-mode processed_logprobs

V2 keys requests by slot (recycled through a free list), keeps their tokens on the device in
`req_states.all_token_ids` and never says when a request leaves. `add_request` resets the slot; the first `apply`
that schedules the request reads its prompt (flushed by then) and adds it to the core with a view of its generated
tokens, which every `apply` tops up from the device (the new tokens only: a small copy per fused request, a device
sync). A fused slot absent for `park_after` steps (finished, or preempted: V2 adds a resumed request again) gives
back its experts' caches and prefills again if it returns. A request with several logits rows in a step
(speculative decoding, refused at start-up) ends with the reason logged. Tested on CPU against the interface's
dataclasses (tests/vllm/test_runner_v2.py); untested on a GPU until one is lent.

No overlap of the experts with the base's forward here (the V1 adapter's $LOGITFUSE_VLLM_OVERLAP): the hook that
runs before the forward, `apply_staged_writes`, is not told which slots the step schedules, and the tokens the
experts would read are on the device, where V2's asynchronous scheduling may not have written them yet.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from vllm.logger import init_logger
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

log = init_logger(__name__)


class Generated(Sequence):
    """A slot's generated tokens, all_token_ids[slot, prompt_len:total_len], as of the current step (the core
    reads it as the V1 adapter's growing list of outputs)."""

    def __init__(self, start: int) -> None:
        self.start = start  # the slot's prompt_len
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


class FusionLogitsProcessorV2(LogitsProcessor):
    park_after = 16  # steps a fused slot may sit out before its experts' caches are given back

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs in vLLM's front end as each request arrives: a bad ensemble or override is a 400 there."""
        from logitfuse.vllm.core import FusionCore

        FusionCore.validate(sampling_params.extra_args, sampling_params.prompt_logprobs)

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("logitfuse: fusion does not run under speculative decoding (a request would own "
                             "several logits rows per step); start vLLM without a speculative config")
        from transformers import AutoTokenizer

        from logitfuse.vllm.core import ENV_OVERLAP, FusionCore

        model = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer)
        self.core = FusionCore(tokenizer, model.get_vocab_size(), req_states.device, log, overlap=False)
        if os.environ.get(ENV_OVERLAP, "").strip() == "1":
            log.warning("logitfuse: %s=1 has no effect under Model Runner V2: its experts run in apply, after "
                        "the base's forward (docs/vllm.md)", ENV_OVERLAP)
        self.req = req_states
        self.extra: dict[int, dict] = {}  # slot -> extra_args of the fused request it holds
        self.waiting: set[int] = set()  # fused slots the core adds (again) at their next scheduled step
        self.views: dict[int, Generated] = {}
        self.seeds: dict[int, int | None] = {}  # slot -> its request's sampling seed
        self.ended: set[int] = set()  # slots whose request ends at every step until the slot is added again
        self.seen: dict[int, int] = {}  # slot -> the last step it was scheduled
        self.steps = 0

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """The slot's previous occupant leaves; the prompt is read at the request's first step."""
        from logitfuse.vllm.requests import wanted

        self.core.drop(req_idx)
        for held in (self.extra, self.views, self.seen, self.seeds):
            held.pop(req_idx, None)
        self.waiting.discard(req_idx)
        self.ended.discard(req_idx)
        if not wanted(sampling_params.extra_args):
            return False
        self.extra[req_idx] = sampling_params.extra_args
        self.seeds[req_idx] = sampling_params.seed  # Transfer Q*'s rollouts draw from seed + 1, as in the engine
        self.waiting.add(req_idx)
        return True

    def apply_staged_writes(self) -> None:
        """Nothing is staged: the prompt is read lazily, at the request's first `apply`."""

    def apply(self, logits, ctx: LogitsContext):
        self.steps += 1
        batch = ctx.idx_mapping_np.tolist()
        self.park(set(batch))
        mine = [s for s in batch if s in self.extra]
        if not mine:
            return logits
        for s in mine:
            self.seen[s] = self.steps
            if s in self.waiting:
                self.waiting.discard(s)
                prompt_len = int(self.req.prompt_len.np[s])
                self.views[s] = Generated(prompt_len)
                self.core.add(s, self.extra[s], self.req.all_token_ids.gpu[s, :prompt_len].tolist(), self.views[s],
                              seed=self.seeds.get(s))
        self.top_up([s for s in mine if s in self.core.handles])
        rows = batch if logits.shape[0] == len(batch) else ctx.expanded_idx_mapping.tolist()
        count, where = Counter(rows), []
        for i, s in enumerate(rows):
            if s not in self.extra:
                continue
            if count[s] > 1 and s not in self.ended:
                log.error("logitfuse: request at slot %s ends: it has %d logits rows this step (speculative "
                          "decoding), and fusion reads one row per request", s, count[s])
                self.core.drop(s)
                self.ended.add(s)
            if s in self.ended:
                self.core.end(logits, i)
            else:
                where.append((i, s))
        return self.core.apply(logits, where)

    def top_up(self, slots: list[int]) -> None:
        """Each view takes the tokens committed since the last step: one gather for those one token behind."""
        if not slots:
            return
        total = self.req.total_len.gpu.tolist()
        one = []
        for s in slots:
            view = self.views[s]
            have = view.start + len(view.ids)
            if total[s] == have + 1:
                one.append((s, have))
            elif total[s] > have:
                view.ids += self.req.all_token_ids.gpu[s, have:total[s]].tolist()
        if one:
            ids = self.req.all_token_ids.gpu[[s for s, _ in one], [c for _, c in one]].tolist()
            for (s, _), token in zip(one, ids):
                self.views[s].ids.append(token)

    def park(self, batch: set[int]) -> None:
        """Fused slots absent for more than park_after steps give back their experts' caches (their request
        finished, or waits): one that returns without add_request prefills again at its next step."""
        for s in [s for s in self.core.handles if s not in batch]:
            if self.steps - self.seen.get(s, self.steps) > self.park_after:
                self.core.drop(s)
                self.waiting.add(s)
