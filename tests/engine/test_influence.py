"""Per-token influence through the engine: every number equals a float64 recomputation from the models' own
logits (each step's prefix run again from scratch), for proxy, EFT, DLF, Transfer Q*, a cross-tokenizer expert
and the speculative path; rows that do not ask get nothing and the same tokens."""

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.engine.stopping import token_piece
from logitfuse.ops import fusion
from logitfuse.ops.vocab import align
from tests.backends.test_remote import client_lf, remote_url  # noqa: F401  (fixtures: a remote base)

PROMPTS = ["the red city of the north", "king queen river blue green"]
STEPS = 6
ATOL = 2e-4  # the engine's float32 against float64 (and incremental decoding against a fresh prefill)


def _last_logits(backend, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return backend.prefill([ids])[1].double()  # (1, V)


def _cross_ids(lf, req, out: list[int], name: str) -> list[int]:
    """The cross-tokenizer model's prompt and the generated text in its own tokens (as the engine follows it)."""
    tok = lf.pool.get(req.plan.base).tokenizer
    tail = req.prompt_ids[-4:]
    text = tok.decode(tail + out, skip_special_tokens=True)[len(tok.decode(tail, skip_special_tokens=True)):]
    return req.prompts[name] + lf.pool.get(name).tokenizer.encode(text, add_special_tokens=False)


def _scores(lf, req, out: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (1, V) base logits and (1, T, V) tuned and untuned scores on the base's vocabulary, as the method
    takes them (a cross-tokenizer expert's: its own log-probabilities, mapped)."""
    plan = req.plan
    base = lf.pool.get(plan.base)
    cross = [(lf.pool.get(e.tuned), lf.pool.get(e.untuned)) for e in plan.experts if e.cross]
    al = align([base.vocab_info(with_texts=bool(cross))],
               [(t.vocab_info(with_texts=True), u.vocab_info(with_texts=True)) for t, u in cross])
    z_b = _last_logits(base, req.prompt_ids + out)[:, : al.width]

    def expert(name: str, is_cross: bool) -> torch.Tensor:
        if is_cross:
            m = al.maps[name]
            lp = torch.log_softmax(_last_logits(lf.pool.get(name), _cross_ids(lf, req, out, name)), -1)
            return torch.where(m >= 0, lp[:, m.clamp(min=0)], torch.zeros(()).double())
        z = _last_logits(lf.pool.get(name), req.prompts[name] + out)
        return torch.cat([z[:, : al.shared], z.new_full((1, al.width - al.shared), float("-inf"))], -1)

    if not plan.experts:
        return z_b, None, None
    tuned = torch.stack([expert(e.tuned, e.cross) for e in plan.experts], 1)
    untuned = torch.stack([expert(e.untuned, e.cross) for e in plan.experts], 1)
    return z_b, tuned, untuned


def _fused(method: str, z_b, tuned, untuned, coef, q_of_step: dict | None) -> torch.Tensor:
    if method == "proxy":
        return fusion.proxy_tune(z_b, tuned, untuned, coef)
    if method in ("eft", "dlf"):
        return fusion.steer(fusion.log_probs(z_b), fusion.log_probs(tuned), fusion.log_probs(untuned), coef)
    if method == "tqstar":
        cand = torch.tensor([list(q_of_step)])
        q = torch.tensor([list(q_of_step.values())], dtype=torch.float64)
        return fusion.tqstar_scores(z_b, cand, q, torch.tensor([1.0], dtype=torch.float64))
    return z_b


def _check(lf, req, out, entries: list[dict], diags: list[dict]) -> None:
    """Every entry against the float64 recomputation at its step."""
    plan = req.plan
    assert [e["token_id"] for e in entries] == out and len(entries) == STEPS
    for t, e in enumerate(entries):
        z_b, tuned, untuned = _scores(lf, req, out[:t])
        c = out[t]
        w = [x["weight"] for x in e["experts"]]
        if plan.method == "dlf":
            assert w == pytest.approx([diags[t]["dlf_weights"][x.name] for x in plan.experts], abs=0)
        elif plan.experts:
            assert w == pytest.approx(list(plan.coef), abs=1e-6)
        coef = torch.tensor([w], dtype=torch.float64)
        fused = torch.log_softmax(_fused(plan.method, z_b, tuned, untuned, coef,
                                         diags[t].get("tqstar_q") if diags else None), -1)[0]
        base = torch.log_softmax(z_b, -1)[0]
        assert e["logprob"] == pytest.approx(float(fused[c]), abs=ATOL)
        assert e["base_logprob"] == pytest.approx(float(base[c]), abs=ATOL)
        assert e["shift"] == pytest.approx(float(fused[c] - base[c]), abs=ATOL)
        assert e["rank"] == int((fused > fused[c] + ATOL).sum()) + 1
        assert e["base_rank"] == int((base > base[c] + ATOL).sum()) + 1
        assert [x["token_id"] for x in e["top"]] == torch.topk(fused, 3).indices.tolist()
        assert [x["logprob"] for x in e["top"]] == pytest.approx(torch.topk(fused, 3).values.tolist(), abs=ATOL)
        assert [x["token_id"] for x in e["base_top"]] == torch.topk(base, 3).indices.tolist()
        best = int(base.argmax())
        assert e["base_choice"] == (None if best == c else e["base_top"][0])
        log_probs = plan.method in ("eft", "dlf")
        for i, x in enumerate(e["experts"]):
            ex = plan.experts[i]
            tu, un = tuned[0, i], untuned[0, i]
            if log_probs and not ex.cross:
                tu, un = torch.log_softmax(tu, -1), torch.log_softmax(un, -1)
            assert x["expert"] == ex.name and x["push"] == pytest.approx(float(tu[c] - un[c]), abs=ATOL)
        if plan.method == "tqstar":
            assert e["q"] == diags[t]["tqstar_q"][c]
        else:
            assert "q" not in e


def _run(lf, model: str, fusion_params: dict, temperature: float = 0.0):
    sp = [SamplingParams(max_tokens=STEPS, temperature=temperature, seed=i + 3, ignore_eos=True)
          for i in range(len(PROMPTS))]
    reqs = [r for p, s in zip(PROMPTS, sp) for r in lf.requests(model, p, s, {**fusion_params, "influence": True})]
    outs = {r.rid: ([], [], []) for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            outs[ev.rid][0].append(ev.token_id)
            outs[ev.rid][1].append(ev.influence)
            if ev.diagnostics:
                outs[ev.rid][2].append(ev.diagnostics)
    return reqs, outs


@pytest.mark.parametrize("model,fusion_params,temperature", [
    ("proxy-a", {"alpha": 0.7}, 0.0),
    ("proxy-a", {"alpha": 1.3}, 1.0),  # sampled: the chosen token need not be the fused argmax
    ("eft-ab", {"weights": [0.8, 0.4], "beta": 1.5}, 0.0),
    ("dlf-ab", {}, 0.0),
    ("proxy-a", {"experts": ["xa"], "alpha": 0.7}, 0.0),  # cross-tokenizer: pushes from the mapped scores
    ("proxy-a", {"method": "eft", "experts": ["xa"], "beta": 0.7}, 1.0),
    ("dlf-ab", {"experts": ["xa"]}, 0.0),
    ("tq", {}, 0.0),
    ("base-large", {}, 0.0),
])
def test_influence_equals_a_float64_recomputation(lf, model, fusion_params, temperature):
    reqs, outs = _run(lf, model, fusion_params, temperature)
    for r in reqs:
        tokens, entries, diags = outs[r.rid]
        _check(lf, r, tokens, entries, diags)
        if r.plan.method == "none":
            assert all(e["experts"] == [] and e["shift"] == 0.0 for e in entries)


@pytest.mark.parametrize("method", ["eft", "proxy"])
def test_the_speculative_path_reports_the_same_influence(lf, method):
    spec = {"method": method, "alpha": 0.8, "beta": 0.8, "speculative": {"k": 3}}
    fusion_params = {k: v for k, v in spec.items() if k != ("beta" if method == "proxy" else "alpha")}
    reqs, outs = _run(lf, "proxy-a", fusion_params)
    assert all(r.plan.speculative for r in reqs)
    for r in reqs:
        tokens, entries, _ = outs[r.rid]
        _check(lf, r, tokens, entries, [])
    before = lf.stats().speculative.drafted
    _run(lf, "proxy-a", fusion_params)
    assert lf.stats().speculative.drafted > before  # the tokens did come from draft/verify rounds


def test_rows_that_do_not_ask_get_nothing_and_the_same_tokens(lf):
    sp = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=2, ignore_eos=True)
    alone = lf.generate("proxy-a", PROMPTS, sp)
    asking = lf.requests("proxy-a", PROMPTS[0], sp, {"influence": True}, rid="asks")
    quiet = lf.requests("proxy-a", PROMPTS[1], sp, {"alpha": 1.0}, rid="quiet")  # the same plan group
    assert asking[0].plan.group_key() == quiet[0].plan.group_key()
    got = {"asks": [], "quiet": []}
    for ev in lf.stream(asking + quiet):
        got[ev.rid].append(ev)
    assert all(ev.influence is None for ev in got["quiet"])
    assert [e.token_id for e in got["quiet"] if e.token_id is not None] == alone[1].token_ids
    assert [e.logprob for e in got["quiet"] if e.token_id is not None] == alone[1].logprobs
    asked = [e for e in got["asks"] if e.token_id is not None]
    assert [e.token_id for e in asked] == alone[0].token_ids
    assert [e.influence["logprob"] for e in asked] == alone[0].logprobs  # what the logprobs field reports
    assert alone[0].influence is None and alone[1].influence is None


def test_completion_output_collects_the_entries(lf):
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    out = lf.generate("proxy-a", PROMPTS[:1], sp, {"influence": True})[0]
    assert len(out.influence) == 3 == len(out.token_ids)
    assert [e["token_id"] for e in out.influence] == out.token_ids
    tok = lf.pool.get("base-large").tokenizer
    assert [e["token"] for e in out.influence] == [token_piece(tok, t) for t in out.token_ids]
    assert "".join(e["token"] for e in out.influence).startswith(out.text)  # the text leaves special tokens out


@torch.inference_mode()
def test_a_remote_base_shows_its_top_n_and_nothing_crashes(client_lf):  # noqa: F811
    """Over a server that shows its top 5: a bare base reports the server's own numbers (shift 0); a fused
    one, restricted to the top 5 (candidates 0), reports the base renormalised over them, as the fused
    distribution is; the base's top and ranks are among those 5."""
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    local = client_lf.pool.get("base-large")
    for ensemble in ("remote-bare5", "remote-top5-strict", "remote-top5"):
        out = client_lf.generate(ensemble, PROMPTS, sp, {"influence": True})
        for prompt, o in zip(PROMPTS, out):
            ids = local.tokenizer(prompt).input_ids
            assert [e["logprob"] for e in o.influence] == o.logprobs
            for t, e in enumerate(o.influence):
                lp = torch.log_softmax(_last_logits(local, ids + o.token_ids[:t]), -1)[0]
                top5 = torch.topk(lp, 5)
                if ensemble == "remote-bare5":
                    assert e["shift"] == 0.0 and e["base_logprob"] == pytest.approx(float(lp[e["token_id"]]), abs=1e-4)
                elif ensemble == "remote-top5-strict":
                    within = torch.log_softmax(top5.values, -1)
                    assert e["base_logprob"] == pytest.approx(
                        float(within[top5.indices.tolist().index(e["token_id"])]), abs=1e-4)
                    assert [x["token_id"] for x in e["base_top"]] == top5.indices[:3].tolist()
                assert 1 <= e["base_rank"] <= (5 if ensemble != "remote-top5" else len(lp))
