"""Structured outputs over fused scores: every sampled output follows its constraint (a JSON schema, a choice,
a regular expression) for every method, greedy decoding under a constraint that admits the unconstrained
greedy answer gives exactly that answer, and a grammar that cannot compile, or cannot be spelt by the
model's vocabulary, is refused before decoding."""

import json
import re

import pytest

pytest.importorskip("llguidance")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from logitfuse import LogitFuse, SamplingParams
from logitfuse.engine import grammar
from logitfuse.engine.output import CompletionOutput
from logitfuse.engine.request import StructuredSpec
from logitfuse.errors import InvalidRequest
from logitfuse.training.tiny import CHAT_TEMPLATE, build_model, corpus, save

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "integer", "minimum": 0, "maximum": 999},
    "city": {"enum": ["red", "blue", "north"]},
    "ok": {"type": "boolean"}},
    "required": ["answer", "city", "ok"], "additionalProperties": False}
CHOICES = ["red city", "blue king", "the north"]
REGEX = r"(red|blue|green) (city|king|river)( of the (north|south))?"


def json_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny BPE tokenizer that can spell JSON (the miniature family's cannot: no braces or quotes)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    lines = corpus() + [json.dumps({"answer": i * 7 % 1000, "city": c, "ok": i % 2 == 0})
                        for i, c in zip(range(300), ["red", "blue", "north"] * 100)]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def jlf(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonfamily")
    tok = json_tokenizer()
    paths = {"base-large": save(build_model(tok, 11, hidden=48, layers=3, scale=4.0), tok, root / "base-large"),
             "base-small": save(build_model(tok, 12, scale=4.0), tok, root / "base-small"),
             "tuned-a": save(build_model(tok, 13, scale=4.0), tok, root / "tuned-a")}
    cfg = root / "json.yaml"
    cfg.write_text("models:\n" + "".join(f"  {n}: {{path: {p}, dtype: float32}}\n" for n, p in paths.items()) + """
experts:
  a: {tuned: tuned-a, untuned: base-small}
ensembles:
  proxy-a: {base: base-large, method: proxy, experts: [a], alpha: 1.0}
  eft-a: {base: base-large, method: eft, experts: [a], beta: 1.0}
server: {memory_budget_mb: 512, max_batch: 16}
""")
    return LogitFuse(cfg)


def run(lf, model, prompt, sp, n=1, fusion=None):
    reqs = lf.requests(model, prompt, sp, fusion, n=n)
    done = {r.rid: CompletionOutput(r.rid) for r in reqs}
    for ev in lf.stream(reqs):
        done[ev.rid].add(ev)
    return [done[r.rid] for r in reqs]


@pytest.mark.parametrize("model", ["proxy-a", "eft-a"])
def test_100_seeded_samples_at_temperature_1_all_validate_against_the_schema(jlf, model):
    jsonschema = pytest.importorskip("jsonschema")
    sp = SamplingParams(max_tokens=48, temperature=1.0, seed=5,
                        structured=StructuredSpec("json", json.dumps(SCHEMA), "response_format"))
    outs = run(jlf, model, "the red city", sp, n=100)
    for o in outs:
        assert o.finish_reason == "stop", (o.text, o.error)
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 10  # sampled, not one forced answer
    free = run(jlf, model, "the red city", SamplingParams(max_tokens=48, temperature=1.0, seed=5), n=20)
    assert not any(o.text.startswith("{") and o.text.rstrip().endswith("}") for o in free)


def test_json_object_gives_an_object(jlf):
    sp = SamplingParams(max_tokens=60, temperature=1.0, seed=2, structured=StructuredSpec("json_object", ""))
    for o in run(jlf, "proxy-a", "one two", sp, n=10):
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:  # an open-ended object may run past max_tokens; what came is a prefix of an object
            assert o.finish_reason == "length" and o.text.startswith("{")


@pytest.mark.parametrize("model", ["proxy-a", "eft-ab", "dlf-ab", "tq", "base-large"])
def test_choice_outputs_are_always_one_of_the_choices_for_every_method(lf, model):
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=3,
                        structured=StructuredSpec("choice", json.dumps(CHOICES), "guided_choice"))
    outs = run(lf, model, "the red city", sp, n=12 if model != "tq" else 4)
    if model == "tq":  # its candidates are its baseline's top 4 tokens: a step where none is allowed ends the row
        assert all(o.text in CHOICES or "tqstar" in o.error for o in outs)
        return
    assert all(o.text in CHOICES and o.finish_reason == "stop" for o in outs), [(o.text, o.error) for o in outs]


def test_a_regex_always_matches(lf):
    sp = SamplingParams(max_tokens=24, temperature=1.0, seed=9,
                        structured=StructuredSpec("regex", REGEX, "guided_regex"))
    outs = run(lf, "eft-ab", "king queen", sp, n=30)
    assert all(re.fullmatch(REGEX, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 2


@pytest.mark.parametrize("model", ["proxy-a", "eft-ab"])
def test_greedy_under_a_constraint_admitting_the_greedy_answer_is_that_answer(lf, model):
    free = run(lf, model, "the red city", SamplingParams(max_tokens=8, temperature=0))[0]
    assert free.text and free.finish_reason == "length"
    for spec in (StructuredSpec("choice", json.dumps([free.text, "blue king"])),
                 StructuredSpec("regex", re.escape(free.text) + "( [a-z]+)*")):
        got = run(lf, model, "the red city", SamplingParams(max_tokens=8, temperature=0, structured=spec))[0]
        assert (got.text, got.token_ids) == (free.text, free.token_ids)
        # logprobs are the fused distribution's, as without a constraint
        lp = run(lf, model, "the red city", SamplingParams(max_tokens=8, temperature=0, structured=spec,
                                                         logprobs=2))[0]
        ref = run(lf, model, "the red city", SamplingParams(max_tokens=8, temperature=0, logprobs=2))[0]
        assert lp.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_refusals_name_the_field(lf, jlf):
    def check(lf, model, spec, **kw):
        req = lf.requests(model, "the red city", SamplingParams(max_tokens=8, structured=spec, **kw))[0]
        with pytest.raises(InvalidRequest) as err:
            lf.check(req)
        return err.value

    bad = check(lf, "proxy-a", StructuredSpec("regex", "(unclosed", "guided_regex"))
    assert bad.param == "guided_regex" and "cannot be compiled" in str(bad) and "unclosed" in str(bad)
    bad = check(lf, "proxy-a", StructuredSpec("json", '{"type": "nonsense"}', "response_format.json_schema.schema"))
    assert bad.param == "response_format.json_schema.schema" and "nonsense" in str(bad)
    # the miniature family's vocabulary has no `{`: no JSON can be spelt, refused before decoding
    bad = check(lf, "proxy-a", StructuredSpec("json_object", "", "response_format"))
    assert bad.param == "response_format" and "no token" in str(bad)
    spec = StructuredSpec("choice", json.dumps(CHOICES), "guided_choice")
    req = lf.requests("proxy-a", "the red city", SamplingParams(max_tokens=8, structured=spec),
                      {"speculative": {"k": 2}})[0]
    with pytest.raises(InvalidRequest, match="speculative") as err:
        lf.check(req)
    assert err.value.param == "guided_choice"
    with pytest.raises(InvalidRequest, match="ignore_eos"):
        SamplingParams(structured=spec, ignore_eos=True).check()


def test_a_schema_compiles_once_per_tokenizer(lf):
    tok = lf.pool.get("base-large").tokenizer
    spec = StructuredSpec("regex", "(one|two) (red|blue)")
    before = grammar.cached(tok)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=1, structured=spec)
    run(lf, "proxy-a", "one", sp, n=3)
    run(lf, "proxy-a", "two", sp, n=3)
    assert grammar.cached(tok) == before + 1


def test_a_cross_tokenizer_expert_follows_the_constrained_text(lf):
    """The constraint acts on the base's vocabulary; the foreign expert re-tokenizes what was generated."""
    sp = SamplingParams(max_tokens=24, temperature=1.0, seed=6, structured=StructuredSpec("regex", REGEX))
    outs = run(lf, "proxy-a", "king queen", sp, n=6, fusion={"experts": ["xa"], "alpha": 0.7})
    assert all(re.fullmatch(REGEX, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]


DEAD_REGEX = r"(red|blue) \{[a-z]+\}"  # the family's vocabulary spells "red " but has no `{`


@pytest.mark.parametrize("schema,needs", [({"type": "string"}, '"'), ({"type": "array"}, "["), (
    {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}, '{"answer": "')])
def test_a_grammar_whose_first_bytes_no_token_spells_is_refused_naming_them(lf, schema, needs):
    """llguidance computes such a first mask as if the forced bytes were taken: it allows tokens that the
    matcher then refuses (the check must try them, not only count them)."""
    spec = StructuredSpec("json", json.dumps(schema), "response_format.json_schema.schema")
    req = lf.requests("proxy-a", "the red city", SamplingParams(max_tokens=8, structured=spec))[0]
    with pytest.raises(grammar.GrammarDeadEnd) as err:
        lf.check(req)
    assert err.value.param == "response_format.json_schema.schema"
    assert f"must start with {needs!r}, which no token of base-large's vocabulary can produce" in str(err.value)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_reaching_a_dead_end_later_ends_its_rows_with_a_clear_error(lf, temperature):
    spec = StructuredSpec("regex", DEAD_REGEX, "guided_regex")
    sp = SamplingParams(max_tokens=12, temperature=temperature, seed=3, structured=spec)
    lf.check(lf.requests("eft-ab", "king queen", sp)[0])  # "red" and "blue" can start: admitted
    outs = run(lf, "eft-ab", "king queen", sp, n=3)
    for o in outs:
        assert o.finish_reason == "error" and o.text.rstrip() in ("red", "blue"), (o.text, o.error)
        needs = "'{'" if o.text.endswith(" ") else "' {'"  # the space too, where no token spelt it alone
        assert "GrammarDeadEnd: guided_regex:" in o.error and f"needs {needs} next" in o.error, o.error
        assert f"after {len(o.token_ids)} tokens ({o.text!r})" in o.error
    ok = run(lf, "eft-ab", "king queen", SamplingParams(max_tokens=4, temperature=0,
                                                         structured=StructuredSpec("regex", REGEX)))[0]
    assert ok.finish_reason in ("stop", "length") and not ok.error  # the engine goes on


def _keys(text: str) -> set[str]:
    return set(json.loads(text)) if text.endswith("}") else set()


OPEN_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
               "required": ["answer"]}


def test_disable_additional_properties_allows_only_the_schemas_keys(jlf):
    from logitfuse.engine.output_format import structured_spec

    def sample(flag):
        spec = structured_spec({"structured_outputs": {"json": OPEN_SCHEMA, "disable_additional_properties": flag}})
        sp = SamplingParams(max_tokens=24, temperature=1.0, seed=11, structured=spec)
        return run(jlf, "proxy-a", "the red city", sp, n=40)

    closed, free = sample(True), sample(False)
    assert all(o.finish_reason == "stop" and _keys(o.text) == {"answer"} for o in closed), [o.text for o in closed]
    extra = [o.text for o in free if ', "' in o.text]  # a second key begun
    assert len(extra) >= 5, [o.text for o in free]


def test_the_json_options_reach_the_grammar(jlf):
    """disable_additional_properties closes nested objects too; disable_any_whitespace leaves no blank."""
    from logitfuse.engine.output_format import structured_spec

    tok = jlf.pool.get("base-large").tokenizer
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    lt = grammar.ll_tokenizer(tok, len(tok))
    for flag, text, taken in ((True, '{"a": {"b": 1, "c": 2}}', False), (False, '{"a": {"b": 1, "c": 2}}', True),
                              (True, '{"a": {"b": 1}}', True)):
        spec = structured_spec({"structured_outputs": {"json": nested, "disable_additional_properties": flag}})
        m = grammar.compile_spec(spec, tok, len(tok))
        ids = lt.tokenize_str(text)
        assert (m.validate_tokens(ids) == len(ids)) is taken, (flag, text)
    spec = structured_spec({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    sp = SamplingParams(max_tokens=48, temperature=1.0, seed=5, structured=spec)
    outs = run(jlf, "proxy-a", "the red city", sp, n=10)
    assert all(o.finish_reason == "stop" and " " not in o.text and json.loads(o.text) for o in outs)
    spaced = run(jlf, "proxy-a", "the red city", SamplingParams(max_tokens=48, temperature=1.0, seed=5,
                 structured=StructuredSpec("json", json.dumps(SCHEMA))), n=10)
    assert all('": ' in o.text for o in spaced)


def test_guided_decoding_backend_options_are_vllms_older_spelling_of_the_json_options():
    from logitfuse.engine.output_format import structured_spec

    both = structured_spec({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True,
                                                   "disable_additional_properties": True}})
    old = structured_spec({"guided_json": SCHEMA,
                           "guided_decoding_backend": "guidance:disable-any-whitespace,no-additional-properties"})
    assert old.spec == both.spec and json.loads(old.spec)["x-guidance"]["item_separator"] == ","
    plain = structured_spec({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar:no-fallback"})
    assert json.loads(plain.spec) == SCHEMA
    open_schema = structured_spec({"guided_json": OPEN_SCHEMA, "guided_decoding_backend": "guidance"})
    assert "additionalProperties" not in json.loads(open_schema.spec)
    closed = structured_spec({"structured_outputs": {"json": OPEN_SCHEMA, "disable_additional_properties": True}})
    assert json.loads(closed.spec)["additionalProperties"] is False
    with pytest.raises(InvalidRequest) as err:
        structured_spec({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar:compact"})
    assert err.value.param == "guided_decoding_backend" and "compact" in str(err.value)


def test_the_first_allowed_tokens_of_a_packed_mask():
    import torch

    from logitfuse.ops.penalties import bitmask_to_bool

    gen = torch.Generator().manual_seed(0)
    for density in (0.001, 0.05, 0.9):
        allowed = torch.rand(1, 1000, generator=gen) < density
        allowed[0, 31] = density > 0.5  # bit 31: the sign bit of its int32 word
        words = torch.zeros(1, 32, dtype=torch.int64)
        for t in allowed[0].nonzero().flatten().tolist():
            words[0, t // 32] |= 1 << (t % 32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)[0]  # (W,) as llguidance packs
        assert bitmask_to_bool(words[None], 1000).equal(allowed)
        want = allowed[0].nonzero().flatten().tolist()
        assert grammar._first_allowed(words, 8) == want[:8] and len(want) > 0
