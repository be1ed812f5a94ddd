"""The miniature family: the world is deterministic, evaluation never overlaps tuning, and every
committed model loads through transformers with one shared tokenizer and chat template."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from logitfuse.training.family import world as W
from logitfuse.training.family.train import chat_prompt

MODELS = Path(__file__).resolve().parents[2] / "models"
CAUSAL = ["base-large", "base-small", "tuned-small-qa", "tuned-small-arith", "tuned-large-qa", "tuned-large-arith",
          "tuned-small-desc"]


def test_world_and_corpus_are_deterministic():
    a, b = W.build_world(0), W.build_world(0)
    assert a.facts == b.facts and a.tune_pairs == b.tune_pairs
    assert W.pretraining_corpus(a, 1) == W.pretraining_corpus(b, 1)
    assert W.build_world(1).facts != a.facts


def test_evaluation_entities_and_pairs_are_never_tuned_or_wrapped():
    w = W.build_world(0)
    assert not set(w.tune_entities) & set(w.eval_entities)
    assert not set(w.tune_pairs) & set(w.eval_pairs)
    wrapped = [d for d in W.pretraining_corpus(w, 1) if d.startswith("<|user|>")]
    held = set(w.eval_entities)
    assert wrapped and not any(tok in held for d in wrapped for tok in d.split())
    tuned = W.qa_examples(w, w.tune_entities, held_out=False) + W.describe_examples(w, w.tune_entities)
    assert not any(e in (ex.question + " " + ex.answer).split() for ex in tuned for e in held)


@pytest.fixture(scope="module")
def tokenizers():
    return {n: AutoTokenizer.from_pretrained(MODELS / n) for n in [*CAUSAL, "reward"]}


def test_every_model_loads_and_shares_one_tokenizer(tokenizers):
    vocab = tokenizers["base-large"].get_vocab()
    for name, tok in tokenizers.items():
        assert tok.get_vocab() == vocab, name
        assert (tok.eos_token, tok.pad_token) == ("</s>", "<pad>")
    for name in CAUSAL:
        model = AutoModelForCausalLM.from_pretrained(MODELS / name)
        assert model.config.vocab_size == len(vocab)
    rm = AutoModelForSequenceClassification.from_pretrained(MODELS / "reward")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    w = W.build_world(0)
    tok = tokenizers["base-large"]
    assert all(len(tok(" " + x, add_special_tokens=False).input_ids) == 1 for x in w.words())


def test_chat_template_renders_the_tuning_format(tokenizers):
    tok = tokenizers["tuned-small-qa"]
    text = chat_prompt(tok, "who founded folon ?")
    assert text == "<|user|> who founded folon ? <|assistant|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "who founded folon ?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok(text).input_ids


def test_eval_files_are_well_formed():
    for name in ("qa", "arith"):
        rows = [json.loads(x) for x in (MODELS / "data" / f"eval_{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 80 and len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert r["prompt"] == f"<|user|> {r['question']} <|assistant|>" and r["answer"]
        assert any(r["new_phrasing"] for r in rows) and not all(r["new_phrasing"] for r in rows)


def test_describe_answers_are_pretraining_sentences_about_held_out_entities():
    """A describe answer is five sentences, each one pretraining states about the entity (so the base knows
    them), about an entity tuning never described."""
    w = W.build_world(0)
    rows = [json.loads(x) for x in (MODELS / "data" / "eval_describe.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [W.DESCRIBE_QUESTION.format(e=e) for e in w.eval_entities]
    corpus, stated = " ".join(W.pretraining_corpus(w, 1)), 0
    for r, e in zip(rows, w.eval_entities):
        parts = W.describe_sentences(w, e)
        assert r["answer"] == " ".join(parts) and r["prompt"] == f"<|user|> {r['question']} <|assistant|>"
        assert len(parts) == 5
        assert all(e in p.split() for p in parts)
        stated += sum(p in corpus for p in parts)
    assert stated / (5 * len(rows)) > 0.9  # prose picks a phrasing per fact and document at random (0.93)


def test_the_family_stays_small():
    real = MODELS / "real"  # converted real checkpoints (logitfuse fetch-real), ignored by git
    size = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file() and real not in p.parents)
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"  # the family ~19 MB, the real-model adapters ~7 MB
