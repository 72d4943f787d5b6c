"""Regenerate tuiwiz/demo/demo.jsonl (committed): `python -m tuiwiz.demo.make_demo`.

A small, deterministic, original (generated here) chat dataset in OpenAI messages layout,
shaped like real SFT data: most samples 100-600 tokens, a long tail of a few 2-4k-token
ones so p95 and p99 differ, about a third with a system prompt, a fifth multi-turn.
"""

from __future__ import annotations

import json
import random
import sys

from tuiwiz.demo import DEMO_DATASET

SEED = 20240611
N = 300
OUT = DEMO_DATASET

TOPICS = [
    ("sourdough bread", "baking"), ("a home network", "networking"), ("binary search", "algorithms"),
    ("compound interest", "personal finance"), ("tomato plants", "gardening"), ("a bike chain", "repairs"),
    ("SQL indexes", "databases"), ("a job interview", "careers"), ("photosynthesis", "biology"),
    ("unit tests", "software"), ("a marathon plan", "running"), ("a small aquarium", "pets"),
    ("git rebase", "version control"), ("solar panels", "energy"), ("a pitch deck", "startups"),
    ("jet lag", "travel"), ("noise in photos", "photography"), ("a chess opening", "games"),
    ("memory leaks", "debugging"), ("a weekly budget", "planning"),
]
SYSTEMS = [
    "You are a concise assistant. Answer in plain language.",
    "You are a patient teacher who explains step by step and checks understanding.",
    "You are a senior engineer reviewing a colleague's question. Be precise and mention trade-offs.",
    "You are a friendly helper for beginners. Avoid jargon; define any term you must use.",
]
OPENERS = ["How do I get started with", "What is the most common mistake with", "Can you explain",
           "Give me a checklist for", "What should I know before working on", "Compare two ways to approach"]
VERBS = ["check", "measure", "compare", "write down", "test", "adjust", "review", "simplify"]
NOUNS = ["the first step", "the inputs", "the result", "the weakest part", "the assumptions",
         "the timing", "the cost", "the failure cases", "the defaults", "the next change"]
LINKS = ["Because of that,", "In practice,", "A useful rule is that", "Most people find that",
         "If in doubt,", "Over time,", "As a quick check,", "The key point is that"]
ENDS = ["this saves time later.", "small changes are easier to undo.", "you learn what actually matters.",
        "mistakes show up early.", "the result is easier to explain.", "you avoid the usual surprises."]


def sentence(rng: random.Random, topic: str) -> str:
    return (f"{rng.choice(LINKS)} when you {rng.choice(VERBS)} {rng.choice(NOUNS)} of {topic}, "
            f"{rng.choice(ENDS)}")


def paragraph(rng: random.Random, topic: str, sentences: int) -> str:
    return " ".join(sentence(rng, topic) for _ in range(sentences))


def answer(rng: random.Random, topic: str, paragraphs: int) -> str:
    parts = [f"Here is how I would think about {topic}."]
    for i in range(paragraphs):
        if rng.random() < 0.3:
            parts.append("\n".join(f"{j + 1}. {rng.choice(VERBS).capitalize()} {rng.choice(NOUNS)}."
                                   for j in range(rng.randint(3, 6))))
        else:
            parts.append(paragraph(rng, topic, rng.randint(2, 5)))
    parts.append(f"In short: start small with {topic}, {rng.choice(VERBS)} often, and keep notes.")
    return "\n\n".join(parts)


def sample(rng: random.Random, i: int) -> dict:
    topic, area = rng.choice(TOPICS)
    long_tail = rng.random() < 0.04  # ~12 samples of 2-4k tokens
    msgs = []
    if rng.random() < 0.35:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    turns = 1 if rng.random() < 0.8 else rng.randint(2, 4)
    for t in range(turns):
        q = f"{rng.choice(OPENERS)} {topic}?" if t == 0 else f"Thanks. And what about {rng.choice(NOUNS)} in {area}?"
        if rng.random() < 0.3:
            q += " " + paragraph(rng, topic, rng.randint(1, 3))
        if long_tail and t == 0:
            paras = rng.randint(28, 55)
        else:
            paras = max(1, int(rng.lognormvariate(1.0, 0.6)) // max(1, turns // 2))
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": answer(rng, topic, paras)})
    return {"messages": msgs}


def build() -> str:
    rng = random.Random(SEED)
    return "".join(json.dumps(sample(rng, i), ensure_ascii=False) + "\n" for i in range(N))


def main(argv: list[str]) -> int:
    text = build()
    if "--check" in argv:
        return 0 if OUT.read_text(encoding="utf-8") == text else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({N} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
