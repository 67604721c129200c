"""`fedtune-trainer make-demo-data`: a small instruction data set, written procedurally.

Each client gets a different kind of task (arithmetic, word reversal, capitals, ...), which is
the non-IID split federated learning is about: no client alone sees the whole distribution, and
the evaluation set mixes every kind the clients hold.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Format = Literal["chat", "alpaca", "text"]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Brazil", "Brasilia"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Morocco", "Rabat"),
    ("Ghana", "Accra"), ("Colombia", "Bogota"), ("Iceland", "Reykjavik"),
]  # fmt: skip

WORDS = [
    "apple", "river", "planet", "garden", "window", "silver", "forest", "bottle", "candle",
    "dragon", "marble", "pencil", "rocket", "summer", "winter", "yellow", "orange", "purple",
    "travel", "ocean", "button", "coffee", "island", "jungle", "ladder", "meadow", "pepper",
    "puzzle", "rabbit", "saddle", "tunnel", "violin", "wallet", "zipper", "anchor", "basket",
]  # fmt: skip

Example = tuple[str, str]


def arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    return f"What is {max(a, b)} - {min(a, b)}?", str(max(a, b) - min(a, b))


def reverse(rng: random.Random) -> Example:
    w = rng.choice(WORDS)
    return f"Reverse the letters of '{w}'.", w[::-1]


def capitals(rng: random.Random) -> Example:
    country, capital = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {capital}."


def uppercase(rng: random.Random) -> Example:
    w = rng.choice(WORDS)
    return f"Write '{w}' in capital letters.", w.upper()


def count_letters(rng: random.Random) -> Example:
    w = rng.choice(WORDS)
    return f"How many letters are in '{w}'?", str(len(w))


def sort_numbers(rng: random.Random) -> Example:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort these numbers: {' '.join(map(str, xs))}.", " ".join(map(str, sorted(xs)))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "capitals": capitals,
    "uppercase": uppercase,
    "count": count_letters,
    "sort": sort_numbers,
}


def record(question: str, answer: str, fmt: Format) -> dict[str, Any]:
    if fmt == "chat":
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    if fmt == "alpaca":
        return {"instruction": question, "input": "", "output": answer}
    return {"text": f"Question: {question}\nAnswer: {answer}"}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_demo_data(
    out: Path,
    clients: int = 3,
    samples: int = 200,
    eval_samples: int = 60,
    fmt: Format = "chat",
    seed: int = 0,
) -> dict[str, Any]:
    """Write client-<i>.jsonl (task kind i mod #kinds) and eval.jsonl under `out`."""
    if clients < 1 or samples < 1 or eval_samples < 1:
        raise ValueError("clients, samples and eval samples must be positive")
    kinds = list(TASKS)
    layout: dict[str, Any] = {"format": fmt, "clients": {}}
    used = []
    for i in range(clients):
        kind = kinds[i % len(kinds)]
        used.append(kind)
        rng = random.Random(f"{seed}/client/{i}")
        rows = [record(*TASKS[kind](rng), fmt) for _ in range(samples)]
        path = out / f"client-{i}.jsonl"
        write_jsonl(path, rows)
        layout["clients"][f"client-{i}"] = {"file": str(path), "task": kind, "records": samples}
    rng = random.Random(f"{seed}/eval")
    kinds_used = list(dict.fromkeys(used))
    rows = [record(*TASKS[kinds_used[j % len(kinds_used)]](rng), fmt) for j in range(eval_samples)]
    write_jsonl(out / "eval.jsonl", rows)
    layout["eval"] = {"file": str(out / "eval.jsonl"), "tasks": kinds_used, "records": eval_samples}
    return layout
