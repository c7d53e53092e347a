"""Parameter-group policies: which parameters train, and with what learning-rate / weight-decay
multipliers, decided by path regexes.

A policy is a preset name (``sft_jax.policies``: ``head_only``, ``train_top:2``, ``llrd:0.8``,
``gradual_unfreeze:100``, ``bitfit``, ...) plus optional explicit rules, each
``(regex, trainable)`` or ``(regex, trainable, lr_mult, wd_mult)``, matched against a parameter's
path (``"bert/encoder/layer/3/attention/self/query/kernel"``). Explicit rules come first; the
first matching rule wins; unmatched parameters train with multipliers 1. ``param_groups`` turns
that into per-leaf trees (trainable, lr_mult, wd_mult, unfreeze step) for
``optim.build_optimizer``: frozen leaves get ``optax.set_to_zero`` and no optimizer state, each
distinct (lr_mult, wd_mult, unfreeze step) gets its own optimizer, and the step differentiates
only trainable leaves.

Presets that count layers read the model's ``LayerStructure`` (``sft_jax.models.heads``):
``structure_for(model)`` returns the model's own ``layer_structure`` or, for the text families
whose classes do not define one, the entry of ``STRUCTURES``.

BatchNorm layers whose scale is frozen run in inference mode (``configure_batch_norm``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

from sft_jax import tree_util
from sft_jax.models.heads import LayerStructure
from sft_jax.policies import (  # noqa: F401  (re-exported: the public names of this module)
    DEPTH_PRESETS,
    HEAD_PATTERN,
    LORA_PATTERN,
    PRESETS,
    Rule,
    block_indices,
    depth_rules,
    expand,
    explicit_rules,
    parse_arg,
)

# Layer structures of the model classes that do not carry a ``layer_structure`` attribute.
STRUCTURES: dict[str, LayerStructure] = {
    "BertForSequenceClassification": LayerStructure(
        blocks=r"^bert/encoder/layer/(\d+)/",
        bottom=r"^bert/embeddings/",
        top=r"^bert/pooler/",
        head=r"^classifier/",
    ),
    # Llama / Qwen2 / SmolLM; with tied embeddings there is no lm_head parameter.
    "LlamaForCausalLM": LayerStructure(
        blocks=r"^model/layers/(\d+)/",
        bottom=r"^model/embed_tokens/",
        top=r"^model/norm/",
        head=r"^lm_head/",
    ),
    # GPT-2's LM head is the token embedding (tied): the head regex matches nothing.
    "GPT2LMHeadModel": LayerStructure(
        blocks=r"^transformer/h/(\d+)/",
        bottom=r"^transformer/(wte|wpe)/",
        top=r"^transformer/ln_f/",
        head=r"^lm_head/",
        tied_head=r"^transformer/wte/",
    ),
}
# The token embedding of a Llama-family model with ``tie_word_embeddings`` (SmolLM2, Qwen2.5).
_LLAMA_TIED_HEAD = r"^model/embed_tokens/"


def structure_for(model: Any) -> LayerStructure | None:
    """The model's ``layer_structure`` if it has one, else ``STRUCTURES[class name]``, else
    None (depth presets then fail naming the policy)."""
    own = getattr(model, "layer_structure", None)
    if own is not None:
        return own
    structure = STRUCTURES.get(type(model).__name__)
    config = getattr(model, "config", None)
    if structure is not None and type(model).__name__ == "LlamaForCausalLM":
        if getattr(config, "tie_word_embeddings", False):
            structure = dataclasses.replace(structure, tied_head=_LLAMA_TIED_HEAD)
    return structure


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Per-parameter optimizer settings; every tree has the structure of the params.

    Attributes:
      trainable: bool; True where the parameter ever trains (the step differentiates these).
      lr_mult: float learning-rate multiplier (0.0 where frozen).
      wd_mult: float weight-decay multiplier (0.0 where frozen).
      unfreeze_step: int first optimizer step at which the parameter trains, or None when every
        trainable parameter trains from step 0 (all presets but ``gradual_unfreeze``).
    """

    trainable: Any
    lr_mult: Any
    wd_mult: Any
    unfreeze_step: Any = None

    @classmethod
    def from_mask(cls, trainable: Any) -> ParamGroups:
        """Groups of a plain bool mask: multipliers 1 where trainable, all from step 0."""
        mult = jax.tree.map(lambda t: 1.0 if t else 0.0, trainable)
        return cls(trainable, mult, mult, None)


def _rules(
    policy: str | list[Any], rules: Any, paths: list[str], structure: LayerStructure | None
) -> list[Rule]:
    """Explicit rules first, then the preset's (a list policy is explicit rules alone)."""
    if not isinstance(policy, str):
        return explicit_rules(list(rules) + list(policy))
    return explicit_rules(rules) + expand(policy, paths, structure)


def _unused_message(policy: Any, unused: list[str]) -> str:
    """The error for required rules that matched nothing; for LoRA, what to set."""
    message = f"freeze rules (freeze.rules, freeze.policy) matched no parameter: {unused}"
    if LORA_PATTERN not in unused:
        return message
    if policy == "lora":
        fix = "set lora.rank > 0, or write the policy as lora:RANK"
    else:
        fix = "insert them first (sft_jax.lora.apply_lora_for_policy)"
    return f"{message}; freeze.policy={policy!r} trains LoRA adapters and the model has none: {fix}"


def param_groups(
    params: Any,
    policy: str | list[Any] = "full",
    *,
    rules: Any = (),
    structure: LayerStructure | None = None,
    never: Any | None = None,
) -> ParamGroups:
    """Matches the policy against every parameter path.

    Args:
      params: The model's variables as a pure dict.
      policy: A preset name (``sft_jax.policies``) or a list of explicit rules.
      rules: Explicit rules matched before the preset's: ``(regex, trainable)`` or
        ``(regex, trainable, lr_mult, wd_mult)``, e.g. ``(("^classifier/", True, 10.0, 0.0),)``.
      structure: The model's layer structure (``structure_for``), for presets that count layers.
      never: Bool pytree like ``params``; True leaves are never trainable and not matched
        against the rules (BatchNorm running statistics, ``train_state.stats_mask``).

    Raises:
      ValueError: an unknown preset or malformed rule; an explicit rule that matches no
        parameter (a typo in a regex would otherwise silently train everything); a policy that
        leaves no parameter trainable.
    """
    excluded = set()
    if never is not None:
        excluded = {p for p, m in tree_util.flatten_to_dict(never).items() if m}
    paths = [p for p in tree_util.flatten_to_dict(params) if p not in excluded]
    compiled = [(re.compile(r.pattern), r) for r in _rules(policy, rules, paths, structure)]
    used = [False] * len(compiled)
    default = Rule(".*", True)

    def decide(path: str) -> Rule:
        if path in excluded:
            return Rule(".*", False)
        for i, (pattern, rule) in enumerate(compiled):
            if pattern.search(path):
                used[i] = True
                return rule
        return default

    decided = tree_util.map_with_path_str(lambda path, _: decide(path), params)
    is_rule = lambda x: isinstance(x, Rule)
    unused = [r.pattern for (_, r), u in zip(compiled, used) if r.required and not u]
    if unused:
        raise ValueError(_unused_message(policy, unused))
    trainable = jax.tree.map(lambda r: r.trainable, decided, is_leaf=is_rule)
    if not any(tree_util.leaves(trainable)):
        raise ValueError(
            f"freezing policy {policy!r} leaves no trainable parameter (rules: "
            f"{[r.pattern for _, r in compiled if r.trainable]} match nothing in this model)"
        )
    mult = lambda name: jax.tree.map(
        lambda r: float(getattr(r, name)) if r.trainable else 0.0, decided, is_leaf=is_rule
    )
    step = jax.tree.map(lambda r: r.unfreeze_step if r.trainable else 0, decided, is_leaf=is_rule)
    gradual = any(tree_util.leaves(step))
    return ParamGroups(trainable, mult("lr_mult"), mult("wd_mult"), step if gradual else None)


def trainable_mask(
    params: Any,
    policy: str | list[Any],
    *,
    structure: LayerStructure | None = None,
    never: Any | None = None,
) -> Any:
    """The bool pytree (True = trains at some point) of ``param_groups(...)``."""
    return param_groups(params, policy, structure=structure, never=never).trainable


def groups_from_config(freeze_cfg: Any, params: Any, model: Any, never: Any = None) -> ParamGroups:
    """``param_groups`` from the ``freeze`` config block (``policy`` and optional ``rules``),
    with the model's layer structure (``structure_for``)."""
    return param_groups(
        params,
        freeze_cfg.policy,
        rules=tuple(freeze_cfg.get("rules", ())),
        structure=structure_for(model),
        never=never,
    )


def unfreeze_steps(params: Any, structure: LayerStructure, k: int, never: Any = None) -> Any:
    """Per-leaf first training step of ``gradual_unfreeze:k`` (int tree like ``params``): head 0,
    the j-th block from the top ``j * k``, everything else ``(L + 1) * k`` (see
    ``sft_jax.policies``); 0 at ``never`` leaves, which never train."""
    groups = param_groups(params, f"gradual_unfreeze:{k}", structure=structure, never=never)
    return groups.unfreeze_step


def lora_rank(policy: Any) -> int | None:
    """R for a ``lora:R`` policy, else None.

    The components code calls it before building the mask: with a rank, adapters must be
    inserted first (``sft_jax.lora.apply_lora(model, rank=R, ...)``) so that the ``lora_a`` /
    ``lora_b`` leaves exist. Raises ValueError for a malformed ``lora:`` argument.
    """
    if not isinstance(policy, str) or not policy.startswith("lora:"):
        return None
    return parse_arg(policy)[1]


BATCH_NORM_MODES = ("auto", "train", "frozen")


def configure_batch_norm(
    model: Any, trainable: Any, mode: str, unfreeze_step: Any | None = None
) -> int:
    """Sets each BatchNorm's static ``frozen`` flag; returns how many are frozen.

    ``"auto"``: frozen (inference mode: running statistics, never updated) where the layer's
    scale is frozen by the policy, so a frozen base behaves as at inference while the layers
    being fine-tuned normalize with batch statistics (Keras' and timm's usual practice). Under
    gradual unfreezing (``unfreeze_step``, the int tree of ``ParamGroups``) a layer unfrozen
    after step 0 stays in inference mode throughout: its scale and bias train once unfrozen,
    but its statistics never drift while it is still frozen (and, as Keras advises for
    fine-tuning, not after either). ``"train"``: every BatchNorm uses batch statistics in
    training. ``"frozen"``: none does. Call before splitting the model: the flag is part of the
    graph definition.
    """
    from flax import nnx

    from sft_jax.models.conv import BatchNorm

    if mode not in BATCH_NORM_MODES:
        raise ValueError(f"model.batch_norm={mode!r}; use one of {BATCH_NORM_MODES}")
    flat = tree_util.flatten_to_dict(trainable)
    later = tree_util.flatten_to_dict(unfreeze_step) if unfreeze_step is not None else {}
    frozen = 0
    for path, module in nnx.iter_graph(model):
        if isinstance(module, BatchNorm):
            scale = "/".join(str(p) for p in path) + "/scale"
            trains_from_start = flat.get(scale, False) and not later.get(scale, 0)
            module.frozen = mode == "frozen" or (mode == "auto" and not trains_from_start)
            frozen += module.frozen
    return frozen
