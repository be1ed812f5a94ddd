"""Registry validation and lookup."""

import pytest

from logitfuse.config.registry import Registry
from logitfuse.errors import InvalidRequest, UnknownName


def write(tmp_path, text, folders=("a", "m")):
    """The registry file, beside model folders that exist (a config.json each)."""
    for name in folders:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text("{}")
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
    reg = Registry.load(write(tmp_path, "models: {a: {path: ./m}}\n"))
    assert reg.resolve_path("./m") == str(tmp_path / "m")
    assert reg.resolve_path("org/hub-model") == "org/hub-model"


BAD = """
models:
  a: {path: a}
  gone: {path: ../nowhere/base-smal}
  hub: {path: org/not-a-cached-model}
  typo: {path: a, dtyp: float16}
  noconf: {path: empty}
  placed: {path: a, dtype: fp8, device: gpu}
experts:
  good: {tuned: a, untuned: a}
  broken: {tuned: typo, untuned: a}
ensembles:
  fine: {base: a, experts: [good]}
  uses-broken: {base: a, experts: [broken]}
  unknown-expert: {base: a, experts: [nobody]}
  bad-method: {base: a, method: proxi, experts: [good]}
server: {on_bad_entry: %s}
"""


def test_every_bad_entry_is_reported_at_once_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as err:
        Registry.load(write(tmp_path, BAD % "refuse"))
    lines = str(err.value).splitlines()
    assert lines[0].endswith("9 bad entries:")
    text = str(err.value)
    assert f"models.gone.path: no such folder {(tmp_path.parent / 'nowhere' / 'base-smal').resolve()}" in text
    assert "models.hub.path: " in text and "'org/not-a-cached-model' as a hub id is not in the local cache" in text
    assert "HF_HUB_OFFLINE" in text
    assert "models.typo.dtyp: unknown field 'dtyp'; did you mean 'dtype'?" in text
    assert f"models.noconf.path: no such file {tmp_path / 'empty' / 'config.json'}" in text
    assert "experts.broken.tuned: unknown model 'typo' (models.typo is a bad entry)" in text
    assert "ensembles.uses-broken: expert 'broken' not found" in text and "(experts.broken is a bad entry)" in text
    assert "ensembles.unknown-expert: expert 'nobody' not found; available: good" in text
    assert "ensembles.bad-method.method: Input should be 'none', 'proxy'" in text
    assert "models.placed.dtype: must be one of auto, float32, float16, bfloat16, got 'fp8'" in text
    assert "models.placed.device: must be auto, cpu, mps, cuda or cuda:N, got 'gpu'" in text
    assert "ensembles.fine" not in text and "models.a" not in text


def test_skip_serves_the_good_entries_and_keeps_the_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    reg = Registry.load(write(tmp_path, BAD % "skip"))
    assert reg.names() == ["fine", "a"] and list(reg.experts) == ["good"]
    assert sorted(reg.skipped) == sorted(["models.gone", "models.hub", "models.typo", "models.noconf", "models.placed",
                                          "experts.broken", "ensembles.uses-broken", "ensembles.unknown-expert",
                                          "ensembles.bad-method"])
    assert reg.skipped["models.gone"].startswith("models.gone.path: no such folder ")
    assert reg.plan("fine").experts[0].name == "good"


def test_a_file_that_cannot_be_read_says_why(tmp_path):
    with pytest.raises(ValueError, match=f"no such config file {tmp_path / 'nope.yaml'}"):
        Registry.load(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="invalid YAML in"):
        Registry.load(write(tmp_path, "models: {a: [\n"))
    with pytest.raises(ValueError, match="the file must be a mapping"):
        Registry.load(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match=r"modles: unknown section .*\n.*models: missing"):
        Registry.load(write(tmp_path, "modles: {a: {path: a}}\n"))
    with pytest.raises(ValueError, match=r"server\.on_bad_entry: Input should be 'refuse' or 'skip'"):
        Registry.load(write(tmp_path, "models: {a: {path: a}}\nserver: {on_bad_entry: ignore}\n"))
