"""A declarative engine that maps Hugging Face tensor names to our parameter paths and back.

A family's table is a list of ``Rule(hf, ours, transform)``. Both sides are name templates:
literal text plus placeholders ``{name}`` (one dotted segment, ``[^.]+``) or
``{name:regex}`` (e.g. ``{i:\\d+}``, ``{p:query|key|value}``). A rule matches a whole name on
one side and formats the other side with the captured values, so the same table imports
(HF -> ours) and exports (ours -> HF). Our paths are dotted ``nnx`` state paths such as
``bert.encoder.layer.0.attention.self.query.kernel``.

Import is strict: every HF tensor must be used or explicitly ignored (``ignore`` regexes), every
model parameter must be filled or explicitly allowed to stay as initialized (``allow_missing``),
and shapes must agree. All problems are reported together in one ``ValueError`` naming the source.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]*))?\}")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of array maps between the HF layout and ours (each the other's inverse)."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch.nn.Linear stores weight [out, in]; our Dense kernel is [in, out].
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T)


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(f"(?P<{m.group(1)}>{m.group(2) or '[^.]+'})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _format(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One table row: HF name template <-> our path template, with a layout transform."""

    hf: str
    ours: str
    transform: Transform = IDENTITY

    def __post_init__(self):
        hf_names = set(_compile(self.hf).groupindex)
        our_names = set(_compile(self.ours).groupindex)
        if hf_names != our_names:
            raise ValueError(f"rule {self.hf!r} <-> {self.ours!r}: placeholders differ")

    def to_ours(self, hf_name: str) -> str | None:
        """Our path for ``hf_name``, or None when the rule does not match it."""
        m = _compile(self.hf).fullmatch(hf_name)
        return None if m is None else _format(self.ours, m.groupdict())

    def to_hf(self, path: str) -> str | None:
        """The HF name for our ``path``, or None when the rule does not match it."""
        m = _compile(self.ours).fullmatch(path)
        return None if m is None else _format(self.hf, m.groupdict())


def linear(name: str, ours: str | None = None) -> list[Rule]:
    """Rules for a torch ``nn.Linear`` (weight, bias) <-> our ``Dense`` (kernel, bias)."""
    ours = name if ours is None else ours
    return [
        Rule(f"{name}.weight", f"{ours}.kernel", TRANSPOSE),
        Rule(f"{name}.bias", f"{ours}.bias"),
    ]


def layer_norm(name: str, ours: str | None = None) -> list[Rule]:
    """Rules for a torch ``nn.LayerNorm`` (weight, bias) <-> our ``LayerNorm`` (scale, bias)."""
    ours = name if ours is None else ours
    return [Rule(f"{name}.weight", f"{ours}.scale"), Rule(f"{name}.bias", f"{ours}.bias")]


def embedding(name: str, ours: str | None = None) -> list[Rule]:
    """Rule for a torch ``nn.Embedding`` weight <-> our ``Embed`` embedding."""
    ours = name if ours is None else ours
    return [Rule(f"{name}.weight", f"{ours}.embedding")]


def add_prefix(tensors: Mapping[str, Any], prefix: str, roots: Iterable[str]) -> dict[str, Any]:
    """Prefixes the names whose first segment is in ``roots`` (e.g. a bare ``BertModel``
    checkpoint's ``embeddings.*``/``encoder.*``/``pooler.*`` -> ``bert.*``); others unchanged."""
    roots = set(roots)
    return {(prefix + k if k.split(".", 1)[0] in roots else k): v for k, v in tensors.items()}


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _find(rules: Sequence[Rule], name: str, side: str) -> tuple[Rule, str] | None:
    for rule in rules:
        other = rule.to_ours(name) if side == "hf" else rule.to_hf(name)
        if other is not None:
            return rule, other
    return None


def import_weights(
    hf_tensors: Mapping[str, np.ndarray],
    model_state: Mapping[str, Any],
    rules: Sequence[Rule],
    *,
    source: str,
    ignore: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Maps HF tensors onto our flat parameter paths, checking everything.

    Args:
        hf_tensors: HF name -> array (after any prefix normalization).
        model_state: Our dotted path -> anything with ``.shape`` and ``.dtype`` (arrays,
            ``jax.ShapeDtypeStruct``s, Params).
        rules: The family's table.
        source: The file the tensors came from (named in errors).
        ignore: Regexes (full match) of HF names that are legitimately unused.
        allow_missing: Regexes of our paths that may stay as initialized (e.g. a new head).

    Returns:
        Our path -> array in our layout and the model's dtype, for every loaded parameter.

    Raises:
        ValueError: Listing all unused HF tensors, all missing parameters, all shape
            mismatches and duplicate targets, naming ``source``.
    """
    loaded: dict[str, np.ndarray] = {}
    unused, problems, bad_paths = [], [], set()
    for key in sorted(hf_tensors):
        if _matches_any(key, ignore):
            continue
        found = _find(rules, key, "hf")
        if found is None or found[1] not in model_state:
            why = "no rule matches" if found is None else f"-> {found[1]}, not in the model"
            unused.append(f"{key} ({why})")
            continue
        rule, path = found
        if path in loaded:
            problems.append(f"{key}: a second tensor for {path}")
            continue
        hf_value = np.asarray(hf_tensors[key])
        want = tuple(model_state[path].shape)
        value = rule.transform.to_ours(hf_value)
        if tuple(value.shape) != want:
            bad_paths.add(path)
            want_hf = rule.transform.to_hf(np.broadcast_to(np.zeros((), np.int8), want)).shape
            problems.append(
                f"{key}: checkpoint shape {tuple(hf_value.shape)}, model expects "
                f"{tuple(want_hf)} (our {path} is {want})"
            )
            continue
        loaded[path] = value.astype(model_state[path].dtype)
    missing = [
        p for p in model_state
        if p not in loaded and p not in bad_paths and not _matches_any(p, allow_missing)
    ]  # fmt: skip
    if unused or missing or problems:
        raise ValueError(_report(source, unused, missing, problems))
    return loaded


def _report(source: str, unused: list[str], missing: list[str], problems: list[str]) -> str:
    lines = [f"cannot load weights from {source}:"]
    for title, items in (
        ("unused checkpoint tensors", unused),
        ("model parameters missing from the checkpoint", missing),
        ("shape mismatches / conflicts", problems),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def export_weights(
    params: Mapping[str, Any],
    rules: Sequence[Rule],
    *,
    skip: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Runs the table backwards: our path -> HF name, our layout -> HF layout.

    Args:
        params: Our dotted path -> array.
        rules: The family's table.
        skip: Regexes of our paths not to export.

    Returns:
        HF name -> contiguous numpy array.

    Raises:
        ValueError: Listing every parameter no rule maps (or two that map to one name).
    """
    out: dict[str, np.ndarray] = {}
    problems = []
    for path in sorted(params):
        if _matches_any(path, skip):
            continue
        found = _find(rules, path, "ours")
        if found is None:
            problems.append(f"{path} (no rule matches)")
        elif found[1] in out:
            problems.append(f"{path} -> {found[1]} (already exported)")
        else:
            rule, name = found
            out[name] = np.ascontiguousarray(rule.transform.to_hf(np.asarray(params[path])))
    if problems:
        raise ValueError("cannot export parameters:\n  " + "\n  ".join(problems))
    return out


def path_str(path: Sequence[Any]) -> str:
    """An nnx state path as a dotted string: ('layer', 0, 'kernel') -> 'layer.0.kernel'."""
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module, variables: Any = nnx.Param) -> dict[str, nnx.Variable]:
    """Dotted path -> the model's ``nnx.Param`` objects (live references), or the Variables
    that the nnx filter ``variables`` selects: ``(nnx.Param, nnx.BatchStat)`` adds BatchNorm
    running statistics, which checkpoints store next to the weights."""
    return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, variables))}


def assign_params(
    model: nnx.Module, arrays: Mapping[str, np.ndarray], variables: Any = nnx.Param
) -> None:
    """Writes arrays into the model's Variables in place (paths as from ``flat_params`` with
    the same ``variables`` filter)."""
    import jax.numpy as jnp

    params = flat_params(model, variables)
    for path, value in arrays.items():
        param = params[path]
        param.set_value(jnp.asarray(value, dtype=param.dtype))
