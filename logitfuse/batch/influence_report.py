"""`logitfuse influence OUT.jsonl`: what fusion changed over a `generate` run written with fusion.influence.

Per ensemble (a record's `model`): how often the fused distribution's most likely token differs from the
base's (`top[0]` against `base_top[0]`: with sampling the chosen token may be neither), that fraction by
position in the answer, and the tokens fusion chose most often where it changed the choice and with the
largest mean shift (`logprob - base_logprob`). Prints a plain table, writes the same numbers as JSON, and
draws the by-position curve with matplotlib (the `bench` extra) when asked.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 9), (10, 19), (20, None))  # positions, inclusive
TOP = 15


def bucket(position: int) -> str:
    """The label of a position's bucket: 0 to 4 alone, then 5-9, 10-19, 20+."""
    for lo, hi in BUCKETS:
        if hi is None or position <= hi:
            return str(lo) if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}"
    raise AssertionError("unreachable")


def changed(entry: dict) -> bool:
    """Whether fusion changed the greedy choice here: the fused argmax is not the base's."""
    fused = entry["top"][0]["token_id"] if entry.get("top") else entry["token_id"]
    base = entry["base_top"][0]["token_id"] if entry.get("base_top") else fused
    return fused != base


@dataclass
class Tally:
    """One ensemble's counts."""

    records: int = 0
    tokens: int = 0
    changed: int = 0
    by_position: dict[str, list[int]] = field(default_factory=lambda: {bucket(lo): [0, 0] for lo, _ in BUCKETS})
    by_token: dict[int, list] = field(default_factory=dict)  # chosen id -> [text, count, changes, sum of shifts]

    def add(self, entries: list[dict]) -> None:
        self.records += 1
        for pos, e in enumerate(entries):
            moved = changed(e)
            self.tokens += 1
            self.changed += moved
            cell = self.by_position[bucket(pos)]
            cell[0] += 1
            cell[1] += moved
            tok = self.by_token.setdefault(e["token_id"], [e["token"], 0, 0, 0.0, 0])
            tok[1] += 1
            tok[2] += moved
            if e.get("shift") is not None:  # null for a token outside a remote base's top N
                tok[3] += e["shift"]
                tok[4] += 1

    def report(self) -> dict:
        tokens = [{"token": t[0], "token_id": i, "count": t[1], "changes": t[2],
                   "mean_shift": t[3] / t[4] if t[4] else None} for i, t in self.by_token.items()]
        by_changes = sorted((t for t in tokens if t["changes"]), key=lambda t: (-t["changes"], -(t["mean_shift"] or 0)))
        by_shift = sorted((t for t in tokens if t["mean_shift"] is not None), key=lambda t: -t["mean_shift"])
        return {"records": self.records, "tokens": self.tokens, "changed": self.changed,
                "changed_fraction": self.changed / self.tokens if self.tokens else 0.0,
                "by_position": [{"position": k, "tokens": n, "changed": c, "changed_fraction": c / n if n else None}
                                for k, (n, c) in self.by_position.items()],
                "most_changed": by_changes[:TOP], "largest_shift": by_shift[:TOP]}


def entries_of(record: dict) -> list[list[dict]]:
    """A result record's influence lists: one flat, or one per choice (n > 1); none for an error record."""
    if "choices" in record:
        return [c["influence"] for c in record["choices"] if c.get("influence") is not None]
    return [record["influence"]] if record.get("influence") is not None else []


def summarise(path: Path) -> dict:
    """The report over one `generate` output file. Raises ValueError when no record carries influence."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    records = without = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
            if "error" in rec:
                continue
            records += 1
            lists = entries_of(rec)
            without += not lists
            for entries in lists:
                tallies[rec.get("model", "?")].add(entries)
    if not tallies:
        raise ValueError(f"{path}: no record carries influence (run `logitfuse generate` with --fusion "
                         "'{\"influence\": true}' or \"fusion\": {\"influence\": true} on the lines)")
    return {"file": str(path), "records": records, "records_without_influence": without,
            "ensembles": {name: t.report() for name, t in sorted(tallies.items())}}


def table(report: dict) -> str:
    """The report as plain text: per ensemble, the overall fraction, by position, and the two token lists."""
    out = []
    for name, r in report["ensembles"].items():
        out.append(f"{name}: fusion changed the base's greedy choice at {r['changed']} of {r['tokens']} tokens "
                   f"({r['changed_fraction']:.1%}) over {r['records']} answers")
        out.append("  position  tokens  changed")
        for p in r["by_position"]:
            frac = f"{p['changed_fraction']:.1%}" if p["tokens"] else "-"
            out.append(f"  {p['position']:>8}  {p['tokens']:>6}  {frac:>7}")
        for title, key in (("most changed", "most_changed"), ("largest mean shift", "largest_shift")):
            out.append(f"  {title}:")
            out.append(f"    {'token':<16} {'count':>5}  {'changes':>7}  {'mean shift':>10}")
            for t in r[key]:
                shift = "-" if t["mean_shift"] is None else f"{t['mean_shift']:+.3f}"
                text = json.dumps(t["token"], ensure_ascii=False)
                out.append(f"    {text:<16} {t['count']:>5}  {t['changes']:>7}  {shift:>10}")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """The by-position curve of every ensemble (matplotlib: the bench extra, checked by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in report["ensembles"].items():
        pts = [(p["position"], p["changed_fraction"]) for p in r["by_position"] if p["tokens"]]
        ax.plot([p for p, _ in pts], [f for _, f in pts], marker="o", label=name)
    ax.set_xlabel("position in the answer (tokens)")
    ax.set_ylabel("fused choice differs from the base's")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(output: Path, json_path: Path | None, plot_path: Path | None) -> int:
    try:
        report = summarise(output)
    except (OSError, ValueError) as err:
        print(f"logitfuse influence: {err}", file=sys.stderr)
        return 2
    print(table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if plot_path is not None:
        plot(report, plot_path)
    return 0
