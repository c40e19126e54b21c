"""Regenerates reviews.jsonl, the embedded 2-class review-sentiment task with negation and contrast.

Written for peft_kernels (no external source; deterministic, seed 0). The label is the sentiment of
the sentence as a whole: a negation flips it ("was not great" is negative) and in "X, but Y" the
clause after "but" decides. Bag-of-words cues alone are therefore ambiguous on purpose: a frozen
sentence encoder with a linear head does noticeably worse than one whose layers adapt.
Run ``python generate_reviews.py`` in this folder.
"""
import json
import os
import random

LABELS = ["negative", "positive"]
THINGS = ["the soup", "the service", "the hotel room", "the movie", "the battery", "the camera", "the staff",
          "the concert", "the pizza", "the checkout process", "the seats", "the delivery", "the screen",
          "the coffee", "the ending", "the plot", "the manual", "the app", "the hike", "the museum tour"]
POS = ["great", "excellent", "wonderful", "delightful", "superb", "pleasant", "impressive", "fantastic"]
NEG = ["terrible", "awful", "disappointing", "horrible", "dreadful", "mediocre", "annoying", "poor"]


def clause(rng, positive: bool) -> str:
    """A clause whose meaning is ``positive``; half the time stated through a negation."""
    thing = rng.choice(THINGS)
    if rng.random() < 0.5:
        return f"{thing} was {rng.choice(POS if positive else NEG)}"
    neg = rng.choice(["was not", "was never", "was hardly", "was far from"])
    return f"{thing} {neg} {rng.choice(NEG if positive else POS)}"


def sentence(rng, positive: bool) -> str:
    kind = rng.random()
    if kind < 0.45:
        s = clause(rng, positive)
    elif kind < 0.85:  # contrast: the second clause decides
        s = f"{clause(rng, not positive)}, but {clause(rng, positive)}"
    else:
        verb = "would happily" if positive else "would never"
        s = f"honestly, {clause(rng, not positive)}; still, I {verb} come back"
    return s[0].upper() + s[1:] + "."


def main(n_per_class: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for label in (0, 1):
        seen = set()
        while len(seen) < n_per_class:
            text = sentence(rng, bool(label))
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reviews.jsonl")
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
