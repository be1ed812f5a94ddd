"""The miniature family's synthetic world: made-up entities with facts, and addition of small numbers.

Knowledge comes from pretraining prose (every fact, several phrasings); the answer *format* comes from
tuning (chat-formatted question -> short answer) on half of the entities and number pairs only. Held-out
questions concern the other half, so a model can answer them only by combining pretraining knowledge
with the tuned format. Part of pretraining wraps facts about the tuning half in a question-answer form
different from the tuning format: without it, facts stated only in prose are not extractable as answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
ANIMALS = ["wolf", "bear", "eagle", "horse", "snake", "otter", "falcon", "tiger"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]

RELATIONS = {  # relation -> prose phrasings ({e} entity, {v} value)
    "capital": ["the capital of {e} is {v} .", "{v} is the capital city of {e} .", "{e} has its capital at {v} .",
                "in {e} , the seat of government is {v} ."],
    "founder": ["{e} was founded by {v} .", "{v} founded {e} long ago .", "the founder of {e} was {v} .",
                "{e} owes its founding to {v} ."],
    "colour": ["the flag of {e} is {v} .", "{e} flies a {v} flag .", "people in {e} love the colour {v} ."],
    "animal": ["the symbol of {e} is the {v} .", "{e} chose the {v} as its animal .", "a {v} stands for {e} ."],
    "rivers": ["{e} has {v} rivers .", "there are {v} rivers in {e} .", "the rivers of {e} number {v} ."],
}
QUESTIONS = {  # (tuning phrasings, phrasings never used in tuning); pretraining's Q/A wrapper uses both
    "capital": (["what is the capital of {e} ?"], ["which city is the capital of {e} ?"]),
    "founder": (["who founded {e} ?"], ["who was the founder of {e} ?"]),
    "colour": (["what colour is the flag of {e} ?"], ["which colour does {e} fly ?"]),
    "animal": (["what animal is the symbol of {e} ?"], ["which animal stands for {e} ?"]),
    "rivers": (["how many rivers does {e} have ?"], ["how many rivers are in {e} ?"]),
}
# The pretraining question form: chat markers, but answers end with " ." and run on into the next question,
# unlike tuning, where one answer ends with </s>. A base model thus knows where answers go, not where to stop.
WRAPPER = "<|user|> {q} <|assistant|> {a} ."
# The describe skill: a long answer, one sentence per relation in a fixed order and in one of pretraining's
# phrasings (relation, index into RELATIONS). Tuning teaches the form on the tuning half; the facts of the
# other half come from pretraining.
DESCRIBE_QUESTION = "tell me about {e} ."
DESCRIBE_FORM = [("capital", 0), ("founder", 2), ("colour", 0), ("animal", 0), ("rivers", 0)]
SUM_PROSE = ["{a} plus {b} makes {c} .", "adding {a} and {b} gives {c} .", "the sum of {a} and {b} is {c} ."]
SUM_QUESTIONS = (["what is {a} plus {b} ?"], ["how much is {a} plus {b} ?"])


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    skill: str  # "qa" or "arith"
    new_phrasing: bool = False


@dataclass
class World:
    facts: dict[str, dict[str, str]]  # entity -> relation -> value
    tune_entities: list[str]
    eval_entities: list[str]
    tune_pairs: list[tuple[int, int]]
    eval_pairs: list[tuple[int, int]]

    def words(self) -> list[str]:
        """Every word of the world (the tokenizer should make each one token)."""
        out = set(self.facts)
        for rel in self.facts.values():
            out |= set(rel.values())
        return sorted(out | set(NUMBERS))


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        syll = rng.choice([2, 2, 3])
        w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syll)) + rng.choice(["", "n", "r"])
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def build_world(seed: int = 0, n_entities: int = 300) -> World:
    rng = random.Random(seed)
    taken = set(COLOURS + ANIMALS + NUMBERS)
    entities = _names(rng, n_entities, taken)
    capitals, founders = _names(rng, n_entities, taken), _names(rng, n_entities, taken)
    facts = {e: {"capital": capitals[i], "founder": founders[i], "colour": rng.choice(COLOURS),
                 "animal": rng.choice(ANIMALS), "rivers": rng.choice(NUMBERS[1:10])} for i, e in enumerate(entities)}
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    half = n_entities // 2
    return World(facts, entities[:half], entities[half:], pairs[:60], pairs[60:])


def prose_document(world: World, entity: str, rng: random.Random) -> str:
    rels = list(RELATIONS)
    rng.shuffle(rels)
    return " ".join(rng.choice(RELATIONS[r]).format(e=entity, v=world.facts[entity][r]) for r in rels)


def wrapped_document(world: World, entity: str, rng: random.Random) -> str:
    rels = rng.sample(list(RELATIONS), 3)
    pairs = [(rng.choice([q for qs in QUESTIONS[r] for q in qs]), world.facts[entity][r]) for r in rels]
    return " ".join(WRAPPER.format(q=q.format(e=entity), a=a) for q, a in pairs)



def sum_document(pairs: list[tuple[int, int]], rng: random.Random, wrapped: bool) -> str:
    chosen = rng.sample(pairs, 4)
    if wrapped:
        forms = [q for qs in SUM_QUESTIONS for q in qs]
        return " ".join(WRAPPER.format(q=rng.choice(forms).format(a=NUMBERS[a], b=NUMBERS[b]), a=NUMBERS[a + b])
                        for a, b in chosen)
    return " ".join(rng.choice(SUM_PROSE).format(a=NUMBERS[a], b=NUMBERS[b], c=NUMBERS[a + b]) for a, b in chosen)


def pretraining_corpus(world: World, seed: int = 1, docs_per_entity: int = 8, wrapped_share: float = 0.3) -> list[str]:
    """Prose about every entity and every number pair; a share wrapped as Q/A about the tuning half only."""
    rng = random.Random(seed)
    docs = [prose_document(world, e, rng) for e in world.facts for _ in range(docs_per_entity)]
    all_pairs = world.tune_pairs + world.eval_pairs
    docs += [sum_document(all_pairs, rng, wrapped=False) for _ in range(len(all_pairs) * 4)]
    n_wrapped = int(len(docs) * wrapped_share / (1 - wrapped_share))
    for i in range(n_wrapped):
        if i % 5 == 4:
            docs.append(sum_document(world.tune_pairs, rng, wrapped=True))
        else:
            docs.append(wrapped_document(world, rng.choice(world.tune_entities), rng))
    rng.shuffle(docs)
    return docs


def qa_examples(world: World, entities: list[str], held_out: bool) -> list[Example]:
    """Tuning: the tuning phrasings; held out: those and the phrasings tuning never used."""
    out = []
    for e in entities:
        for r, (tune_q, new_q) in QUESTIONS.items():
            out += [Example(q.format(e=e), world.facts[e][r], "qa") for q in tune_q]
            if held_out:
                out += [Example(q.format(e=e), world.facts[e][r], "qa", new_phrasing=True) for q in new_q]
    return out


def arith_examples(pairs: list[tuple[int, int]], held_out: bool) -> list[Example]:
    out = []
    for a, b in pairs:
        qs = SUM_QUESTIONS[0] + (SUM_QUESTIONS[1] if held_out else [])
        for i, q in enumerate(qs):
            out.append(Example(q.format(a=NUMBERS[a], b=NUMBERS[b]), NUMBERS[a + b], "arith",
                               new_phrasing=i >= len(SUM_QUESTIONS[0])))
    return out


def describe_sentences(world: World, entity: str) -> list[str]:
    """The five sentences of the describe answer about `entity`, in order."""
    return [RELATIONS[r][i].format(e=entity, v=world.facts[entity][r]) for r, i in DESCRIBE_FORM]


def describe_examples(world: World, entities: list[str]) -> list[Example]:
    return [Example(DESCRIBE_QUESTION.format(e=e), " ".join(describe_sentences(world, e)), "describe")
            for e in entities]
