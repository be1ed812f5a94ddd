"""The short-answer task's split and the adapter recipe (logitfuse/training/real): what bench/real.py's figures
rest on. The split is checked on the committed facts; the recipe's data mix on a tiny local model."""

import json
from collections import Counter
from pathlib import Path

import pytest

from logitfuse.training.real import qa
from logitfuse.training.real.qa import HELD_OUT_PHRASINGS, TUNE_PHRASINGS, load_facts, read_jsonl, split

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "models" / "adapters" / "data"


def test_no_evaluated_fact_is_tuned_on_and_half_the_held_out_questions_use_unseen_phrasings():
    facts = load_facts()
    tuning, held = split(facts)
    assert len(held) >= 300 and len({q.relation for q in held}) == len(TUNE_PHRASINGS)
    assert not {(q.relation, q.subject) for q in tuning} & {(q.relation, q.subject) for q in held}
    assert len(tuning) == 2 * (len(facts) - len(held))  # each tuning fact in both tuning phrasings
    unseen = [q for q in held if q.phrasing == "held-out"]
    assert abs(len(unseen) - len(held) / 2) <= len(TUNE_PHRASINGS)
    assert all(q.question == HELD_OUT_PHRASINGS[q.relation].format(q.subject) for q in unseen)
    tuned_texts = {q.question for q in tuning}
    assert all(q.question not in tuned_texts for q in held)
    # the committed files are this split
    assert read_jsonl(DATA / "heldout.jsonl") == held and read_jsonl(DATA / "tune.jsonl") == tuning


def test_a_relation_without_phrasings_is_refused_not_dropped(tmp_path):
    facts = tmp_path / "facts.tsv"
    facts.write_text("relation\tsubject\tanswer\ncapital\tFrance\tParis\nmotto\tFrance\tLiberty\n")
    with pytest.raises(ValueError, match="'motto'"):
        split(load_facts(facts))


def test_the_knowledge_preserving_mix_tunes_only_on_what_the_untuned_model_answers(family, tmp_path, monkeypatch):
    """--data known: exactly the tuning questions whose own greedy output holds the answer are tuned on."""
    pytest.importorskip("peft")
    from logitfuse.training.real import tune

    facts = tmp_path / "facts.tsv"
    facts.write_text("relation\tsubject\tanswer\n" + "".join(f"capital\tland{i}\tcity{i}\n" for i in range(10)))
    tuning, _ = split(load_facts(facts))
    asked = []

    def own(model, tok, questions, chat, **_):
        asked.extend(questions)
        return [f"It is {q.answer}." if i % 3 == 0 else "I do not know." for i, q in enumerate(questions)]

    monkeypatch.setattr(tune, "own_answers", own)
    log = tune.train(str(family["base-small"]), tmp_path / "known", chat=False, steps=2, batch=2, lr=1e-3, rank=2,
                     seed=0, facts=facts, data="known")
    assert asked == tuning
    assert log["tuning_questions_asked"] == len(tuning) and log["tuning_questions"] == len(range(0, len(tuning), 3))
    assert (tmp_path / "known" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "known" / "tune_log.json").read_text())["data"] == "known"
    everything = tune.train(str(family["base-small"]), tmp_path / "all", chat=False, steps=2, batch=2, lr=1e-3,
                            rank=2, seed=0, facts=facts, data="all")
    assert everything["tuning_questions"] == len(tuning)


def test_knows_and_exact_match_read_the_answer_as_whole_words():
    assert qa.knows("The capital of France is Paris.", "Paris")
    assert not qa.knows("Parisian food", "Paris")
    assert qa.knows("It was J. K. Rowling", "J. K. Rowling")
    assert qa.exact_match(" Paris.", "Paris", stopped=True) and not qa.exact_match(" Paris", "Paris", stopped=False)
    assert Counter(r for r, _, _ in load_facts()).keys() <= TUNE_PHRASINGS.keys()
