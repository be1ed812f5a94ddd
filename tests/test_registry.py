"""Registry validation and lookup."""

import pytest

from logitfuse.registry import Registry
from logitfuse.request import InvalidRequest, UnknownName


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_model_lists_what_is_available(lf):
    with pytest.raises(UnknownName, match="model 'nope' not found; available: proxy-a, eft-ab, dlf-ab, tq, base-large"):
        lf.registry.plan("nope")


def test_unknown_expert_in_override_is_a_404(lf):
    with pytest.raises(UnknownName, match="expert 'zzz' not found; available: a, b, pad, alien") as err:
        lf.registry.plan("proxy-a", {"experts": ["zzz"]})
    assert err.value.param == "fusion.experts"


def test_overrides_replace_ensemble_parameters(lf):
    plan = lf.registry.plan("eft-ab", {"method": "proxy", "alpha": 0.5, "experts": ["b"]})
    assert (plan.method, plan.coef, [e.name for e in plan.experts]) == ("proxy", (0.5,), ["b"])
    default = lf.registry.plan("eft-ab")
    assert default.coef == (0.5, 0.5)
    bare = lf.registry.plan("base-small")
    assert (bare.method, bare.base, bare.models()) == ("none", "base-small", ("base-small",))


def test_shared_untuned_model_runs_once(lf):
    assert lf.registry.plan("eft-ab").models() == ("base-large", "tuned-a", "base-small", "tuned-b")


def test_bad_parameters_name_the_field(lf):
    with pytest.raises(InvalidRequest) as err:
        lf.registry.plan("eft-ab", {"weights": [1.0]})
    assert err.value.param == "fusion.weights"
    with pytest.raises(InvalidRequest, match="tqstar needs 'baseline'"):
        lf.registry.plan("proxy-a", {"method": "tqstar"})
    with pytest.raises(InvalidRequest, match="grid"):
        lf.registry.plan("dlf-ab", {"grid": [0.0, 2.0, 0.0]})


def test_invalid_file_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"experts\.x\.untuned: unknown model 'missing'"):
        Registry.load(write(tmp_path, "models: {a: {path: a}}\nexperts: {x: {tuned: a, untuned: missing}}\n"))
    with pytest.raises(ValueError, match=r"ensembles\.e.*expert 'q' not found"):
        Registry.load(write(tmp_path, "models: {a: {path: a}}\nensembles: {e: {base: a, experts: [q]}}\n"))
    with pytest.raises(ValueError, match=r"models\.r: .*remote model needs 'tokenizer'"):
        Registry.load(write(tmp_path, "models: {r: {remote: {url: 'http://h/v1', model: m}}}\n"))
    with pytest.raises(ValueError, match=r"models\.a\.dtyp"):
        Registry.load(write(tmp_path, "models: {a: {path: a, dtyp: float16}}\n"))


def test_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    reg = Registry.load(write(tmp_path, "models: {a: {path: ./m}}\n"))
    assert reg.resolve_path("./m") == str(tmp_path / "m")
    assert reg.resolve_path("org/hub-model") == "org/hub-model"
