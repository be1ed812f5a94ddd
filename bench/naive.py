"""The naive reference loop: one request at a time, each model called step by step with its own HF cache,
the way reference proxy-tuning code decodes. Greedy. Used by bench/throughput.py as the baseline."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from logitfuse.ops import fusion


@torch.inference_mode()
def naive_generate(models: dict, plan, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy fused decoding of one prompt; models maps names to HF causal LMs."""
    names = list(plan.models())
    caches = {n: DynamicCache() for n in names}
    ids = torch.tensor([prompt])

    def forward(n: str, x: torch.Tensor) -> torch.Tensor:
        kw = {cache_arg(models[n]): caches[n]}
        return models[n](input_ids=x, use_cache=True, **kw).logits[:, -1].float()

    logits = {n: forward(n, ids) for n in names}
    out: list[int] = []
    for _ in range(max_tokens):
        scores = fuse(plan, logits)
        tok = int(scores.argmax(-1))
        out.append(tok)
        step = torch.tensor([[tok]])
        logits = {n: forward(n, step) for n in names}
    return out


def cache_arg(model) -> str:
    """The KV-cache argument's name in this transformers version (`cache`, formerly `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fuse(plan, z: dict) -> torch.Tensor:
    base = z[plan.base]
    if plan.method == "none":
        return base
    tuned = torch.stack([z[e.tuned] for e in plan.experts], 1)
    untuned = torch.stack([z[e.untuned] for e in plan.experts], 1)
    if plan.method == "proxy":
        return fusion.proxy_tune(base, tuned, untuned, torch.tensor([plan.coef]))
    if plan.method == "eft":
        return fusion.eft(base, tuned, untuned, torch.ones(1), torch.tensor([plan.coef]))
    from logitfuse.ops.weights import make_grid, solve_dlf

    w = solve_dlf(base, untuned[:, 0], tuned, make_grid(*plan.grid), plan.mode).weights
    return fusion.dlf_combine(base, tuned, untuned, w)
