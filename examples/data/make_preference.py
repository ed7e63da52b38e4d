"""Generate the preference quickstart's data: pairs of answers to a support message, one preferred.

The chat quickstart (make_chat.py) teaches a model to route a customer support message as
`TEAM / PRIORITY`. Since its data was written, the support organisation changed one rule:

- every account-security message (someone else using the account, a locked account, a sign-in from
  an unknown place or device, a password or email address changed by someone else, two-factor codes
  that never arrive...) is now `account / urgent`, even when the customer is calm ("no rush"). A
  model tuned on the old data answers `account / normal` to those.

Each example is a preference pair in TRL's conversational format with an explicit prompt: the system
message and the customer's message (`prompt`), the preferred answer (`chosen`) and a worse one
(`rejected`). Half the pairs (alternating) are calm security messages, `account / urgent` over
`account / normal`; the other half are ordinary messages of every team (a quarter of them urgent),
answered by the old rules over a plausible mistake: mostly a calm message called urgent (the mistake
the new rule invites) or an urgent one sent to another team, sometimes the other kind of mistake,
so that the model learns the new rule without forgetting the old ones. Messages come from
make_chat.py's templates and helpers plus a few new security templates; no message appears twice,
in both files, or in ticket-routing/validation.jsonl (the chat quickstart's held-out set).

    python examples/data/make_preference.py   # rewrites ticket-preferences/train.jsonl and validation.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_chat import CALM, GREETINGS, PROBLEMS, SIGNOFFS, SYSTEM, URGENT, fill

#: make_chat's account problems that are about security, and new ones in the same voice.
SECURITY = [t for t in PROBLEMS["account"] if any(k in t for k in ("locked", "someone else", "two-factor"))] + [
    "Someone signed in to my account from {city}, and it wasn't me.",
    "Someone changed the password of my account and it wasn't me.",
    "The email address on my account was changed to {email} without my permission.",
    "An unknown {device} is signed in to my account.",
    "Someone has been placing orders from my account, and it wasn't me.",
    "My account is locked and the unlock link doesn't work.",
    "I keep getting two-factor codes for my account that I never asked for.",
    "I got an email saying the password of my account was changed, but I didn't change it.",
]
#: make_chat's other account problems (account details), minus the bare "can't log in", which could be either.
ACCOUNT_DETAILS = [t for t in PROBLEMS["account"] if t not in SECURITY and "can't log in to" not in t]
ORDINARY = {team: ACCOUNT_DETAILS if team == "account" else templates for team, templates in PROBLEMS.items()}
TEAMS = sorted(PROBLEMS)


def message(rng: random.Random, problem: str, remark: str) -> str:
    """A greeting, the problem, the remark (before or after it) and a sign-off, as make_chat.py writes them."""
    parts = [rng.choice(GREETINGS), fill(rng, problem)]
    if remark and rng.random() < 0.3:
        parts.insert(1, remark)
    else:
        parts.append(remark)
    parts.append(fill(rng, rng.choice(SIGNOFFS)))
    return " ".join(part for part in parts if part)


def pair(rng: random.Random, security: bool) -> dict[str, list[dict[str, str]]]:
    if security:  # a calm security message: the new rule
        text = message(rng, rng.choice(SECURITY), rng.choice(CALM) if rng.random() < 0.7 else "")
        chosen, rejected = "account / urgent", "account / normal"
    else:  # an ordinary message: the old rules, against a plausible mistake
        team = rng.choice(TEAMS)
        urgent = rng.random() < 0.25
        remark = rng.choice(URGENT) if urgent else (rng.choice(CALM) if rng.random() < 0.7 else "")
        text = message(rng, rng.choice(ORDINARY[team]), remark)
        priority = "urgent" if urgent else "normal"
        chosen = f"{team} / {priority}"
        # Mostly a calm message called urgent (the new rule's over-reach) or an urgent one sent to another team.
        if rng.random() < (0.1 if urgent else 0.9):
            rejected = f"{team} / {'normal' if urgent else 'urgent'}"
        else:
            rejected = f"{rng.choice([t for t in TEAMS if t != team])} / {priority}"
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def main() -> None:
    here = Path(__file__).parent
    out = here / "ticket-preferences"
    out.mkdir(exist_ok=True)
    with (here / "ticket-routing" / "validation.jsonl").open() as f:  # the chat quickstart's held-out messages
        seen = {json.loads(line)["messages"][1]["content"] for line in f}
    rng = random.Random(20261203)
    for split, n in (("train", 240), ("validation", 48)):
        rows = []
        while len(rows) < n:
            row = pair(rng, security=len(rows) % 2 == 0)  # alternating: half of each split
            text = row["prompt"][1]["content"]
            if text not in seen:  # no message twice, none in both splits or in ticket-routing's validation
                seen.add(text)
                rows.append(row)
        with (out / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
