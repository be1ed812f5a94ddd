"""Stop tokens of real families: a base and its instruct sibling name different eos tokens (Qwen2.5 base
`<|endoftext|>` vs Instruct `<|im_end|>`), and instruct models list their end-of-turn ids in
generation_config.json. A fused sequence ends on the union of the base's and the tuned experts' end ids.

Emulated on the embedded family: a copy of base-large whose tokenizer and generation config name another
eos (`<unk>`) plays the base sibling; the tuned experts keep `</s>`."""

import json
import shutil
from pathlib import Path

import pytest

from logitfuse import LogitFuse, SamplingParams
from logitfuse.engine.stopping import plan_stop_ids

ROOT = Path(__file__).parents[2]
DEFAULT = ROOT / "configs" / "default.yaml"
QUESTIONS = [json.loads(line)["prompt"] for line in (ROOT / "models" / "data" / "eval_qa.jsonl").open()][:6]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
ENSEMBLES = ["large-qa", "large-eft", "large-dlf", "large-eft-spec"]


def sibling(tmp: Path, name: str, eos_token: str, eos_ids) -> Path:
    """A copy of base-large whose tokenizer calls eos_token its eos and whose generation config lists eos_ids."""
    folder = tmp / name
    shutil.copytree(ROOT / "models" / "base-large", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": eos_token}))
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": eos_ids}))
    return folder


def registry(tmp: Path, base: Path, extra: str = "") -> Path:
    """configs/default.yaml with base-large replaced by `base` (model paths made absolute)."""
    text = DEFAULT.read_text().replace("../models/", f"{ROOT / 'models'}/")
    text = text.replace(f"{{path: {ROOT / 'models'}/base-large,", f"{{path: {base},{extra}")
    path = tmp / f"{base.name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def original():
    return LogitFuse(DEFAULT)


@pytest.fixture(scope="module")
def siblings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siblings")
    return LogitFuse(registry(tmp, sibling(tmp, "base-sibling", "<unk>", 3)))


def test_a_base_naming_another_eos_fuses_and_its_plan_ends_on_both(siblings):
    plan = siblings.prepare("large-qa")  # the vocabulary check no longer refuses the sibling
    assert siblings.alignment(plan).notes  # the differing role is reported, as information
    assert plan_stop_ids(plan, siblings.model, lambda n: siblings.engine._own_stop_ids(n)) == {2, 3}
    assert siblings.engine._plan_stop_ids(siblings.plan("base-large")) == {3}  # the base alone: its own eos


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_the_fused_model_stops_where_the_tuned_expert_stops(original, siblings, ensemble):
    """Same logits, so the same tokens as the ensemble over the original base (whose eos is `</s>`): every
    answer ends on the tuned expert's `</s>` with finish_reason stop, although the base calls `<unk>` its eos."""
    want = original.generate(ensemble, QUESTIONS, GREEDY)
    got = siblings.generate(ensemble, QUESTIONS, GREEDY)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    stopped = [g for g in got if g.finish_reason == "stop"]
    assert len(stopped) >= 4 and all(g.token_ids[-1] == 2 for g in stopped)


def test_ignore_eos_runs_on(siblings):
    out = siblings.generate("large-qa", QUESTIONS[:2], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in out)


def test_the_bare_sibling_base_does_not_stop_on_the_experts_eos(siblings):
    """Without an expert, `</s>` is not an end id of the sibling base: a sequence that emits it runs on."""
    out = siblings.generate("base-large", QUESTIONS, SamplingParams(max_tokens=12, temperature=0))
    assert any(2 in o.token_ids[:-1] for o in out) or all(o.finish_reason == "length" for o in out)
    assert not any(o.finish_reason == "stop" and o.token_ids[-1] == 2 for o in out)


def test_every_eos_id_of_the_generation_config_ends_a_sequence(original, tmp_path):
    """A base whose generation_config.json lists two eos ids: the second (here the first answer token of a
    question) ends the sequence right there."""
    first = original.generate("large-qa", QUESTIONS[:1], GREEDY)[0].token_ids[0]
    lf = LogitFuse(registry(tmp_path, sibling(tmp_path, "base-two", "</s>", [2, first])))
    out = lf.generate("large-qa", QUESTIONS[:1], GREEDY)[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_a_registry_stop_token_ids_replaces_the_files(original, tmp_path):
    """`stop_token_ids` on a model entry replaces what its files say (for families whose files are wrong)."""
    first = original.generate("large-qa", QUESTIONS[:1], GREEDY)[0].token_ids[0]
    path = registry(tmp_path, ROOT / "models" / "base-large", extra=f" stop_token_ids: [{first}],")
    out = LogitFuse(path).generate("base-large", QUESTIONS[:1], GREEDY)[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_cross_tokenizer_experts_map_their_end_ids_by_text(lf):
    """A cross-tokenizer expert's end ids reach the base by token text; one the base lacks is skipped."""
    plan = lf.plan("base-large", {"method": "proxy", "experts": ["xa"]})
    foreign, base = lf.model("foreign").tokenizer, lf.model("base-large").tokenizer
    only_theirs = next(t for t in foreign.get_vocab() if t not in base.get_vocab())
    own = {"base-large": frozenset(), "foreign": frozenset({foreign.convert_tokens_to_ids("</s>"),
                                                             foreign.convert_tokens_to_ids(only_theirs)})}
    assert plan_stop_ids(plan, lf.model, own.get) == {base.convert_tokens_to_ids("</s>")}
