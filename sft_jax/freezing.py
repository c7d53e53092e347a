"""Parameter-group policies: which parameters train, decided by path regexes.

A policy is an ordered list of ``(regex, trainable)`` rules matched against a parameter's path
(``"bert/encoder/layer/3/attention/self/query/kernel"``); the first matching rule wins and
unmatched parameters are trainable. Named presets expand to such lists. The optimizer uses the
resulting boolean mask (frozen leaves get ``optax.set_to_zero`` and no optimizer state) and the
step differentiates only trainable leaves.
"""

from __future__ import annotations

import re
from typing import Any

from sft_jax import tree_util

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


def parse_rules(policy: str | list[Any]) -> list[tuple[str, bool]]:
    """Expands a preset name or validates an explicit ``[(regex, trainable), ...]`` list."""
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(
                f"Unknown freezing preset {policy!r}; known presets: {sorted(PRESETS)}"
            )
        return PRESETS[policy]
    rules = []
    for i, rule in enumerate(policy):
        if len(rule) != 2 or not isinstance(rule[1], bool):
            raise ValueError(f"freeze rule {i} must be (regex, trainable: bool), got {rule!r}")
        rules.append((str(rule[0]), rule[1]))
    return rules


def trainable_mask(params: Any, policy: str | list[Any]) -> Any:
    """Returns a pytree of bools with the structure of ``params`` (True = trainable).

    Raises:
      ValueError: if the policy leaves no parameter trainable, or a rule matches nothing (a typo
        in a regex would otherwise silently train everything).
    """
    rules = [(re.compile(p), t) for p, t in parse_rules(policy)]
    used = [False] * len(rules)

    def decide(path: str) -> bool:
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
