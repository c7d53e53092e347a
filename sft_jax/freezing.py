"""Parameter-group policies: which parameters train, decided by path regexes.

A policy is an ordered list of ``(regex, trainable)`` rules matched against a parameter's path
(``"bert/encoder/layer/3/attention/self/query/kernel"``); the first matching rule wins and
unmatched parameters are trainable. Named presets expand to such lists. The optimizer uses the
resulting boolean mask (frozen leaves get ``optax.set_to_zero`` and no optimizer state) and the
step differentiates only trainable leaves.

Presets that count layers are written once against a model's ``LayerStructure``
(``sft_jax.models.heads``: regexes for the bottom (stem / embeddings), the numbered blocks, the
top and the head), so they mean the same for every family:

  ``train_top:N``      head + top + the last N blocks train; the rest is frozen.
  ``train_bottom:N``   bottom + the first N blocks + head train; the rest is frozen.
  ``freeze_bottom:N``  bottom + the first N blocks are frozen; the rest trains.

BatchNorm layers whose scale is frozen run in inference mode (``configure_batch_norm``).
"""

from __future__ import annotations

import re
from typing import Any

from sft_jax import tree_util
from sft_jax.models.heads import LayerStructure

# Head parameters of every task model live under these top-level names.
HEAD_PATTERN = r"^(classifier|head|lm_head)/"
# LoRA adapter weights (``.../q_proj/lora_a``); ``sft_jax.lora.is_lora_param`` uses it too.
LORA_PATTERN = r"(^|/)lora_[ab]$"

PRESETS: dict[str, list[tuple[str, bool]]] = {
    "full": [],
    # Linear probe / frozen-encoder head training: only the task head trains.
    "head_only": [(HEAD_PATTERN, True), (r".*", False)],
    "freeze_embeddings": [(r"(^|/)embeddings/", False)],
    # LoRA (see sft_jax.lora.apply_lora): only the adapter weights train.
    "lora": [(LORA_PATTERN, True), (r".*", False)],
}


DEPTH_PRESETS = ("train_top", "train_bottom", "freeze_bottom")


def block_indices(paths: list[str], structure: LayerStructure) -> list[int]:
    """The block numbers present in ``paths`` (sorted), by ``structure.blocks``' group 1."""
    pattern = re.compile(structure.blocks)
    return sorted({int(m.group(1)) for p in paths if (m := pattern.search(p))})


def _blocks_rules(structure: LayerStructure, indices: list[int], trainable: bool) -> list:
    """``[(structure.blocks restricted to indices, trainable)]``; no rule for no indices."""
    if structure.blocks.count(r"(\d+)") != 1:
        raise ValueError(f"LayerStructure.blocks {structure.blocks!r} needs one (\\d+) group")
    if not indices:
        return []
    alternatives = "|".join(str(i) for i in indices)
    return [(structure.blocks.replace(r"(\d+)", f"(?:{alternatives})"), trainable)]


def depth_rules(
    name: str, n: int, paths: list[str], structure: LayerStructure
) -> list[tuple[str, bool]]:
    """Rules of a depth preset (``train_top``, ``train_bottom``, ``freeze_bottom``) with N=n."""
    blocks = block_indices(paths, structure)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"freeze.policy={name}:{n}: the model has {len(blocks)} blocks")
    first, last = blocks[:n], blocks[len(blocks) - n :]
    top = [(structure.top, True)] if structure.top else []
    head = [(structure.head, True)]
    if name == "train_top":
        return [*head, *top, *_blocks_rules(structure, last, True), (".*", False)]
    if name == "train_bottom":
        bottom = [(structure.bottom, True), *_blocks_rules(structure, first, True)]
        return [*head, *bottom, (".*", False)]
    return [(structure.bottom, False), *_blocks_rules(structure, first, False)]


def parse_rules(
    policy: str | list[Any],
    paths: list[str] | None = None,
    structure: LayerStructure | None = None,
) -> list[tuple[str, bool]]:
    """Expands a preset name (``NAME`` or ``NAME:N`` for depth presets, which need the model's
    parameter ``paths`` and ``structure``) or validates an explicit ``[(regex, trainable)]``."""
    if isinstance(policy, str):
        name, _, arg = policy.partition(":")
        if name in DEPTH_PRESETS:
            if not arg.isdigit():
                raise ValueError(f"freeze.policy={policy!r}: write {name}:N with N >= 0")
            if structure is None or paths is None:
                raise ValueError(f"freeze.policy={policy!r} needs a model with a LayerStructure")
            return depth_rules(name, int(arg), paths, structure)
        if policy not in PRESETS:
            known = sorted(PRESETS) + [f"{d}:N" for d in DEPTH_PRESETS]
            raise ValueError(f"Unknown freezing preset {policy!r}; known presets: {known}")
        return PRESETS[policy]
    rules = []
    for i, rule in enumerate(policy):
        if len(rule) != 2 or not isinstance(rule[1], bool):
            raise ValueError(f"freeze rule {i} must be (regex, trainable: bool), got {rule!r}")
        rules.append((str(rule[0]), rule[1]))
    return rules


def trainable_mask(
    params: Any,
    policy: str | list[Any],
    *,
    structure: LayerStructure | None = None,
    never: Any | None = None,
) -> Any:
    """Returns a pytree of bools with the structure of ``params`` (True = trainable).

    Args:
      params: The model's variables as a pure dict.
      policy: A preset name or ``[(regex, trainable), ...]``.
      structure: The model's layer structure (for depth presets such as ``train_top:2``).
      never: Bool pytree like ``params``; True leaves are never trainable and not matched
        against the rules (BatchNorm running statistics, ``train_state.stats_mask``).

    Raises:
      ValueError: if the policy leaves no parameter trainable, or a rule matches nothing (a typo
        in a regex would otherwise silently train everything).
    """
    excluded = set()
    if never is not None:
        excluded = {p for p, m in tree_util.flatten_to_dict(never).items() if m}
    paths = [p for p in tree_util.flatten_to_dict(params) if p not in excluded]
    rules = [(re.compile(p), t) for p, t in parse_rules(policy, paths, structure)]
    used = [False] * len(rules)

    def decide(path: str) -> bool:
        if path in excluded:
            return False
        for i, (pattern, trainable) in enumerate(rules):
            if pattern.search(path):
                used[i] = True
                return trainable
        return True

    mask = tree_util.map_with_path_str(lambda path, _: decide(path), params)
    unused = [rules[i][0].pattern for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"freeze rules matched no parameter: {unused}")
    if not any(tree_util.leaves(mask)):
        raise ValueError(f"freezing policy {policy!r} leaves no trainable parameter")
    return mask


BATCH_NORM_MODES = ("auto", "train", "frozen")


def configure_batch_norm(model: Any, trainable: Any, mode: str) -> int:
    """Sets each BatchNorm's static ``frozen`` flag; returns how many are frozen.

    ``"auto"``: frozen (inference mode: running statistics, never updated) where the layer's
    scale is frozen by the policy, so a frozen base behaves as at inference while the layers
    being fine-tuned normalize with batch statistics (Keras' and timm's usual practice).
    ``"train"``: every BatchNorm uses batch statistics in training. ``"frozen"``: none does.
    Call before splitting the model: the flag is part of the graph definition.
    """
    from flax import nnx

    from sft_jax.models.conv import BatchNorm

    if mode not in BATCH_NORM_MODES:
        raise ValueError(f"model.batch_norm={mode!r}; use one of {BATCH_NORM_MODES}")
    flat = tree_util.flatten_to_dict(trainable)
    frozen = 0
    for path, module in nnx.iter_graph(model):
        if isinstance(module, BatchNorm):
            scale = "/".join(str(p) for p in path) + "/scale"
            module.frozen = mode == "frozen" or (mode == "auto" and not flat.get(scale, False))
            frozen += module.frozen
    return frozen
