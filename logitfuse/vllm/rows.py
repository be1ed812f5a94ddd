"""The experts' side of fusion inside another engine: rows keyed by id, their expert KV caches, fused scores.

The host engine (vLLM) runs the base and owns the batch; this module holds, for every row that asked for
an ensemble, the prompt, a live view of its generated tokens and how many of them the experts have read.
`fuse` brings every expert up to date (a new row prefills its prompt and any tokens it already has, as a
preempted and resumed request does; a running row takes its newest token, every model in one forward, LoRA
views of one host together) and returns the fused scores of the rows from the host's base logits, through
the engine's own fuser (engine/hosted.py). A cross-tokenizer expert reads the generated text re-tokenized
with its own tokenizer, by the engine's code: it prefills its own tokens of the prompt's text (and of the
text generated so far), and each step forgets what the newest token's merge changed and feeds the new ids.
A Transfer Q* row keeps its baseline model here like an expert; each step its rollouts continue the
baseline's rows beside the host's forward (the engine's SlotRollouts, with the row's own rollout generator
kept in step with the engine's: `RolloutGenerator`), and the reward models the getter gives score them.
The catch-up needs only the rows' tokens so far, not the host's logits: `start` runs it ahead of `fuse` (the
processor starts it on a worker thread before the host's forward, core.py), and `fuse` then only combines the
rows it brought up to date. No vLLM import: tests drive it with any base logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from logitfuse.backends.base import CausalLM, RewardModel, Tokenizer
from logitfuse.engine.hosted import (
    HostFuser,
    SlotRollouts,
    advance_ragged_group,
    cross_prompt,
    retokenized_change,
    retokenized_ids,
    skip_draws,
)
from logitfuse.engine.slots import ModelSlots
from logitfuse.errors import InvalidRequest, VocabMismatchError
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops.sampling import make_generator
from logitfuse.ops.vocab import Alignment, VocabInfo, align


@dataclass
class RolloutGenerator:
    """A Transfer Q* row's rollout generator as the engine keeps it (engine/core.py: seeded with the request's
    seed + 1, advanced by every decode step's rollouts), whatever the host does with the row: a step it runs
    again (a sample the host discards, such as a prompt chunk's; a group retried row by row) draws from the
    same state as the first time, and a row that joins with tokens already generated (preempted and resumed)
    first skips the draws of their steps."""

    generator: torch.Generator
    seeded: bool
    steps: int = 0  # decode steps whose draws the generator has made
    before: tuple[int, torch.Tensor] | None = None  # (step, the generator's state before that step's draws)

    def at(self, step: int, draws: int, width: int) -> torch.Generator:
        """The generator for decode step `step` (the tokens generated before it), whose rollouts make `draws`
        draws over `width` tokens (as every step of the row does)."""
        if self.before is not None and self.before[0] == step:
            self.generator.set_state(self.before[1])
        else:
            if self.seeded and step > self.steps:  # unseeded, the draws need not match anything
                skip_draws(self.generator, (step - self.steps) * draws, width)
            self.before = (step, self.generator.get_state())
        self.steps = step + 1
        return self.generator


@dataclass
class Row:
    plan: FusionPlan
    prompt: list[int]  # the host's prompt ids
    outputs: Sequence[int]  # the host's own list of generated tokens (it grows in place)
    prompts: dict[str, list[int]] | None = None  # each model's own prompt ids, where the request gave them
    started: bool = False  # the experts have prefilled this row
    fed: int = 0  # generated tokens the experts' caches hold (after their prompts)
    error: str | None = None  # set when this row's fusion failed; the row is then left to end
    own: dict[str, list[int]] = field(default_factory=dict)  # cross-tokenizer model -> its ids of the prompt
    cross: dict[str, list[int]] = field(default_factory=dict)  # ... -> its ids of the generated text it holds
    rollout: RolloutGenerator | None = None  # a Transfer Q* row's

    def prompt_of(self, name: str) -> list[int]:
        """The prompt ids model `name` reads (its own where the request gave them, else the host's)."""
        return self.prompts[name] if self.prompts is not None else self.prompt

    def pending(self) -> list[int]:
        """Generated tokens the experts have not read yet."""
        return list(self.outputs[self.fed:])


@dataclass
class ExpertRows:
    """Rows by id, each with its plan; the experts' batched states (one Slot per model, as the engine's).
    get_reward: the reward models Transfer Q* scores its rollouts with (default: get_backend, a pool's getter
    serves both)."""

    get_backend: Callable[[str], CausalLM]
    base: VocabInfo  # the host's base vocabulary; its logits_width is the width of the logits it hands over
    solver_threads: int | None = None
    base_tokenizer: Tokenizer | None = None  # the host's tokenizer (cross-tokenizer experts read its text)
    get_reward: Callable[[str], RewardModel] | None = None
    rows: dict[str, Row] = field(default_factory=dict)
    slots: ModelSlots = field(default_factory=ModelSlots)
    _maps: dict[tuple, Alignment] = field(default_factory=dict)
    _aside: dict[str, tuple] = field(default_factory=dict)  # model -> rows set aside during one forward
    _early: dict[str, str] = field(default_factory=dict)  # rows whose catch-up in `start` failed -> why

    def __post_init__(self) -> None:
        self.fuser = HostFuser(self.get_backend, self.alignment, self.solver_threads,
                               self.get_reward or self.get_backend)

    def alignment(self, plan: FusionPlan) -> Alignment:
        """The experts' vocabularies mapped onto the host's base vocabulary (checked once per set of models):
        shared ids, or a cross-tokenizer pair's map by token text (the base's texts are needed then)."""
        cross = plan.cross_models()
        key = (plan.models()[1:], cross)
        if key not in self._maps:
            if cross and self.base.texts is None:
                raise InvalidRequest(f"experts {', '.join(cross)} use another tokenizer: the host's base "
                                     "vocabulary needs its token texts to map theirs", "ensemble")
            info = lambda n, texts=False: self.get_backend(n).vocab_info(with_texts=texts)  # noqa: E731
            try:
                same = [self.base] + [info(n) for n in key[0] if n not in cross]
                self._maps[key] = align(same, [(info(e.tuned, True), info(e.untuned, True))
                                               for e in plan.experts if e.cross])
            except VocabMismatchError as err:
                raise InvalidRequest(str(err), "ensemble") from None
        return self._maps[key]

    def experts(self, plan: FusionPlan) -> tuple[str, ...]:
        """The models this process runs for a plan: all but the base (the host runs it), Transfer Q*'s
        baseline included."""
        return plan.models()[1:]

    # -- the host's batch ----------------------------------------------------------------------------------
    def add(self, rid: str, plan: FusionPlan, prompt: Sequence[int], outputs: Sequence[int],
            prompts: dict[str, list[int]] | None = None, seed: int | None = None) -> None:
        """A row joins (or joins again after a preemption: it prefills everything it has so far). prompts:
        each model's own prompt ids (roles formatting the prompt differently); by default the host's. seed:
        the request's sampling seed, which seeds a Transfer Q* row's rollouts as the engine does."""
        self.remove(rid)
        row = Row(plan, list(prompt), outputs, prompts)
        if plan.tqstar is not None:
            row.rollout = RolloutGenerator(make_generator(None if seed is None else seed + 1), seed is not None)
        self.rows[rid] = row

    def remove(self, rid: str) -> None:
        self._early.pop(rid, None)
        if self.rows.pop(rid, None) is not None:
            self.slots.drop({rid})

    # -- one step ------------------------------------------------------------------------------------------
    def start(self, rids: list[str]) -> None:
        """The first half of a step, which needs no base logits: every expert of the given rows reads the rows'
        unread tokens (as `fuse` would), ahead of it. A row it brought up to date is not fed again by `fuse` or
        a second `start`; its failures are kept for `fuse` to report. A row whose newest token is still a host
        placeholder (asynchronous scheduling) is left for `fuse`, as are rows that leave meanwhile."""
        live = [r for r in rids if r in self.rows and self.rows[r].error is None and r not in self._early]
        live = [r for r in live if all(t >= 0 for t in self.rows[r].pending())]
        self._early.update(self._catch_up(live))

    def fuse(self, rids: list[str], base_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, str]]:
        """Fused scores (b, V) for the given rows from the host's base logits (b, V), in the same order, and
        the rows that failed with the reason (their scores are left as the base's). Rows that `start` brought
        up to date are only combined."""
        failed = {r: self._early.pop(r) for r in rids if r in self._early}
        live = [r for r in rids if self.rows[r].error is None and r not in failed]
        failed.update(self._catch_up(live))
        out = base_logits.clone()
        groups: dict[object, list[int]] = {}
        for i, rid in enumerate(rids):
            if rid not in failed and self.rows[rid].error is None:
                groups.setdefault(self.rows[rid].plan.group_key(), []).append(i)
        for idx in groups.values():
            failed.update(self._combine(rids, idx, base_logits, out))
        for rid, reason in failed.items():
            self.rows[rid].error = reason
            self.slots.drop({rid})
        return out, failed

    def _combine(self, rids: list[str], idx: list[int], base_logits: torch.Tensor, out: torch.Tensor
                 ) -> dict[str, str]:
        """One plan group's fused scores into out; a failing group is retried row by row."""
        try:
            out[idx] = self.scores([rids[i] for i in idx], base_logits[idx]).to(out.dtype)
            return {}
        except Exception as err:
            if len(idx) == 1:
                return {rids[idx[0]]: f"{type(err).__name__}: {err}"}
            failed: dict[str, str] = {}
            for i in idx:
                failed.update(self._combine(rids, [i], base_logits, out))
            return failed

    def scores(self, rids: list[str], base_logits: torch.Tensor) -> torch.Tensor:
        """The plans' method on rows of one group (their experts up to date), by the engine's own fuser."""
        plans = [self.rows[r].plan for r in rids]

        def rows_of(name: str) -> torch.Tensor:
            if name == plans[0].base:  # the host's logits (also where the base fills a role, e.g. untuned)
                return base_logits
            slot = self.slots[name]
            where = slot.index()
            pick = torch.tensor([where[r] for r in rids], dtype=torch.long, device=slot.logits.device)
            return slot.logits.index_select(0, pick)

        return self.fuser.scores(plans, rows_of, self.rollouts(rids, plans[0]))

    def rollouts(self, rids: list[str], plan: FusionPlan) -> SlotRollouts | None:
        """Transfer Q*'s look-ahead for rows of one group (None for other methods): the baseline's rows here,
        each row's rollout generator at its step, its ids so far in each model."""
        tq = plan.tqstar
        if tq is None:
            return None
        rows = [self.rows[r] for r in rids]
        # a step's draws, as methods/tqstar.py makes them: top_k candidates (at most the shared vocabulary),
        # `rollouts` copies each, rollout_tokens - 1 sampled tokens each, over the baseline's logits
        draws = min(tq.top_k, self.alignment(plan).width) * tq.rollouts * (tq.rollout_tokens - 1)
        width = self.slots[tq.baseline].logits.shape[-1]
        gens = [row.rollout.at(len(row.outputs), draws, width) for row in rows]
        return SlotRollouts(self.slots, rids, gens, lambda model: [[*row.prompt_of(model), *row.outputs]
                                                                   for row in rows])

    def _catch_up(self, rids: list[str]) -> dict[str, str]:
        """Every expert of the given rows reads the rows' unread tokens: new rows (and rows more than one token
        behind) prefill, the others decode their newest token. Returns the rows that failed."""
        failed: dict[str, str] = {}
        fresh, step = [], {}
        for rid in rids:
            row = self.rows[rid]
            todo = row.pending()
            if any(t < 0 for t in todo):  # a host placeholder for a token not sampled yet
                failed[rid] = f"token ids {todo} include a placeholder (asynchronous scheduling is not supported)"
            elif not row.started or len(todo) > 1:
                fresh.append(rid)
            elif len(todo) == 1:
                step[rid] = todo[0]
        if fresh:
            self.slots.drop(set(fresh))
            failed.update(self._prefill(fresh))
        if step:
            failed.update(self._advance(step))
        return failed

    def _prefill(self, rids: list[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        names = dict.fromkeys(n for r in rids for n in self.experts(self.rows[r].plan))
        for name in names:
            users = [r for r in rids if name in self.experts(self.rows[r].plan) and r not in failed]
            if not users:
                continue
            failed.update(self._prefill_model(name, users))
        for r in rids:
            if r not in failed:
                self.rows[r].started, self.rows[r].fed = True, len(self.rows[r].outputs)
        return failed

    def _prefill_model(self, name: str, rids: list[str]) -> dict[str, str]:
        """One model's prefill of rows; if the batch fails, each row alone (one bad row fails alone)."""
        try:
            backend = self.get_backend(name)
            state, logits = backend.prefill([self.reads(r, name) for r in rids])
        except Exception as err:
            if len(rids) == 1:
                return {rids[0]: f"{name}: {type(err).__name__}: {err}"}
            return {r: why for rid in rids for r, why in self._prefill_model(name, [rid]).items()}
        self.slots.join(name, backend, state, rids, logits)
        return {}

    def reads(self, rid: str, name: str) -> list[int]:
        """What model `name` reads of a row: the host's tokens, or for a cross-tokenizer model its own ids of
        the prompt's text and of the text generated so far (recorded: later steps start from them)."""
        row = self.rows[rid]
        if name not in row.plan.cross_models():
            return [*row.prompt_of(name), *row.outputs]
        backend = self.get_backend(name)
        if self.base_tokenizer is None:
            raise InvalidRequest(f"model {name!r} re-tokenizes the host's text: the host's tokenizer is needed",
                                 "ensemble")
        if name not in row.own:
            row.own[name] = (row.prompts[name] if row.prompts is not None
                             else cross_prompt(self.base_tokenizer, backend, row.prompt))
        row.cross[name] = retokenized_ids(backend.tokenizer, self.base_tokenizer, row.prompt, list(row.outputs))
        return row.own[name] + row.cross[name]

    def _retokenized(self, rid: str, name: str, backend: CausalLM) -> tuple[int, list[int]]:
        """A cross-tokenizer model's step for a row: (positions to forget, ids to feed), recorded."""
        row = self.rows[rid]
        ids = retokenized_ids(backend.tokenizer, self.base_tokenizer, row.prompt, list(row.outputs))
        forget, add = retokenized_change(row.cross[name], ids, row.own[name])
        row.cross[name] = ids
        return forget, add

    def _advance(self, new: dict[str, int]) -> dict[str, str]:
        """Each model takes its rows' new token; rows without one this step are set aside and rejoin after."""
        failed: dict[str, str] = {}
        groups: dict[object, list[str]] = {}
        for name, slot in self.slots.items():
            if any(r in new for r in slot.rows):
                groups.setdefault(getattr(slot.backend, "shared_forward", None) or ("alone", name), []).append(name)
        for names in groups.values():
            try:
                self._forward(names, new)
            except Exception as err:
                for name in names:  # the state is unusable: its rows fail, rows set aside prefill again
                    rows = self.slots.pop(name).rows if name in self.slots else []
                    failed.update({r: f"{name}: {type(err).__name__}: {err}" for r in rows if r in new})
                    for r in self._aside.pop(name, (None, []))[1]:
                        self.rows[r].started = False
        for rid in new:
            if rid not in failed:
                self.rows[rid].fed += 1
        return failed

    def _forward(self, names: list[str], new: dict[str, int]) -> None:
        """One forward for the slots of one weight-sharing group (or one model)."""
        for name in names:  # rows that wait (no new token) leave the slot's state for this forward
            slot = self.slots[name]
            idle = [i for i, r in enumerate(slot.rows) if r not in new]
            if idle:
                self._split(name, idle)
        slots = [self.slots[n] for n in names]
        if any(n in self.rows[r].cross for n, s in zip(names, slots) for r in s.rows):
            self._forward_retokenized(names, new)
            return
        tokens = [torch.tensor([new[r] for r in s.rows], dtype=torch.long).view(-1, 1) for s in slots]
        if len(slots) == 1:
            slots[0].logits = slots[0].backend.decode(slots[0].state, tokens[0])[:, 0]
        else:
            parts = [(s.backend, s.state, t) for s, t in zip(slots, tokens)]
            for s, logits in zip(slots, slots[0].backend.decode_group(parts)):
                s.logits = logits[:, 0]
        for name in names:
            self._rejoin(name)

    def _forward_retokenized(self, names: list[str], new: dict[str, int]) -> None:
        """The forward of slots with cross-tokenizer rows, as the engine's (engine/slots.py): each such row
        forgets and feeds what its re-tokenized text changed, the others feed their token."""
        parts = []
        for name in names:
            slot = self.slots[name]
            steps = [self._retokenized(r, name, slot.backend) if name in self.rows[r].cross else (0, [new[r]])
                     for r in slot.rows]
            parts.append((slot.backend, slot.state, slot.logits, [f for f, _ in steps], [a for _, a in steps]))
        for name, logits in zip(names, advance_ragged_group(parts)):
            self.slots[name].logits = logits
        for name in names:
            self._rejoin(name)

    def _split(self, name: str, idle: list[int]) -> None:
        slot = self.slots[name]
        busy = [i for i in range(len(slot.rows)) if i not in idle]
        self._aside[name] = (slot.backend.select(slot.state, idle), [slot.rows[i] for i in idle], slot.logits[idle])
        slot.state = slot.backend.select(slot.state, busy)
        slot.rows = [slot.rows[i] for i in busy]
        slot.logits = slot.logits[busy]

    def _rejoin(self, name: str) -> None:
        if name in self._aside:
            state, rows, logits = self._aside.pop(name)
            self.slots.join(name, self.slots[name].backend, state, rows, logits)
