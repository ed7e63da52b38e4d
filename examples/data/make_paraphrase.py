"""Generate the quickstart's sentence-pair data: does sentence2 say the same thing as sentence1?

A small, MRPC-shaped paraphrase task built from templates, so it needs no download and its
licence is ours. Each event (who, did what, to what, where, when) is written twice. A positive
pair rewords the same event (synonyms, active/passive, moved phrases); a negative pair rewords an
event that differs in exactly one detail, so the model must read both sentences closely.

    python examples/data/make_paraphrase.py   # rewrites train.csv and validation.csv beside it
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

PEOPLE = [
    "Alice",
    "Bob",
    "the mayor",
    "the committee",
    "Dr. Chen",
    "the company",
    "Maria",
    "the coach",
    "the board",
    "our neighbour",
    "the minister",
    "the students",
    "Omar",
    "the union",
    "Priya",
    "the bank",
]
# (base form, past tense variants with the same meaning, passive participle)
ACTIONS = [
    (["bought", "purchased", "acquired"], "bought"),
    (["sold", "sold off", "got rid of"], "sold"),
    (["approved", "signed off on", "endorsed"], "approved"),
    (["rejected", "turned down", "refused"], "rejected"),
    (["repaired", "fixed", "mended"], "repaired"),
    (["announced", "made public", "revealed"], "announced"),
    (["cancelled", "called off", "scrapped"], "cancelled"),
    (["built", "constructed", "put up"], "built"),
]
THINGS = [
    (["the old bridge", "the aging bridge"]),
    (["a new car", "a brand-new car"]),
    (["the budget", "the spending plan"]),
    (["the contract", "the agreement"]),
    (["the concert", "the show"]),
    (["the factory", "the plant"]),
    (["the proposal", "the plan"]),
    (["the house", "the home"]),
    (["the software update", "the update"]),
    (["the merger", "the deal"]),
]
PLACES = ["in Paris", "in the city centre", "near the river", "in Boston", "at the harbour", "in the north"]
TIMES = ["on Monday", "last week", "in March", "yesterday", "on Friday", "last year"]


def realize(rng: random.Random, who: str, action: int, thing: int, place: str, when: str) -> str:
    verbs, participle = ACTIONS[action]
    obj = rng.choice(THINGS[thing])
    if rng.random() < 0.3:  # passive voice
        core = f"{obj[0].upper()}{obj[1:]} was {participle} by {who}"
    else:
        core = f"{who[0].upper()}{who[1:]} {rng.choice(verbs)} {obj}"
    extras = [place, when]
    rng.shuffle(extras)
    if rng.random() < 0.5:
        return (
            f"{extras[0][0].upper()}{extras[0][1:]}, {core[0].lower() if core[0] == 'T' else core[0]}{core[1:]} "
            f"{extras[1]}."
        )
    return f"{core} {extras[0]} {extras[1]}."


def changed(rng: random.Random, event: tuple[str, int, int, str, str]) -> tuple[str, int, int, str, str]:
    who, action, thing, place, when = event
    slot = rng.randrange(5)
    if slot == 0:
        who = rng.choice([p for p in PEOPLE if p != who])
    elif slot == 1:
        action = rng.choice([a for a in range(len(ACTIONS)) if a != action])
    elif slot == 2:
        thing = rng.choice([t for t in range(len(THINGS)) if t != thing])
    elif slot == 3:
        place = rng.choice([p for p in PLACES if p != place])
    else:
        when = rng.choice([t for t in TIMES if t != when])
    return who, action, thing, place, when


def make(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        event = (
            rng.choice(PEOPLE),
            rng.randrange(len(ACTIONS)),
            rng.randrange(len(THINGS)),
            rng.choice(PLACES),
            rng.choice(TIMES),
        )
        positive = rng.random() < 0.6  # MRPC is about two thirds positive
        other = event if positive else changed(rng, event)
        rows.append(
            {
                "sentence1": realize(rng, *event),
                "sentence2": realize(rng, *other),
                "label": "equivalent" if positive else "not_equivalent",
            }
        )
    return rows


def main() -> None:
    here = Path(__file__).parent / "paraphrase"
    rng = random.Random(20261127)
    for split, n in (("train", 800), ("validation", 200)):
        with (here / f"{split}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["sentence1", "sentence2", "label"])
            w.writeheader()
            w.writerows(make(rng, n))


if __name__ == "__main__":
    main()
