"""The method table: one home per fusion method. Only logitfuse/methods/ (and the pure math) name a method;
every request field belongs to a method; the capability flags are what the registry and the engine enforce;
and a method added to the table runs through the registry-free path with nothing else touched."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from logitfuse import SamplingParams, methods
from logitfuse.config.specs import EnsembleSpec
from logitfuse.errors import InvalidRequest
from logitfuse.methods.base import FusionMethod, Scores, Step
from logitfuse.methods.params import FusionParams
from logitfuse.ops import fusion

ROOT = Path(__file__).parents[2]
HOMES = {"logitfuse/methods", "logitfuse/ops/fusion.py", "logitfuse/ops/weights.py"}
# string constants equal to a method name that mean something else there
NOT_METHODS = {("logitfuse/service/protocol.py", "none"): "tool_choice 'none'",
               ("logitfuse/service/error_handlers.py", "none"): "pydantic's type tag of None"}


def method_names_in(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in methods.NAMES]


def test_only_the_method_table_and_the_pure_math_name_a_method():
    found = []
    for folder in ("logitfuse", "service"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel == h or rel.startswith(h + "/") for h in HOMES):
                continue
            found += [(rel, line, name) for line, name in method_names_in(path) if (rel, name) not in NOT_METHODS]
    assert not found, f"method names outside logitfuse/methods/: {found}"
    # the scan sees what it is meant to: every method file names its method
    for name in methods.NAMES:
        assert any(v == name for _, v in method_names_in(ROOT / "logitfuse" / "methods" / f"{name}.py"))


def test_the_table_is_what_the_registry_accepts_in_its_order():
    assert methods.NAMES == ("none", "proxy", "eft", "dlf", "tqstar")
    assert FusionParams.model_fields["method"].annotation.__args__[0].__args__ == methods.NAMES
    assert EnsembleSpec.model_fields["method"].default == methods.DEFAULT
    with pytest.raises(InvalidRequest, match=r"fusion.method must be one of \('none', 'proxy'"):
        methods.get("magic")


def test_every_request_field_belongs_to_a_method():
    claimed = {f for m in methods.TABLE.values() for f in m.params}
    fields = set(FusionParams.model_fields) - {"method", "influence"}  # influence: a report, any method
    assert claimed == fields, (fields - claimed, claimed - fields)


@pytest.mark.parametrize("name", methods.NAMES)
def test_speculation_is_accepted_exactly_where_the_method_says(lf, name):
    extra = {"baseline": "tuned-a", "reward": "rm"} if name == "tqstar" else {}
    ask = {"method": name, "experts": ["a"], "speculative": {"k": 2}, **extra}
    if methods.TABLE[name].speculative:
        assert lf.registry.plan("proxy-a", ask).speculative.k == 2
    else:
        with pytest.raises(InvalidRequest, match="speculative decoding needs method 'proxy' or 'eft'") as err:
            lf.registry.plan("proxy-a", ask)
        assert err.value.param == "fusion.speculative"


@pytest.mark.parametrize("name", methods.NAMES)
def test_prompt_scoring_is_refused_exactly_where_the_method_says(lf, name):
    extra = {"baseline": "tuned-a", "reward": "rm"} if name == "tqstar" else {}
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=True)
    req = lf.requests("proxy-a", "the red city", sp, {"method": name, "experts": ["a"], **extra})[0]
    if methods.TABLE[name].prompt_scoring:
        lf.engine.check(req)
    else:
        with pytest.raises(InvalidRequest, match=f"not available for method {name}") as err:
            lf.engine.check(req)
        assert err.value.param == "echo"


@pytest.mark.parametrize("name", methods.NAMES)
def test_cross_tokenizer_experts_are_accepted_exactly_where_the_method_says(lf, name):
    if not methods.TABLE[name].needs_experts:
        return
    ask = {"method": name, "experts": ["xa"]}
    if methods.TABLE[name].cross_tokenizer:
        assert lf.registry.plan("proxy-a", ask).cross_models() == ("foreign", "foreign-small")
    else:
        with pytest.raises(InvalidRequest, match="cross-tokenizer experts work with proxy, eft, dlf"):
            lf.registry.plan("proxy-a", ask)


class AntiExpert(FusionMethod):
    """A method made for this test: proxy-tuning pushed away from the expert, `z_L - (z_S+ - z_S)`."""

    name = "anti"
    summary = "the base steered away from the expert"
    params = ("experts",)

    def combine(self, step: Step) -> Scores:
        tuned, untuned = step.experts()
        return fusion.proxy_tune(step.base, tuned, untuned, -torch.ones(len(step.plans), tuned.shape[1])), None

    def summarise(self, steps: list[dict]) -> dict | None:
        return {"method": self.name, "steps": len(steps)}


def test_a_method_added_to_the_table_runs_through_the_engine(lf, monkeypatch):
    """Dispatch goes through the table alone: a new entry fuses, samples and reports with no other change."""
    monkeypatch.setitem(methods.TABLE, "anti", AntiExpert())
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True)
    req = lf.requests("proxy-a", "the red city", sp)[0]
    req = replace(req, rid="anti-0", plan=replace(req.plan, method="anti"))
    events = [ev for ev in lf.engine.run([req]) if ev.token_id is not None]
    assert len(events) == 3
    generated: list[int] = []
    for ev in events:
        z = {n: lf.pool.get(n).prefill([p + generated])[1].double() for n, p in req.prompts.items()}
        want = torch.log_softmax(z["base-large"] - (z["tuned-a"] - z["base-small"]), -1)[0]  # float64 reference
        assert ev.token_id == int(want.argmax())
        assert ev.logprob == pytest.approx(float(want[ev.token_id]), abs=1e-4)
        generated.append(ev.token_id)
    assert methods.summarise(req.plan, [{}] * 3) == {"method": "anti", "steps": 3}
