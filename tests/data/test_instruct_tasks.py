"""Tests for sft_jax.data.instruct_tasks: exact examples, recomputed answers, splits, scoring."""

from __future__ import annotations

import collections
import datetime
import json
import re

import pytest

from sft_jax.data.instruct_tasks import (
    FAMILIES,
    exact_match,
    make_examples,
    make_splits,
    normalize_answer,
    read_jsonl,
    write_jsonl,
)

# First example of each family for make_examples(6, seed=0); answers checked by hand.
EXPECTED_FIRST = {
    "date_format": (
        "Rewrite the date 16/11/2024 (day/month/year) in the format YYYY-MM-DD. "
        "Answer with the date only.",
        "2024-11-16",
    ),
    "unit_conversion": ("Convert 68000 grams to kilograms. Answer with the number only.", "68"),
    "reverse_list": (
        'Reverse the order of this list: 18, 80, 65. Answer with the items separated by ", " only.',
        "65, 80, 18",
    ),
    "sort_list": (
        "Sort this list in alphabetical order: honey, wolf, pencil, kite, grape. "
        'Answer with the items separated by ", " only.',
        "grape, honey, kite, pencil, wolf",
    ),
    "arithmetic": ("What is 18 + 12? Answer with the integer only.", "30"),
    "extract_field": (
        'Record: "job: nurse; name: Ivan; age: 70". What is the value of the field "name"? '
        "Answer with the value only.",
        "Ivan",
    ),
}

MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]


def _parse_date(text: str) -> datetime.date:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.date.fromisoformat(text)
    if re.fullmatch(r"\d{2}/\d{2}/\d{4}", text):
        day, month, year = map(int, text.split("/"))
        return datetime.date(year, month, day)
    month_name, day, year = re.fullmatch(r"(\w+) (\d+), (\d{4})", text).groups()
    return datetime.date(int(year), MONTHS.index(month_name) + 1, int(day))


def _solve_date(instruction: str) -> str:
    m = re.match(r"Rewrite the date (.+?)(?: \(day/month/year\))? in the format (\S+)", instruction)
    date = _parse_date(m.group(1))
    fmt = m.group(2)
    if fmt == "YYYY-MM-DD.":
        return f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
    if fmt == "DD/MM/YYYY":
        return f"{date.day:02d}/{date.month:02d}/{date.year:04d}"
    assert fmt == "Month"
    return f"{MONTHS[date.month - 1]} {date.day}, {date.year}"


def _solve_units(instruction: str) -> str:
    m = re.search(r"(\d+) (\w+) to (\w+)\.", instruction) or re.search(
        r"How many (\w+) are in (\d+) (\w+)\?", instruction
    )
    if instruction.startswith("Convert"):
        amount, src, dst = int(m.group(1)), m.group(2), m.group(3)
    else:
        dst, amount, src = m.group(1), int(m.group(2)), m.group(3)
    per_big = {"kilometers": 1000, "kilograms": 1000, "hours": 60}
    small = {"meters": "kilometers", "grams": "kilograms", "minutes": "hours"}
    if src in per_big:
        assert small[dst] == src
        return str(amount * per_big[src])
    assert small[src] == dst
    assert amount % per_big[dst] == 0
    return str(amount // per_big[dst])


def _list_items(instruction: str) -> list[str]:
    return re.search(r": (.+?)\. Answer", instruction).group(1).split(", ")


def _solve_reverse(instruction: str) -> str:
    return ", ".join(_list_items(instruction)[::-1])


def _solve_sort(instruction: str) -> str:
    items = _list_items(instruction)
    if "smallest to largest" in instruction:
        return ", ".join(str(v) for v in sorted(int(i) for i in items))
    assert "alphabetical" in instruction
    return ", ".join(sorted(items))


def _solve_arithmetic(instruction: str) -> str:
    expr = re.fullmatch(r"What is (.+)\? Answer with the integer only\.", instruction).group(1)
    assert re.fullmatch(r"\d+( [-+*] \d+){1,2}", expr)
    return str(eval(expr))  # noqa: S307 - validated digits and operators only


def _solve_extract(instruction: str) -> str:
    record, key = re.fullmatch(
        r'Record: "(.+)"\. What is the value of the field "(\w+)"\? Answer with the value only\.',
        instruction,
    ).groups()
    fields = dict(part.split(": ") for part in record.split("; "))
    return fields[key]


SOLVERS = {
    "date_format": _solve_date,
    "unit_conversion": _solve_units,
    "reverse_list": _solve_reverse,
    "sort_list": _solve_sort,
    "arithmetic": _solve_arithmetic,
    "extract_field": _solve_extract,
}


def test_first_example_per_family_is_fixed():
    examples = make_examples(6, seed=0)
    got = {ex["family"]: (ex["messages"][0]["content"], ex["answer"]) for ex in examples}
    assert got == EXPECTED_FIRST


def test_example_structure():
    for i, ex in enumerate(make_examples(12, seed=3)):
        assert ex["id"] == i
        assert ex["family"] == list(FAMILIES)[i % len(FAMILIES)]
        assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
        assert ex["messages"][1]["content"] == ex["answer"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_recomputed_independently(family):
    for ex in make_examples(300, seed=7, families=[family]):
        instruction = ex["messages"][0]["content"]
        assert "only." in instruction
        assert SOLVERS[family](instruction) == ex["answer"], instruction


def test_date_format_covers_all_directions():
    texts = [ex["messages"][0]["content"] for ex in make_examples(200, 1, ["date_format"])]
    assert any("format DD/MM/YYYY" in t for t in texts)
    assert any("format Month D, YYYY" in t for t in texts)
    assert any("(day/month/year) in the format YYYY-MM-DD" in t for t in texts)
    assert any(re.match(r"Rewrite the date [A-Z][a-z]+ \d", t) for t in texts)


def test_determinism():
    sizes = {"train": 300, "validation": 30, "test": 60}
    assert make_splits(seed=5, sizes=sizes) == make_splits(seed=5, sizes=sizes)
    assert make_splits(seed=5, sizes=sizes) != make_splits(seed=6, sizes=sizes)
    assert make_examples(50, 2) == make_examples(50, 2)
    assert make_examples(50, 2) != make_examples(50, 3)


def test_default_splits_disjoint_and_balanced():
    splits = make_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 4000, "validation": 200, "test": 500}
    texts = {k: [ex["messages"][0]["content"] for ex in v] for k, v in splits.items()}
    all_texts = [t for v in texts.values() for t in v]
    assert len(set(all_texts)) == len(all_texts)
    assert not set(texts["test"]) & (set(texts["train"]) | set(texts["validation"]))
    for examples in splits.values():
        counts = collections.Counter(ex["family"] for ex in examples)
        assert set(counts) == set(FAMILIES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_test_split_independent_of_train_size():
    small = make_splits(seed=0, sizes={"train": 10, "validation": 5, "test": 20})
    large = make_splits(seed=0, sizes={"train": 100, "validation": 5, "test": 20})
    assert small["test"] == large["test"]
    assert small["validation"] == large["validation"]


def test_unknown_family_rejected():
    with pytest.raises(ValueError):
        make_examples(3, 0, families=["nope"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  March 7, 2024. ", "march 7, 2024"),
        ("a,  b,\tc", "a, b, c"),
        ("Lima", "lima"),
        ("42\n", "42"),
        ("3.5", "3.5"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match(" march 7,  2024.", "March 7, 2024")
    assert exact_match("apple, honey, lamp", "apple, honey, lamp")
    assert not exact_match("apple,honey,lamp", "apple, honey, lamp")
    assert not exact_match("42", "-42")
    assert not exact_match("Lima Peru", "Lima")


def test_write_jsonl_round_trip(tmp_path):
    examples = make_examples(10, seed=4)
    path = tmp_path / "sub" / "tasks.jsonl"
    write_jsonl(examples, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10
    assert set(json.loads(lines[0])) == {"messages", "answer", "family", "id"}
    assert read_jsonl(path) == examples
