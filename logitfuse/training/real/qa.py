"""The short-answer task of the real-model adapters: factual questions answered with the answer alone, then a stop.

Facts (relation, subject, answer) live in models/adapters/data/facts.tsv. A fixed-seed split keeps half of each
relation's subjects for tuning and the rest for evaluation only, so no evaluated fact is ever tuned on; every
other held-out question uses a phrasing that tuning never saw. Every role reads the same completion text
("Question: ...\\nAnswer:"); a role with a chat template gets it as the user's message.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

FACTS = Path(__file__).resolve().parents[3] / "models" / "adapters" / "data" / "facts.tsv"
TUNE_PHRASINGS = {
    "capital": ["What is the capital of {}?", "Which city is the capital of {}?"],
    "symbol": ["What is the chemical symbol for {}?", "Which chemical symbol stands for {}?"],
    "opposite": ["What is the opposite of {}?", "Which word means the opposite of {}?"],
    "author": ["Who wrote {}?", "Who is the author of {}?"],
    "country": ["In which country is {}?", "Which country is the city of {} in?"],
    "language": ["What language is spoken in {}?", "What is the main language of {}?"],
    "past": ["What is the past tense of {}?", "What is the simple past of the verb {}?"],
    "plural": ["What is the plural of {}?", "What is the plural form of {}?"],
    "young": ["What is a young {} called?", "What is the name for a baby {}?"],
}
HELD_OUT_PHRASINGS = {  # used only in evaluation
    "capital": "Name the capital city of {}.",
    "symbol": "Give the element symbol of {}.",
    "opposite": "Name a word opposite in meaning to {}.",
    "author": "Name the writer of {}.",
    "country": "Name the country where the city of {} lies.",
    "language": "Name the official language of {}.",
    "past": "Give the past tense form of the verb {}.",
    "plural": "Give the plural of the noun {}.",
    "young": "Name the young of the {}.",
}
TRAIN_SHARE = 0.5  # of each relation's facts; the rest are held out


@dataclass(frozen=True)
class QA:
    relation: str
    subject: str
    question: str
    answer: str
    phrasing: str  # "tuned" (a phrasing tuning used) or "held-out"

    @property
    def prompt(self) -> str:
        return prompt_text(self.question)


def prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def load_facts(path: Path = FACTS) -> list[tuple[str, str, str]]:
    with open(path, newline="") as f:
        return [(r["relation"], r["subject"], r["answer"]) for r in csv.DictReader(f, delimiter="\t")]


def split(facts: list[tuple[str, str, str]], seed: int = 0,
          train_share: float = TRAIN_SHARE) -> tuple[list[QA], list[QA]]:
    """Tuning questions (each train fact in both tuning phrasings) and held-out questions (each remaining fact
    once, alternating a tuning phrasing and the held-out one)."""
    unknown = sorted({f[0] for f in facts} - TUNE_PHRASINGS.keys())
    if unknown:
        raise ValueError(f"relations without phrasings: {', '.join(map(repr, unknown))} (add them to TUNE_PHRASINGS "
                         "and HELD_OUT_PHRASINGS)")
    rng = random.Random(seed)
    train, held = [], []
    for relation in TUNE_PHRASINGS:
        rows = [f for f in facts if f[0] == relation]
        rng.shuffle(rows)
        cut = round(len(rows) * train_share)
        for _, subject, answer in rows[:cut]:
            train += [QA(relation, subject, p.format(subject), answer, "tuned") for p in TUNE_PHRASINGS[relation]]
        for i, (_, subject, answer) in enumerate(rows[cut:]):
            unseen = i % 2 == 1
            template = HELD_OUT_PHRASINGS[relation] if unseen else TUNE_PHRASINGS[relation][i % 2]
            held.append(QA(relation, subject, template.format(subject), answer, "held-out" if unseen else "tuned"))
    return train, held


def write_jsonl(rows: list[QA], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[QA]:
    return [QA(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def exact_match(output: str, answer: str, stopped: bool) -> bool:
    """The answer alone (case and a final full stop aside), ended by a stop rather than the token limit."""
    return stopped and normalise(output) == normalise(answer)


def knows(output: str, answer: str) -> bool:
    """Knowledge regardless of form: the answer appears in the output as whole words ("The capital of France
    is Paris." knows Paris)."""
    words = re.findall(r"[\w'-]+", output.lower())
    want = re.findall(r"[\w'-]+", answer.lower())
    return any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))
