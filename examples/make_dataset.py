"""Generate the demo dataset: customer-support tickets triaged into JSON (seeded, so every run writes the same file).

Each row is a chat in the `messages` format (about 70 tokens):

    system     "Triage the ticket. Reply in JSON."
    user       a ticket written by a customer, e.g. "Hi, my toaster still has not arrived. I need this today."
    assistant  {"category": "late_delivery", "priority": "high", "summary": "The ordered toaster is late; second contact"}

`category` follows from the ticket's wording and `priority` from its urgency phrase (a ticket without one may be
`low` or `normal`), so the model can learn them; `summary` is assembled from randomly chosen paraphrases (subject,
predicate, trailing note), so part of every reply cannot be predicted from the ticket. That irreducible entropy is
what makes the train loss settle around 0.3-0.5 instead of falling towards 0 the way a purely deterministic
extraction task does, which is the healthy picture the demo wants to show: both losses fall and flatten, with
train a little below eval.

Usage: python examples/make_dataset.py [--rows 1000] [--seed 7] [--out examples/data/support_tickets.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "data" / "support_tickets.jsonl"
SYSTEM = "Triage the ticket. Reply in JSON."

PRODUCTS = ["kettle", "blender", "toaster", "headphones", "desk lamp", "backpack", "phone case", "coffee grinder",
            "water bottle", "keyboard", "monitor stand", "yoga mat", "rice cooker", "hair dryer", "smart plug"]

# category -> (ticket bodies, summary predicates); {p} is the product
ISSUES: dict[str, tuple[list[str], list[str]]] = {
    "damaged_item": (
        ["my {p} arrived broken.", "the {p} came with a cracked case.", "the {p} in my parcel is damaged."],
        ["arrived broken", "came damaged", "was damaged in transit", "showed up cracked", "is broken",
         "was delivered damaged", "arrived in pieces", "got damaged in shipping", "is cracked", "came broken"],
    ),
    "late_delivery": (
        ["my {p} still has not arrived.", "where is my {p}? It is two weeks late.", "the tracking for my {p} is stuck."],
        ["has not arrived", "is late", "is overdue", "is still in transit", "never showed up", "is delayed",
         "has not been delivered", "is stuck in shipping", "is running late", "is missing in transit"],
    ),
    "refund": (
        ["I returned the {p} and want my money back.", "please refund the {p} I sent back.",
         "I sent the {p} back but got no refund yet."],
        ["was returned, refund wanted", "needs a refund", "went back, refund pending", "is due a refund",
         "was sent back for a refund", "awaits a refund", "was returned unpaid", "needs its money back",
         "return needs refunding", "was returned, no refund yet"],
    ),
    "wrong_item": (
        ["I ordered a {p} but got something else.", "the box had the wrong item instead of my {p}.",
         "my {p} order came with another product."],
        ["was swapped for another item", "was not in the box", "was sent wrong", "got mixed up",
         "was replaced by the wrong item", "never came, wrong item did", "order was wrong", "was mis-shipped",
         "was substituted by mistake", "came as the wrong product"],
    ),
    "how_to": (
        ["how do I set up the {p}?", "the {p} manual is confusing, how does it work?", "how do I use the {p}?"],
        ["needs setup help", "is confusing to use", "needs instructions", "setup is unclear", "needs a how-to",
         "is hard to set up", "usage question", "needs a walkthrough", "needs usage help", "setup question"],
    ),
}
SUBJECTS = ["The {p}", "Their {p}", "Customer's {p}", "Their new {p}", "The ordered {p}", "Buyer's {p}"]
TAILS = ["", "", ".", "!", "; customer upset", "; second contact", "; photo attached", "; VIP customer",
         "; asks for a call", "; polite", "; via email", "; via chat"]
GREETINGS = ["Hi,", "Hello,", "Hey,", ""]
# urgency phrase -> priorities: explicit urgency is learnable, no urgency leaves the agent's call open
URGENCY = [("", ("low", "normal")), ("No rush.", ("low",)), ("This is urgent!", ("high",)),
           ("I need this today.", ("high",))]


def make_row(rng: random.Random) -> dict:
    """One ticket and its triage reply."""
    category = rng.choice(sorted(ISSUES))
    tickets, predicates = ISSUES[category]
    product = rng.choice(PRODUCTS)
    urgency, priorities = rng.choice(URGENCY)
    ticket = " ".join(x for x in (rng.choice(GREETINGS), rng.choice(tickets).format(p=product), urgency) if x)
    summary = f"{rng.choice(SUBJECTS).format(p=product)} {rng.choice(predicates)}{rng.choice(TAILS)}"
    reply = {"category": category, "priority": rng.choice(priorities), "summary": summary}
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ticket[0].upper() + ticket[1:]},
        {"role": "assistant", "content": json.dumps(reply)},
    ]}


def generate(rows: int, seed: int) -> list[dict]:
    """`rows` distinct rows from a seeded generator (duplicates are skipped so the split sees every row)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < rows:
        row = make_row(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def write(rows: list[dict], path: Path) -> None:
    """Write rows as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line: write the dataset and say where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="number of rows (default 1000)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSONL (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    write(generate(args.rows, args.seed), args.out)
    print(f"wrote {args.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
