"""What a compiled step communicates between devices, read from its HLO text.

``collective_traffic(compiled.as_text())``: per kind of collective (all-gather, all-reduce,
all-to-all, collective-permute, reduce-scatter), how many operations one execution runs and the
bytes of their results on one device. An operation inside a loop body counts once per
iteration: the compiled ``while`` loops of ``lax.scan`` (gradient accumulation, the chunked LM
loss) carry their trip count (``known_trip_count``), and each computation is weighted by how
often its callers run it. A loop without a known trip count counts its body once; each branch
of a conditional counts as if it ran (an upper bound; the train step has no conditionals).
"""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
# `%x = f32[16,3]{1,0} all-reduce(...)`, or a tuple result `= (f32[4]{0}, bf16[8]{0}) op(`. An
# asynchronous pair `op-start` / `op-done` counts once, by the result of its `-done`.
_COLLECTIVE = re.compile(rf"= (\([^=]*\)|\S+) ({'|'.join(COLLECTIVES)})(?:-done)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+(\d+)[a-z0-9]*)\[([\d,]*)\]")
# A computation's header (`%name (params) -> type {`, `ENTRY %name ...`), and the computations
# an instruction calls: `calls=`, `to_apply=`, `body=`, `condition=`, branch lists.
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
    r"|\b(?:branch_computations|called_computations)=\{([^}]*)\}"
)
_WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _result_bytes(shape: str) -> int:
    """Bytes of an HLO result type: an array (``bf16[8,32]{1,0}``) or a tuple of them."""
    total = 0
    for name, bits, dims in _ARRAY.findall(shape):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * (8 if name == "pred" else int(bits)) // 8
    return total


def _computations(hlo_text: str) -> tuple[str | None, dict[str, list[str]]]:
    """(the entry computation's name, each computation's instruction lines)."""
    entry, current, bodies = None, None, {}
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith(" "):
            bodies[current].append(line)
    return entry, bodies


def _calls(line: str) -> list[tuple[str, int]]:
    """(callee, times per execution of ``line``): a while loop's body its trip count. An async
    operation's wrapped computation counts at its ``async-start`` only."""
    if " async-update(" in line or " async-done(" in line:
        return []
    trips = _TRIP_COUNT.search(line)
    body = _WHILE_BODY.search(line) if " while(" in line else None
    out = []
    for single, group in _CALLEE.findall(line):
        for name in [single] if single else [n.strip().lstrip("%") for n in group.split(",")]:
            loop_body = body is not None and name == body.group(1)
            out.append((name, int(trips.group(1)) if loop_body and trips else 1))
    return out


def _multiplicities(entry: str, bodies: dict[str, list[str]]) -> dict[str, int]:
    """How many times one execution of ``entry`` runs each computation (the call graph is a
    DAG; a computation called from several places sums them)."""
    calls = {name: [c for line in lines for c in _calls(line)] for name, lines in bodies.items()}
    order, seen = [], set()

    def visit(name: str) -> None:  # reverse postorder = callers before callees
        if name in seen or name not in calls:
            return
        seen.add(name)
        for callee, _ in calls[name]:
            visit(callee)
        order.append(name)

    visit(entry)
    times = collections.Counter({entry: 1})
    for name in reversed(order):
        for callee, n in calls[name]:
            times[callee] += times[name] * n
    return times


def collective_traffic(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind (``COLLECTIVES``): ``count``, the operations one execution of the
    module ``hlo_text`` (a compiled module's ``as_text()``) runs, loop bodies once per
    iteration, and ``bytes``, the sizes of their results on one device summed."""
    entry, bodies = _computations(hlo_text)
    if entry is None:  # bare instructions (no module structure): each once
        entry, bodies = "", {"": hlo_text.splitlines()}
    times = _multiplicities(entry, bodies)
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for name, lines in bodies.items():
        for m in _COLLECTIVE.finditer("\n".join(lines)):
            out[m.group(2)]["count"] += times[name]
            out[m.group(2)]["bytes"] += times[name] * _result_bytes(m.group(1))
    return out
