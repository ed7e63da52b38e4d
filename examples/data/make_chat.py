"""Generate the chat quickstart's data: route a customer support message to a team and a priority.

A small chat dataset built from templates, so it needs no download and its licence is ours. Each
example is a conversation: a short system message, a customer's message (greeting, one problem,
maybe a remark, maybe a sign-off) and the assistant's answer in a fixed format, `TEAM / PRIORITY`:

- TEAM is what the problem is about: billing (charges, invoices, payment methods), shipping (where
  an order is, delivery), returns (sending a product back or exchanging it, the refund for it),
  account (signing in, passwords, account details) or technical (the app or the website misbehaves).
- PRIORITY is `urgent` when the message says it is (asks for a fix now, says work is blocked),
  otherwise `normal`; polite remarks ("no rush", "thanks in advance") are not urgency.

The answer is short and follows from the message alone, so it is scored by exact match. An instruct
model that was never taught this routing answers in prose instead, and scores close to 0.

    python examples/data/make_chat.py   # rewrites ticket-routing/train.jsonl and validation.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You route customer support messages."

PROBLEMS = {
    "billing": [
        "I was charged twice for order {order}.",
        "My invoice for {month} shows {amount}, but my plan costs less than that.",
        "The payment for my subscription failed even though my card is valid.",
        "Why is there an extra charge of {amount} on my card statement?",
        "Please send me a copy of the invoice for order {order}.",
        "I want to change the credit card that my monthly payment is taken from.",
        "I was billed {amount} in {month} although I had cancelled my plan.",
        "Can I pay by bank transfer instead of by card from next month on?",
    ],
    "shipping": [
        "My order {order} still hasn't arrived.",
        "The tracking for order {order} has shown no update since {day}.",
        "Can I change the delivery address for order {order}?",
        "The courier says order {order} was delivered, but nothing came.",
        "When will the {product} I ordered be shipped?",
        "My parcel has been stuck at the depot since {day}.",
        "Order {order} was supposed to arrive on {day} and there is still no sign of it.",
        "Do you deliver to {city}, and how long does it take?",
    ],
    "returns": [
        "The {product} I received is broken and I want to send it back.",
        "How do I return the {product} from order {order}?",
        "I'd like to exchange my {product} for a different size.",
        "The {product} doesn't match the description on the website, can I return it?",
        "I sent back the {product} on {day} and I still haven't got my money back.",
        "Can I get a return label for order {order}? The {product} is the wrong colour.",
        "I received two {product}s instead of one, where do I send the extra one?",
    ],
    "account": [
        "I can't log in to my account.",
        "I forgot my password and the reset email never arrives.",
        "Please change the email address on my account to {email}.",
        "My account was locked after too many sign-in attempts.",
        "How do I delete my account and all my data?",
        "I think someone else has been using my account.",
        "The two-factor code never reaches my phone, so I can't sign in.",
        "Please update the name on my profile to {name}.",
    ],
    "technical": [
        "The app crashes every time I open it on my {device}.",
        "I get error {code} when I try to save my settings.",
        "The website won't load on my {device}.",
        "Syncing between my {device} and the web version stopped working.",
        "The search page only shows a blank screen.",
        "Notifications stopped working after the last update.",
        "Uploading a photo fails with error {code} on my {device}.",
        "The dashboard takes minutes to load and then times out.",
    ],
}
URGENT = [
    "This is urgent.",
    "Please help ASAP!",
    "I need this fixed today.",
    "Our whole team is blocked until this is solved.",
    "I need an answer right now.",
    "This is costing us money every hour, please hurry.",
    "URGENT: please deal with this immediately.",
]
CALM = [
    "No rush.",
    "Whenever you get a chance.",
    "Thanks in advance.",
    "Just letting you know.",
    "I hope you can help.",
    "It's not a big deal, but I wanted to report it.",
]
GREETINGS = ["", "", "Hi,", "Hello,", "Hey there,", "Good morning,", "Dear support team,"]
SIGNOFFS = ["", "", "Thanks, {name}", "- {name}", "Regards, {name}", "Cheers, {name}"]

NAMES = ["Alice", "Bob", "Maria", "Omar", "Priya", "Chen", "Lena", "Tom", "Fatima", "Jonas", "Sofia", "Ravi"]
PRODUCTS = ["jacket", "kettle", "lamp", "backpack", "pair of shoes", "phone case", "desk chair", "blender", "headset"]
DEVICES = ["iPhone", "Android phone", "laptop", "tablet", "work computer", "Mac"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "last week", "the 3rd", "the 14th"]
CITIES = ["Norway", "Lisbon", "Canada", "Osaka", "Cape Town", "Iceland"]


def fill(rng: random.Random, template: str) -> str:
    name = rng.choice(NAMES)
    return template.format(
        order=f"#{rng.randrange(10000, 99999)}",
        amount=f"${rng.randrange(5, 300)}.{rng.randrange(100):02d}",
        month=rng.choice(MONTHS),
        day=rng.choice(DAYS),
        product=rng.choice(PRODUCTS),
        device=rng.choice(DEVICES),
        code=f"E{rng.randrange(100, 999)}",
        email=f"{name.lower()}{rng.randrange(1, 99)}@example.com",
        city=rng.choice(CITIES),
        name=name,
    )


def example(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    team = rng.choice(sorted(PROBLEMS))
    urgent = rng.random() < 0.4
    parts = [rng.choice(GREETINGS), fill(rng, rng.choice(PROBLEMS[team]))]
    remark = rng.choice(URGENT) if urgent else (rng.choice(CALM) if rng.random() < 0.6 else "")
    if remark and rng.random() < 0.3:  # the remark before the problem
        parts.insert(1, remark)
    else:
        parts.append(remark)
    parts.append(fill(rng, rng.choice(SIGNOFFS)))
    message = " ".join(part for part in parts if part)
    answer = f"{team} / {'urgent' if urgent else 'normal'}"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": message},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    here = Path(__file__).parent / "ticket-routing"
    here.mkdir(exist_ok=True)
    rng = random.Random(20261202)
    seen: set[str] = set()
    for split, n in (("train", 480), ("validation", 48)):
        rows = []
        while len(rows) < n:
            row = example(rng)
            message = row["messages"][1]["content"]
            if message not in seen:  # no message twice, and none in both splits
                seen.add(message)
                rows.append(row)
        with (here / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
