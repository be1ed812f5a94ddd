"""Admission by KV-cache budget: what a set of requests may need at worst when decoded together.

A model's batched cache holds rows x its longest row (rows are left-padded to one length), a row being at most
prompt + max_tokens positions. Speculative rows keep their group's own caches, where forgotten drafts stay
until they outnumber the visible positions (then the cache is compacted): up to twice that plus a block. A
cross-tokenizer expert's re-tokenized text is counted as max_tokens positions (an estimate there). Not
counted: the moment a joining batch's prefill is copied into a cache, and caches held elsewhere (a remote
model reports 0 bytes per position).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from logitfuse.request import GenerationRequest


def kv_need(reqs: Iterable[GenerationRequest], bytes_per_position: Callable[[str], int]) -> int:
    """Bytes of KV cache these requests may need at worst, decoded together; bytes_per_position(model name)
    is one position of one row in that model's cache."""
    pools: dict[tuple, list[int]] = {}  # (model, shared slots or a speculative group) -> row lengths
    for r in reqs:
        spec = r.plan.speculative
        for name in r.plan.models():
            n = len(r.prompts[name]) + r.sampling.max_tokens
            pools.setdefault((name, r.plan.group_key() if spec else None), []).append(
                2 * n + spec.k + 1 if spec else n)
    return sum(bytes_per_position(name) * len(ns) * max(ns) for (name, _), ns in pools.items())
