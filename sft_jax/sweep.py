"""Ablation sweep grammar: a grid of config variations x seeds, each cell one training run.

A ``Sweep`` (from ``configs/sweeps.py`` or written inline, see ``load_sweep``) has

  ``axes``       ``{config key: [values]}``: the grid is their product, times the seeds;
  ``base``       ``{config key: value}`` applied to every cell (e.g. a shortened training);
  ``overrides``  ``{condition: {config key: value}}`` applied to the cells that match
                 ``condition``: one ``(key, value)`` pair, or a tuple of pairs that must all
                 match, e.g. a learning rate per (freezing preset, optimizer).

A cell's config is built in this order, later wins: the config file; ``base``; the matching
``overrides``, those with fewer conditions first; the cell's swept values and ``seed``; the
command line's ``--config.KEY=VALUE`` flags (which may not name a swept key or ``seed``). Two
overrides with the same number of conditions that set one key to different values in one cell
are an error, as is an override that sets a swept key.

Running the cells and collecting their results is ``sft_jax.ablation``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Any, Sequence

Condition = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of config variations (see the module docstring)."""

    axes: dict[str, list]
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    overrides: tuple[tuple[Condition, dict[str, Any]], ...] = ()
    name: str = ""

    @classmethod
    def from_dict(cls, spec: dict, name: str = "") -> Sweep:
        """From ``{"axes": ..., "base": ..., "overrides": ...}`` (``configs/sweeps.py``)."""
        unknown = set(spec) - {"axes", "base", "overrides"}
        if unknown or "axes" not in spec:
            raise ValueError(f"sweep {name!r}: want keys axes, base, overrides; got {sorted(spec)}")
        axes = {k: list(v) for k, v in spec["axes"].items()}
        if not axes or any(not v for v in axes.values()):
            raise ValueError(f"sweep {name!r}: every axis needs at least one value: {axes}")
        if "seed" in axes:
            raise ValueError("sweep over seeds with --seeds, not a 'seed' axis")
        overrides = tuple(
            (_condition(cond), dict(values)) for cond, values in spec.get("overrides", {}).items()
        )
        for cond, values in overrides:
            bad = [k for k, _ in cond if k not in axes]
            if bad:
                raise ValueError(f"sweep {name!r}: override condition on unswept key(s) {bad}")
            if set(values) & (set(axes) | {"seed"}):
                raise ValueError(f"sweep {name!r}: override {cond} sets a swept key")
        return cls(axes, dict(spec.get("base", {})), overrides, name)

    def to_dict(self) -> dict:
        """JSON-ready description (``DIR/sweep.json``)."""
        return {
            "name": self.name,
            "axes": self.axes,
            "base": self.base,
            "overrides": [[list(map(list, c)), v] for c, v in self.overrides],
        }


def _condition(cond: Any) -> Condition:
    """``("k", v)`` or ``(("k1", v1), ("k2", v2))`` -> a tuple of pairs."""
    if isinstance(cond, tuple) and len(cond) == 2 and isinstance(cond[0], str):
        return ((cond[0], cond[1]),)
    if isinstance(cond, tuple) and all(isinstance(c, tuple) and len(c) == 2 for c in cond):
        return tuple((str(k), v) for k, v in cond)
    raise ValueError(f"override condition must be (key, value) or ((key, value), ...): {cond!r}")


def parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``(32, 64)``, ``True``) or else the string itself."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_inline(text: str) -> Sweep:
    """``"freeze.policy=full,head_only;optimizer.name=adamw,sgd"`` -> a Sweep without base or
    overrides (values are Python literals or strings; a value cannot contain ``,`` or ``;``)."""
    axes = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, values = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"inline sweep part {part!r}: write KEY=V1,V2,...")
        axes[key.strip()] = [parse_value(v) for v in values.split(",") if v.strip()]
    return Sweep.from_dict({"axes": axes}, name=text)


def load_sweep(arg: str, default_file: str = "configs/sweeps.py") -> Sweep:
    """``KEY=V1,V2;...`` (inline), ``NAME`` (``get_sweep(NAME)`` of ``default_file``) or
    ``path/to/file.py:NAME``."""
    if "=" in arg:
        return parse_inline(arg)
    path, colon, name = arg.rpartition(":")
    if not colon or not path.endswith(".py"):
        path, name = default_file, arg
    spec = importlib.util.spec_from_file_location("sft_jax_sweeps", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise AttributeError(f"sweep file {path} defines no get_sweep(name) function")
    return Sweep.from_dict(module.get_sweep(name), name=name)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: swept values, seed, directory name and every config override."""

    values: dict[str, Any]
    seed: int
    slug: str
    overrides: dict[str, Any]


def _slug_part(key: str, value: Any) -> str:
    value = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "x"
    return f"{key.split('.')[-1]}-{value}"


def slug(values: dict[str, Any], seed: int) -> str:
    """A directory name: ``policy-lora-8__name-adamw__seed-0`` (last key component, value;
    characters other than letters, digits and ``._+-`` become ``-``)."""
    return "__".join([*(_slug_part(k, v) for k, v in values.items()), f"seed-{seed}"])


def _first_conflict(setters: list[tuple[Condition, Any]]):
    """The first two ``(condition, value)`` pairs of one layer that set a key differently, or
    None when they all agree."""
    first = setters[0]  # all agree with each other exactly when all agree with the first
    return next(((first, other) for other in setters[1:] if other[1] != first[1]), None)


def cell_overrides(sweep: Sweep, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """Base, then matching overrides (fewer conditions first), then the swept values and seed.

    Within one layer (overrides with the same number of conditions) every override that sets a
    key must agree on its value, whatever their order; a disagreement stands unless a later,
    more specific layer sets the key.

    Raises:
      ValueError: two matching overrides with the same number of conditions set a key to
        different values and no more specific override settles it.
    """
    out, unsettled = dict(sweep.base), {}
    matching = [(c, v) for c, v in sweep.overrides if all(values[k] == x for k, x in c)]
    by_size = itertools.groupby(sorted(matching, key=lambda cv: len(cv[0])), lambda cv: len(cv[0]))
    for _, group in by_size:
        layer: dict[str, list[tuple[Condition, Any]]] = {}
        for cond, settings in group:
            for key, value in settings.items():
                layer.setdefault(key, []).append((cond, value))
        for key, setters in layer.items():
            conflict = _first_conflict(setters)
            if conflict is None:
                unsettled.pop(key, None)  # this layer is more specific: it decides the key
            else:
                unsettled[key] = conflict
            out[key] = setters[-1][1]
    if unsettled:
        key, ((c1, v1), (c2, v2)) = next(iter(unsettled.items()))
        raise ValueError(
            f"overrides {c1} and {c2} set {key} to {v1!r} and {v2!r} in cell {values}: add an "
            "override with both conditions"
        )
    return {**out, **values, "seed": seed}


def expand(sweep: Sweep, seeds: Sequence[int]) -> list[Cell]:
    """The grid in order (first axis slowest, seeds fastest).

    Raises:
      ValueError: no seeds (the grid would have no cell), or two cells share a directory name.
    """
    if not seeds:
        raise ValueError("no seeds: every grid point needs at least one (--seeds >= 1)")
    cells = []
    for combo in itertools.product(*sweep.axes.values()):
        values = dict(zip(sweep.axes, combo))
        for seed in seeds:
            cells.append(
                Cell(values, seed, slug(values, seed), cell_overrides(sweep, values, seed))
            )
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        raise ValueError(f"sweep values give the same directory name: {dup}")
    return cells


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the (locked) ConfigDict with dotted ``key: value`` assignments; an unknown key
    or a value of the wrong type is an error naming it."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (KeyError, AttributeError):
            raise ValueError(f"config has no key {key!r}") from None
        except TypeError as e:
            raise ValueError(f"config key {key!r} = {value!r}: {e}") from None
    return cfg


def final_overrides(cell: Cell, cli: dict[str, Any]) -> dict[str, Any]:
    """The cell's overrides followed by the command line's (which may not touch swept keys)."""
    clash = sorted(set(cli) & (set(cell.values) | {"seed"}))
    if clash:
        raise ValueError(f"--config flags set swept key(s) {clash}; change the sweep instead")
    return {**cell.overrides, **cli}
