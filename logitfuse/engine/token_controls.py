"""A group's fused scores shaped by its rows' penalties and token controls, after fusion and before sampling.

vLLM's order: token masks (allowed_token_ids, bad_words, min_tokens, a grammar's mask), then logit_bias,
then the repetition, frequency and presence penalties; temperature and truncation follow in ops/sampling.
The fused distribution itself (the logprobs a response reports) is left as it is.

Each row's controls (its bad words' token ids, its stop ids, its grammar matcher) are built once, at its
first sampled token, and kept on the sequence; the matcher advances with every token the row takes. A
grammar that can take no token (a dead end: engine/grammar.py) ends its row with a GrammarDeadEnd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from logitfuse.engine import grammar
from logitfuse.ops.penalties import apply_penalties, bad_word_bans, ban, bitmask_to_bool, token_counts
from logitfuse.ops.sampling import SamplingTensors, apply_bias


@dataclass
class RowControls:
    bad_words: list[list[int]]  # token ids of each bad word, with and without a leading space
    matcher: Any | None  # the grammar's matcher (engine/grammar.py), None without structured output
    tokenizer: Any = None  # what the matcher was built for, to say why it stopped
    width: int = 0


def bad_word_ids(words: tuple[str, ...], tokenizer: Any) -> list[list[int]]:
    """vLLM's tokenization of bad_words: each word as it is and with a leading space, where that differs."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced != plain and (not plain or spaced[0] != plain[0]):
            out.append(spaced)
    return [w for w in out if w]


def controls(seq: Any, tokenizer: Any, width: int) -> RowControls:
    """The row's controls, built on first use."""
    if seq.controls is None:
        sp = seq.req.sampling
        matcher = grammar.compile_spec(sp.structured, tokenizer, width) if sp.structured else None
        seq.controls = RowControls(bad_word_ids(sp.bad_words, tokenizer), matcher, tokenizer, width)
    return seq.controls


def _banned(seqs: list, tokenizer: Any, width: int, device: torch.device) -> torch.Tensor:
    """(b, V) bool: the tokens each row may not take now, gathered as index lists and grammar masks so the
    tensor work is a few batched operations whatever the number of rows."""
    rows, ids, open_rows, allowed_rows, allowed_ids, grammar_rows, matchers = [], [], [], [], [], [], []
    for i, s in enumerate(seqs):
        sp = s.req.sampling
        if not sp.controlled():
            continue
        c = controls(s, tokenizer, width)
        bans = bad_word_bans(s.generated, c.bad_words)
        if len(s.generated) < sp.min_tokens:
            bans += list(s.stopper.stop_ids)
        bans = [t for t in bans if 0 <= t < width]
        rows += [i] * len(bans)
        ids += bans
        if sp.allowed_token_ids is not None:
            open_rows.append(i)
            allowed_rows += [i] * len(sp.allowed_token_ids)
            allowed_ids += sp.allowed_token_ids
        if c.matcher is not None:
            grammar_rows.append(i)
            matchers.append(c.matcher)
    banned = torch.zeros(len(seqs), width, dtype=torch.bool)
    if ids:
        banned[rows, ids] = True
    if open_rows:
        allowed = torch.zeros_like(banned)
        allowed[allowed_rows, allowed_ids] = True
        banned[open_rows] |= ~allowed[open_rows]
    if matchers:
        banned[grammar_rows] |= ~bitmask_to_bool(grammar.masks(matchers, width), width)
    return banned.to(device)


def shape(seqs: list, scores: torch.Tensor, params: SamplingTensors, tokenizer: Any
          ) -> tuple[torch.Tensor, SamplingTensors]:
    """The scores to sample from (b, V) and the parameters left to apply (logit_bias folded in here)."""
    if not any(s.req.sampling.controlled() for s in seqs):
        return scores, params
    width = scores.shape[-1]
    out = ban(apply_bias(scores, params), _banned(seqs, tokenizer, width, scores.device))
    sp = [s.req.sampling for s in seqs]
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in sp):
        f = dict(dtype=torch.float32, device=scores.device)
        out = apply_penalties(
            out, token_counts([s.req.prompt_ids for s in seqs], width, scores.device),
            token_counts([s.generated for s in seqs], width, scores.device),
            torch.tensor([p.repetition_penalty for p in sp], **f), torch.tensor([p.frequency_penalty for p in sp], **f),
            torch.tensor([p.presence_penalty for p in sp], **f))
    return out, replace(params, bias=None)


def take(seq: Any, token: int) -> None:
    """The row took `token`: its grammar matcher advances (a token it refuses is a dead end, raised)."""
    c = seq.controls
    if c is not None and c.matcher is not None and not grammar.advance(c.matcher, token):
        raise grammar.dead_end(seq.req.sampling.structured, c.tokenizer, c.width, seq.generated)


def dead_end(seq: Any) -> Exception | None:
    """Why the row's controls left no token, where its grammar is at a dead end (None otherwise)."""
    c = seq.controls
    if c is None or c.matcher is None or not c.matcher.is_error():
        return None
    return grammar.dead_end(seq.req.sampling.structured, c.tokenizer, c.width, seq.generated)
