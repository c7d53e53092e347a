"""Seeded instruction tasks with exactly checkable answers, for chat SFT with a measurable gain.

Each task family is a function `(rng: np.random.Generator) -> (instruction, answer)`; the
instruction states the exact output format ("Answer with the date only.") and the answer is a
short, unambiguous string. `FAMILIES` maps family names to these functions.

An example is `{"id", "family", "messages", "answer"}` where `messages` is a one-turn
conversation (`[{"role": "user", ...}, {"role": "assistant", ...}]`, the format of
`sft_jax.data.chat`). `write_jsonl` stores examples one JSON object per line, so the files also
work with a generic chat JSONL loader that reads `messages`.

Scoring: `exact_match(prediction, answer)` compares `normalize_answer` of both (whitespace
stripped and collapsed, one trailing period dropped, casefolded). Generated text may continue
after the answer's end of turn; the caller cuts the generation at the stop token (e.g.
`<|im_end|>`) before scoring.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TaskFn = Callable[[np.random.Generator], tuple[str, str]]

DEFAULT_SPLIT_SEED = 0
DEFAULT_SIZES = {"train": 4000, "validation": 200, "test": 500}
# Test is drawn first, then validation, then train, so the evaluation splits do not depend on
# the train size.
_SPLIT_ORDER = ("test", "validation", "train")
_MAX_TRIES = 10_000

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "maple", "ocean", "pencil",
    "grape", "wolf", "candle", "forest", "silver", "mango", "bell", "zebra", "kite", "honey",
)  # fmt: skip
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi")
CITIES = ("Lima", "Oslo", "Cairo", "Kyoto", "Quito", "Dakar", "Perth", "Porto", "Riga", "Hanoi")
JOBS = ("baker", "nurse", "pilot", "teacher", "chemist", "farmer", "lawyer", "painter")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
# (from unit, to unit, factor): value_in_to = value_in_from * factor.
UNITS = (("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60))


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _random_date(rng: np.random.Generator) -> datetime.date:
    start = datetime.date(1990, 1, 1).toordinal()
    end = datetime.date(2030, 12, 31).toordinal()
    return datetime.date.fromordinal(int(rng.integers(start, end + 1)))


def _long_date(d: datetime.date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def date_format(rng: np.random.Generator) -> tuple[str, str]:
    """Converts a date between ISO (YYYY-MM-DD), long ("March 7, 2024") and DD/MM/YYYY."""
    d = _random_date(rng)
    formats = {
        "iso": (d.isoformat(), "YYYY-MM-DD"),
        "long": (_long_date(d), 'Month D, YYYY (for example "March 7, 2024")'),
        "dmy": (d.strftime("%d/%m/%Y"), "DD/MM/YYYY (day first)"),
    }
    pairs = (("iso", "long"), ("long", "iso"), ("iso", "dmy"), ("dmy", "iso"), ("dmy", "long"))
    src, dst = _pick(rng, pairs)
    src_note = " (day/month/year)" if src == "dmy" else ""
    instruction = (
        f"Rewrite the date {formats[src][0]}{src_note} in the format {formats[dst][1]}. "
        "Answer with the date only."
    )
    return instruction, formats[dst][0]


def unit_conversion(rng: np.random.Generator) -> tuple[str, str]:
    """Converts km<->m, kg<->g or hours<->minutes; the result is always an integer."""
    big, small, factor = _pick(rng, UNITS)
    value = int(rng.integers(1, 251))
    if rng.integers(2):
        amount, src, dst, answer = value, big, small, value * factor
    else:
        amount, src, dst, answer = value * factor, small, big, value
    template = _pick(
        rng,
        (
            "Convert {a} {s} to {d}. Answer with the number only.",
            "How many {d} are in {a} {s}? Answer with the number only.",
        ),
    )
    return template.format(a=amount, s=src, d=dst), str(answer)


def _random_items(rng: np.random.Generator) -> list[str]:
    n = int(rng.integers(3, 7))
    if rng.integers(2):
        return [WORDS[i] for i in rng.choice(len(WORDS), size=n, replace=False)]
    return [str(int(v)) for v in rng.choice(np.arange(1, 100), size=n, replace=False)]


def _join(items: Iterable[str]) -> str:
    return ", ".join(items)


def reverse_list(rng: np.random.Generator) -> tuple[str, str]:
    """Reverses a list of 3-6 distinct words or integers."""
    items = _random_items(rng)
    instruction = (
        f"Reverse the order of this list: {_join(items)}. "
        'Answer with the items separated by ", " only.'
    )
    return instruction, _join(reversed(items))


def sort_list(rng: np.random.Generator) -> tuple[str, str]:
    """Sorts 3-6 distinct words alphabetically or integers from smallest to largest."""
    items = _random_items(rng)
    if items[0].isdigit():
        order, answer = "from smallest to largest", sorted(items, key=int)
    else:
        order, answer = "in alphabetical order", sorted(items)
    instruction = (
        f'Sort this list {order}: {_join(items)}. Answer with the items separated by ", " only.'
    )
    return instruction, _join(answer)


def arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    """Evaluates two or three small integers joined by +, - or * (usual precedence)."""
    n = int(rng.integers(2, 4))
    numbers = [int(v) for v in rng.integers(1, 21, size=n)]
    ops = [_pick(rng, ("+", "-", "*")) for _ in range(n - 1)]
    expr = str(numbers[0])
    for op, num in zip(ops, numbers[1:]):
        expr += f" {op} {num}"
    value = _evaluate(numbers, ops)
    instruction = f"What is {expr}? Answer with the integer only."
    return instruction, str(value)


def _evaluate(numbers: Sequence[int], ops: Sequence[str]) -> int:
    """Evaluates numbers/ops with `*` before `+`/`-`, left to right."""
    terms = [numbers[0]]
    signs = [1]
    for op, num in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1] *= num
        else:
            terms.append(num)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def extract_field(rng: np.random.Generator) -> tuple[str, str]:
    """Asks for one field's value in a record like "name: Ana; age: 31; city: Lima"."""
    fields = {
        "name": _pick(rng, NAMES),
        "age": str(int(rng.integers(18, 90))),
        "city": _pick(rng, CITIES),
        "job": _pick(rng, JOBS),
        "color": _pick(rng, COLORS),
    }
    keys = [list(fields)[i] for i in rng.permutation(len(fields))[: int(rng.integers(3, 6))]]
    record = "; ".join(f"{k}: {fields[k]}" for k in keys)
    key = _pick(rng, keys)
    instruction = (
        f'Record: "{record}". What is the value of the field "{key}"? Answer with the value only.'
    )
    return instruction, fields[key]


FAMILIES: dict[str, TaskFn] = {
    "date_format": date_format,
    "unit_conversion": unit_conversion,
    "reverse_list": reverse_list,
    "sort_list": sort_list,
    "arithmetic": arithmetic,
    "extract_field": extract_field,
}


def _example(idx: int, family: str, instruction: str, answer: str) -> dict[str, Any]:
    messages = [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": answer},
    ]
    return {"id": idx, "family": family, "messages": messages, "answer": answer}


def _generate(
    n: int, rng: np.random.Generator, families: Sequence[str], seen: set[str]
) -> list[dict[str, Any]]:
    """Draws n examples cycling `families`, redrawing any instruction already in `seen`."""
    out = []
    for idx in range(n):
        family = families[idx % len(families)]
        for _ in range(_MAX_TRIES):
            instruction, answer = FAMILIES[family](rng)
            if instruction not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a new {family!r} instruction")
        seen.add(instruction)
        out.append(_example(idx, family, instruction, answer))
    return out


def _check_families(families: Sequence[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if not names or unknown:
        raise ValueError(f"unknown or empty families {unknown or names}; known: {list(FAMILIES)}")
    return names


def make_examples(n: int, seed: int, families: Sequence[str] | None = None) -> list[dict]:
    """Makes n examples with distinct instructions, cycling the families in order.

    Args:
      n: number of examples.
      seed: seed of the numpy generator; the same seed gives the same examples.
      families: family names (default: all of `FAMILIES`, in registry order).

    Returns:
      Examples `{"id", "family", "messages", "answer"}` with ids 0..n-1.
    """
    names = _check_families(families)
    return _generate(n, np.random.default_rng(seed), names, set())


def make_splits(
    seed: int = DEFAULT_SPLIT_SEED,
    sizes: Mapping[str, int] | None = None,
    families: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """Makes splits whose instruction texts are disjoint (also within a split).

    One generator seeded with `seed` (default 0, `DEFAULT_SPLIT_SEED`) draws "test" first, then
    "validation", then "train", then any other split names in sorted order; an instruction
    already drawn is redrawn. Ids restart at 0 in each split.

    Args:
      seed: generator seed.
      sizes: split name -> number of examples (default `DEFAULT_SIZES`: 4000/200/500).
      families: family names (default: all).

    Returns:
      Split name -> examples, in the key order of `sizes`.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    names = _check_families(families)
    order = [s for s in _SPLIT_ORDER if s in sizes] + sorted(set(sizes) - set(_SPLIT_ORDER))
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    made = {split: _generate(sizes[split], rng, names, seen) for split in order}
    return {split: made[split] for split in sizes}


def normalize_answer(text: str) -> str:
    """Strips whitespace and one trailing period, collapses inner whitespace, casefolds."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return " ".join(text.split()).casefold()


def exact_match(prediction: str, answer: str) -> bool:
    """Whether prediction equals answer after `normalize_answer` (cut at the stop token first)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def write_jsonl(examples: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Writes one JSON object per line with keys `messages`, `answer`, `family`, `id`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            row = {k: ex[k] for k in ("messages", "answer", "family", "id")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads the examples written by `write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
