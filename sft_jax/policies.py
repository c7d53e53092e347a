"""Freezing presets: named policies expanded into ordered path-regex rules.

A rule says, for the parameters whose ``/``-joined path (``bert/encoder/layer/3/.../kernel``) it
matches, whether they train, their learning-rate and weight-decay multipliers, and (gradual
unfreezing only) the optimizer step from which they train. ``sft_jax.freezing`` matches the rules
(first match wins) and builds the per-parameter groups the optimizer reads.

Presets (``freeze.policy``):

  ``full``               everything trains.
  ``head_only``          only the head trains (a tied-weights decoder's head is its token
                         embedding, ``LayerStructure.tied_head``).
  ``freeze_embeddings``  the embeddings (the structure's bottom: embeddings, or a CNN's stem) are
                         frozen; without a structure, paths containing ``embeddings/``.
  ``bitfit``             only biases (every ``.../bias``, LayerNorm biases included) + task head.
  ``layernorm_only``     only normalization scales and biases (LayerNorm, RMSNorm, BatchNorm;
                         never the BatchNorm running statistics) + task head.
  ``lora``               only the LoRA adapters (``lora_a``/``lora_b``; see ``sft_jax.lora``).
  ``lora:R``             adapters + task head; the components code applies rank-R adapters first
                         (``freezing.lora_rank``).
  ``train_top:N``        head + top + the last N blocks train; the rest is frozen.
  ``train_bottom:N``     bottom + the first N blocks + head train; the rest is frozen.
  ``freeze_bottom:N``    bottom + the first N blocks are frozen; the rest trains.
  ``llrd:D``             layer-wise learning-rate decay (BEiT / ELECTRA convention), everything
                         trains. With L blocks, depth k is: bottom 0, block i (from 0 at the
                         input side) i + 1, top and head L + 1; the learning rate is multiplied by
                         ``D ** (L + 1 - k)``: head and top 1, last block D, first block
                         ``D ** L``, bottom ``D ** (L + 1)``. Parameters outside the structure 1.
  ``gradual_unfreeze:K`` (ULMFiT-style) the head trains from step 0; at step ``j * K`` the j-th
                         block from the top joins (j = 1: the last block, ..., j = L: the first);
                         at step ``(L + 1) * K`` the top, the bottom and every other parameter.
                         A tied-embedding decoder (no head parameter) starts with its top.

"Task head" (``bitfit``, ``layernorm_only``, ``lora:R``) is a new classification head
(``^classifier/`` or ``^head/``); a causal LM's pretrained ``lm_head`` stays frozen there, as in
PEFT. ``head_only`` and the depth presets use the structure's head (``lm_head`` included).
Depth presets are written against a ``LayerStructure`` (``sft_jax.models.heads``), so they mean
the same for every model family; tied-embedding decoders (GPT-2, SmolLM2) have no separate head
parameter: their embedding table counts as the bottom there, and is the head of ``head_only``.
Models without bias parameters (the Llama family) have nothing for ``bitfit`` to train beyond a
task head: a causal LM under ``bitfit`` is an error that says so.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sft_jax.models.heads import LayerStructure

# Head parameters of every task model live under these top-level names.
HEAD_PATTERN = r"^(classifier|head|lm_head)/"
# New task heads (trained by the parameter-efficient presets); not a causal LM's lm_head.
TASK_HEAD_PATTERN = r"^(classifier|head)/"
# LoRA adapter weights (``.../q_proj/lora_a``); ``sft_jax.lora.is_lora_param`` uses it too.
LORA_PATTERN = r"(^|/)lora_[ab]$"
BIAS_PATTERN = r"(^|/)bias$"
# Scale / bias of normalization layers: BERT ``LayerNorm``, GPT-2 ``ln_1``/``ln_f``, Llama
# ``input_layernorm``/``norm``, ViT ``layernorm_before``, ResNet ``normalization``,
# EfficientNet ``bn0``..``bn2``. BatchNorm ``mean``/``var`` are statistics, never parameters.
NORM_PATTERN = r"(?i)(^|/)(\w*norm\w*|ln_\w+|bn\d*)/(scale|bias)$"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One policy rule.

    Attributes:
      pattern: Regex searched in parameter paths.
      trainable: Whether matching parameters train.
      lr_mult: Learning-rate multiplier (> 0) of matching trainable parameters.
      wd_mult: Weight-decay multiplier (>= 0) of matching trainable parameters.
      unfreeze_step: First optimizer step at which matching parameters train (gradual
        unfreezing; 0 = from the start).
      required: Matching no parameter is an error (explicit rules: a typo would otherwise
        silently train everything); preset rules for optional parts (a head a tied-embedding
        model lacks) are not required.
    """

    pattern: str
    trainable: bool
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    unfreeze_step: int = 0
    required: bool = True


# Presets that do not depend on the model's depth: (regex, trainable) rules.
PRESETS: dict[str, list[tuple[str, bool]]] = {
    "full": [],
    # Linear probe / frozen-encoder head training: only the task head trains.
    "head_only": [(HEAD_PATTERN, True), (r".*", False)],
    "freeze_embeddings": [(r"(^|/)embeddings/", False)],
    # BitFit (Ben Zaken et al. 2022): bias terms only, plus the new head.
    "bitfit": [(TASK_HEAD_PATTERN, True), (BIAS_PATTERN, True), (r".*", False)],
    "layernorm_only": [(TASK_HEAD_PATTERN, True), (NORM_PATTERN, True), (r".*", False)],
    # LoRA (see sft_jax.lora.apply_lora): only the adapter weights train.
    "lora": [(LORA_PATTERN, True), (r".*", False)],
}

# Presets with an argument: name -> (argument type, how to write it).
ARG_PRESETS: dict[str, tuple[type, str]] = {
    "train_top": (int, "N"),
    "train_bottom": (int, "N"),
    "freeze_bottom": (int, "N"),
    "llrd": (float, "DECAY"),
    "gradual_unfreeze": (int, "K"),
    "lora": (int, "RANK"),
}
DEPTH_PRESETS = ("train_top", "train_bottom", "freeze_bottom")


def known_presets() -> list[str]:
    """Every preset as written in ``freeze.policy`` (for error messages)."""
    return sorted(PRESETS) + [f"{n}:{arg}" for n, (_, arg) in ARG_PRESETS.items()]


def parse_arg(policy: str) -> tuple[str, Any]:
    """``"llrd:0.8" -> ("llrd", 0.8)``; ``("full", None)`` for presets without an argument.

    Raises:
      ValueError: unknown preset, or a missing / malformed / out-of-range argument (naming it).
    """
    name, colon, arg = policy.partition(":")
    if not colon:
        if name in PRESETS:
            return name, None
        if name in ARG_PRESETS:
            raise ValueError(f"freeze.policy={policy!r}: write {name}:{ARG_PRESETS[name][1]}")
        raise ValueError(f"Unknown freezing preset {policy!r}; known presets: {known_presets()}")
    if name not in ARG_PRESETS:
        raise ValueError(f"Unknown freezing preset {policy!r}; known presets: {known_presets()}")
    kind, sym = ARG_PRESETS[name]
    try:
        value = kind(arg)
    except ValueError:
        value = None
    low = 0 if name in DEPTH_PRESETS else 1
    if kind is int and (value is None or not arg.isdigit() or value < low):
        raise ValueError(f"freeze.policy={policy!r}: write {name}:{sym} with {sym} >= {low}")
    if kind is float and (value is None or not 0.0 < value <= 1.0):
        raise ValueError(f"freeze.policy={policy!r}: write {name}:{sym} with 0 < {sym} <= 1")
    return name, value


def block_indices(paths: list[str], structure: LayerStructure) -> list[int]:
    """The block numbers present in ``paths`` (sorted), by ``structure.blocks``' group 1."""
    pattern = re.compile(structure.blocks)
    return sorted({int(m.group(1)) for p in paths if (m := pattern.search(p))})


def blocks_regex(structure: LayerStructure, indices: list[int]) -> str:
    """``structure.blocks`` restricted to the given block numbers."""
    if structure.blocks.count(r"(\d+)") != 1:
        raise ValueError(f"LayerStructure.blocks {structure.blocks!r} needs one (\\d+) group")
    alternatives = "|".join(str(i) for i in indices)
    return structure.blocks.replace(r"(\d+)", f"(?:{alternatives})")


def _blocks_rules(structure: LayerStructure, indices: list[int], trainable: bool) -> list[Rule]:
    """``[Rule(blocks restricted to indices, trainable)]``; no rule for no indices."""
    if not indices:
        return []
    return [Rule(blocks_regex(structure, indices), trainable, required=False)]


def _optional(pattern: str | None, trainable: bool, **kw: Any) -> list[Rule]:
    """A rule for an optional structure part (none when the part is None)."""
    return [] if pattern is None else [Rule(pattern, trainable, required=False, **kw)]


def depth_rules(name: str, n: int, paths: list[str], structure: LayerStructure) -> list[Rule]:
    """Rules of a depth preset (``train_top``, ``train_bottom``, ``freeze_bottom``) with N=n."""
    blocks = block_indices(paths, structure)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"freeze.policy={name}:{n}: the model has {len(blocks)} blocks")
    first, last = blocks[:n], blocks[len(blocks) - n :]
    head, top = _optional(structure.head, True), _optional(structure.top, True)
    rest = [Rule(".*", False, required=False)]
    if name == "train_top":
        return [*head, *top, *_blocks_rules(structure, last, True), *rest]
    if name == "train_bottom":
        bottom = [*_optional(structure.bottom, True), *_blocks_rules(structure, first, True)]
        return [*head, *bottom, *rest]
    return [*_optional(structure.bottom, False), *_blocks_rules(structure, first, False)]


def _need_blocks(policy: str, paths: list[str], structure: LayerStructure) -> list[int]:
    blocks = block_indices(paths, structure)
    if not blocks:
        raise ValueError(f"freeze.policy={policy!r}: no parameter matches {structure.blocks!r}")
    return blocks


def llrd_rules(decay: float, paths: list[str], structure: LayerStructure) -> list[Rule]:
    """Layer-wise learning-rate decay: multiplier ``decay ** (L + 1 - depth)`` (module doc)."""
    blocks = _need_blocks(f"llrd:{decay}", paths, structure)
    n = len(blocks)
    rules = [*_optional(structure.head, True), *_optional(structure.top, True)]
    for i, index in enumerate(blocks):  # block i has depth i + 1
        rules.append(Rule(blocks_regex(structure, [index]), True, decay ** (n - i), required=False))
    return rules + _optional(structure.bottom, True, lr_mult=decay ** (n + 1))


def gradual_rules(k: int, paths: list[str], structure: LayerStructure) -> list[Rule]:
    """Gradual unfreezing every ``k`` steps, from the head down (module doc). A tied-embedding
    decoder has no head parameter: its top (the final norm) trains from step 0 instead, so the
    first ``k`` steps are not updates of nothing."""
    blocks = _need_blocks(f"gradual_unfreeze:{k}", paths, structure)
    first = structure.head
    if not any(re.search(first, p) for p in paths) and structure.top is not None:
        first = structure.top
    rules = _optional(first, True)
    for j, index in enumerate(reversed(blocks), start=1):
        regex = blocks_regex(structure, [index])
        rules.append(Rule(regex, True, unfreeze_step=j * k, required=False))
    last = (len(blocks) + 1) * k
    return rules + [Rule(".*", True, unfreeze_step=last, required=False)]


def expand(
    policy: str, paths: list[str] | None = None, structure: LayerStructure | None = None
) -> list[Rule]:
    """The rules of a preset. Presets that count layers need the model's parameter ``paths``
    (frozen-forever ones, such as BatchNorm statistics, left out) and ``structure``.

    Raises:
      ValueError: an unknown preset or bad argument, or a depth preset without a structure.
    """
    name, arg = parse_arg(policy)
    if arg is None and name == "freeze_embeddings" and structure is not None:
        return [Rule(structure.bottom, False)]
    if name == "head_only" and structure is not None and structure.tied_head is not None:
        tied = [Rule(HEAD_PATTERN, True, required=False), Rule(structure.tied_head, True)]
        return [*tied, Rule(".*", False)]
    if arg is None:
        # Rules that must match something: embeddings to freeze, adapters to train (a missing
        # apply_lora would otherwise show up only as "no trainable parameter").
        required = lambda p: name == "freeze_embeddings" or p == LORA_PATTERN
        return [Rule(p, t, required=required(p)) for p, t in PRESETS[name]]
    if name == "lora":
        return [Rule(LORA_PATTERN, True), *_optional(TASK_HEAD_PATTERN, True), Rule(".*", False)]
    if structure is None or paths is None:
        raise ValueError(f"freeze.policy={policy!r} needs a model with a LayerStructure")
    if name in DEPTH_PRESETS:
        return depth_rules(name, arg, paths, structure)
    if name == "llrd":
        return llrd_rules(arg, paths, structure)
    return gradual_rules(arg, paths, structure)


def explicit_rules(rules: Any) -> list[Rule]:
    """Validates ``[(regex, trainable)]`` or ``[(regex, trainable, lr_mult, wd_mult)]``.

    Raises:
      ValueError: naming the bad rule (by index) and what it should look like.
    """
    out = []
    for i, rule in enumerate(rules):
        rule = tuple(rule) if isinstance(rule, (list, tuple)) else (rule,)
        ok = len(rule) in (2, 4) and isinstance(rule[0], str) and isinstance(rule[1], bool)
        mults = rule[2:]
        ok = ok and all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in mults)
        if not ok:
            raise ValueError(
                f"freeze rule {i} must be (regex, trainable: bool) or "
                f"(regex, trainable, lr_mult, wd_mult), got {rule!r}"
            )
        lr_mult, wd_mult = (float(m) for m in mults) if mults else (1.0, 1.0)
        if lr_mult <= 0 or wd_mult < 0:
            raise ValueError(
                f"freeze rule {i} {rule!r}: lr_mult must be > 0 (freeze with trainable=False) "
                "and wd_mult >= 0"
            )
        out.append(Rule(rule[0], rule[1], lr_mult, wd_mult))
    return out
