"""Experts with another tokenizer (`cross_tokenizer: true`): scores mapped by token text, the expert
following the generated text re-tokenized. Checked against a step-by-step recomputation from scratch."""

from types import SimpleNamespace

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.api import SpeculativeEFT
from logitfuse.engine.retokenize import generated_text
from logitfuse.engine.slots import ModelSlots
from logitfuse.errors import InvalidRequest
from logitfuse.ops import fusion
from logitfuse.ops.sampling import SamplingTensors, make_generator, sample
from logitfuse.ops.vocab import VocabInfo, align, cross_map

PROMPTS = ["the red city of the north", "one", "king queen river blue green", "two three four"]
STEPS = 16


def info(name, texts, special=None):
    vocab = {f"raw{i}": i for i in range(len(texts))} | {t: texts.index(t) for t in (special or {}).values()}
    return VocabInfo(name, vocab, special or {}, len(texts), texts)


def test_cross_map_matches_unique_texts_and_special_tokens_by_role():
    base = info("base", ["<s>", "a", " b", "c", "\ufffd", "\ufffd", "", "zz"], {"bos_token": "<s>"})
    expert = info("exp", ["c", " b", "x", "a", "<bos>", "zz", "zz"], {"bos_token": "<bos>"})
    assert cross_map(base, expert).tolist() == [4, 3, 1, 0, -1, -1, -1, -1]  # 'zz' is ambiguous over there
    al = align([base], [(expert, info("exp-untuned", list(expert.texts), {"bos_token": "<bos>"}))])
    z = torch.arange(7, dtype=torch.float32).unsqueeze(0) * 10  # expert logits 0, 10, ..., 60
    lp = torch.log_softmax(z, -1)[0].tolist()  # what is mapped: log-probabilities in the expert's vocabulary
    assert al.apply(z, "exp")[0].tolist() == pytest.approx([lp[4], lp[3], lp[1], lp[0], 0.0, 0.0, 0.0, 0.0])
    assert al.gather(z, "exp").tolist() == [[40.0, 30.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # a push, as it is


def test_a_base_token_without_a_counterpart_reads_the_expert_token_its_text_begins_with():
    base = VocabInfo("base", {}, {}, 7, [" 100", " 1", " London", " Londoner", "<unused0>", "\n\n\n", "qq"],
                     special_ids=frozenset({4}))
    expert = VocabInfo("exp", {}, {}, 6, [" 1", "0", " London", "<", "\n", "\n\n"])
    # ' 100' -> ' 1'; ' Londoner' -> ' London'; an added token is a name, not text; '\n\n\n' -> '\n\n'
    assert cross_map(base, expert).tolist() == [0, 0, 2, 2, -1, 5, -1]


def test_unmapped_tokens_keep_the_base_score_whatever_the_experts_logit_offset():
    """The pair's push on a mapped token is its log-ratio, so shifting the tuned model's logits by a constant
    (which changes neither of its distributions) changes nothing, and unmapped tokens are not lifted above the
    mapped ones the pair favours."""
    base = VocabInfo("base", {}, {}, 4, ["a", "b", "\n\n", "c"])
    tuned, untuned = (VocabInfo(n, {}, {}, 3, ["a", "b", "c"]) for n in ("t", "u"))
    al = align([base], [(tuned, untuned)])
    z_b = torch.zeros(1, 4)
    z_u = torch.tensor([[0.0, 0.0, 0.0]])
    z_t = torch.tensor([[4.0, 0.0, 0.0]])  # tuning moved mass onto 'a'
    fused = [fusion.proxy_tune(z_b, al.apply(t, "t")[:, None], al.apply(z_u, "u")[:, None], torch.ones(1, 1))
             for t in (z_t, z_t - 30.0, z_t + 30.0)]
    assert torch.allclose(fused[0], fused[1]) and torch.allclose(fused[0], fused[2])
    q_t, q_u = torch.log_softmax(z_t, -1)[0], torch.log_softmax(z_u, -1)[0]
    want = torch.tensor([q_t[0] - q_u[0], q_t[1] - q_u[1], 0.0, q_t[2] - q_u[2]])
    assert torch.allclose(fused[0][0], want) and fused[0][0].argmax() == 0


def _reference(lf, prompt: str, method: str, sp: SamplingParams) -> list[int]:
    """Fused decoding recomputed from scratch at every step with the tiny models (same sampling rule and
    generator as the engine)."""
    base, tuned, untuned = (lf.pool.get(n) for n in ("base-large", "foreign", "foreign-small"))
    al = align([base.vocab_info(with_texts=True)], [(tuned.vocab_info(with_texts=True),
                                                     untuned.vocab_info(with_texts=True))])
    m = al.maps["foreign"]
    base_ids, exp_ids = base.tokenizer(prompt).input_ids, tuned.tokenizer(prompt).input_ids
    gen, params = make_generator(sp.seed), SamplingTensors.build([(sp.temperature, -1, 1.0, 0.0)])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(sp.max_tokens):
            tail = base_ids[-4:]
            text = base.tokenizer.decode(tail + out, skip_special_tokens=True)[
                len(base.tokenizer.decode(tail, skip_special_tokens=True)):]  # special tokens add no text
            ids = exp_ids + tuned.tokenizer.encode(text, add_special_tokens=False)
            z_b = base.prefill([base_ids + out])[1]
            z_t, z_u = (torch.where(m >= 0, torch.log_softmax(x.prefill([ids])[1], -1)[:, m.clamp(min=0)], 0.0)
                        for x in (tuned, untuned))  # log-probabilities in the expert's vocabulary, mapped
            if method == "proxy":
                fused = fusion.proxy_tune(z_b, z_t.unsqueeze(1), z_u.unsqueeze(1), torch.tensor([[0.7]]))
            else:
                fused = fusion.eft(z_b, z_t.unsqueeze(1), z_u.unsqueeze(1), torch.ones(1), torch.tensor([[0.7]]))
            out.append(int(sample(fused, params, [gen])[0]))
    return out


@pytest.mark.parametrize("method,param,temperature", [("proxy", "alpha", 0.0), ("eft", "beta", 0.0),
                                                      ("proxy", "alpha", 1.0)])
def test_cross_tokenizer_expert_equals_recomputation(lf, method, param, temperature, monkeypatch):
    kinds = set()  # how the expert's re-tokenization moved: "one", "several" new tokens, or "forget"
    advance = ModelSlots._advance_retokenized

    def spy(names, slots, seqs, get_backend):
        before = {(n, r): list(seqs[r].cross_ids.get(n, [])) for n, s in zip(names, slots) for r in s.rows}
        advance(names, slots, seqs, get_backend)
        for (name, r), old in before.items():
            if name in seqs[r].cross_ids:
                now = seqs[r].cross_ids[name]
                kinds.add("forget" if now[:len(old)] != old else "one" if len(now) == len(old) + 1 else "several")

    monkeypatch.setattr(ModelSlots, "_advance_retokenized", staticmethod(spy))
    fusion_params = {"method": method, "experts": ["xa"], param: 0.7}
    sps = [SamplingParams(max_tokens=STEPS, temperature=temperature, seed=i + 1, ignore_eos=True)
           for i in range(len(PROMPTS))]
    # a same-tokenizer request decodes in the same batch
    reqs = [r for p, sp in zip(PROMPTS, sps) for r in lf.requests("proxy-a", p, sp, fusion_params)]
    reqs += lf.requests("proxy-a", PROMPTS[0], sps[0], rid="plain")
    got = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            got[ev.rid].append(ev.token_id)
    for r, p, sp in zip(reqs, PROMPTS, sps):
        assert got[r.rid] == _reference(lf, p, method, sp), p
    assert got["plain"] == lf.generate("proxy-a", [PROMPTS[0]], sps[0])[0].token_ids
    assert kinds >= ({"one", "several", "forget"} if temperature else {"one", "several"})
    ids = lf.pool.get("base-large").tokenizer(PROMPTS[1]).input_ids  # a token-id prompt means the same text
    assert lf.generate("proxy-a", [ids], sps[1], fusion_params)[0].token_ids == got[reqs[1].rid]


def test_cross_tokenizer_limits_are_clear(lf):
    assert lf.requests("dlf-ab", "one", None, {"experts": ["xa"]})[0].plan.experts[0].cross  # DLF takes them
    with pytest.raises(InvalidRequest, match="without speculative"):
        lf.requests("proxy-a", "one", None, {"experts": ["xa"], "speculative": {"k": 2}})
    with pytest.raises(InvalidRequest, match="sharing the base's tokenizer"):  # nor through the library wrapper
        SpeculativeEFT(lf, k=2).generate(lf.requests("proxy-a", "one", None, {"experts": ["xa"]}))
    with pytest.raises(InvalidRequest, match="cross_tokenizer: true"):  # a mismatch not declared stays an error
        lf.engine.check(lf.requests("proxy-a", "one", None, {"experts": ["alien"]})[0])


def test_the_bases_special_tokens_add_no_text_for_the_expert(lf):
    """An end token generated past (ignore_eos, min_tokens) reaches the expert as no text, not as "</s>"."""
    tok = lf.pool.get("base-large").tokenizer
    words = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    seq = SimpleNamespace(req=SimpleNamespace(prompts={"base-large": tok("the red city").input_ids},
                                              plan=SimpleNamespace(base="base-large")),
                          generated=words(" one two") + [tok.eos_token_id] + words(" three"))
    assert tok.decode(seq.generated).count("</s>") == 1
    assert generated_text(tok, seq) == " one two three"
