"""Named ablation sweeps for ``experiments.ablate`` (``--sweep NAME``).

``get_sweep(name)`` returns a dict (``sft_jax.sweep.Sweep.from_dict``):

  ``axes``       ``{config key: [values]}``: the grid is their product (times ``--seeds``);
                 the first key varies slowest; the first two keys are the summary's pivot
                 table (rows x columns) and the plots' groups.
  ``base``       ``{config key: value}``: every cell, on top of the config file.
  ``overrides``  ``{condition: {config key: value}}`` for the cells matching ``condition``:
                 ``("optimizer.name", "lion")``, or a tuple of such pairs that must all hold,
                 ``(("freeze.policy", "full"), ("optimizer.name", "sgd"))``. Overrides with
                 more conditions apply after (win over) those with fewer.

Then the cell's swept values and seed, then the command line's ``--config.KEY=VALUE`` flags.
"""

# ---------------------------------------------------------------------------------------------
# freezing_x_optimizers: 4 freezing presets x 4 optimizers on the tweet task (configs/text_cls.py)

PRESETS = ["full", "head_only", "bitfit", "lora:8"]
OPTIMIZERS = ["adamw", "sgd", "lion", "adafactor"]

# Shortened training, the same for every cell. 50 steps x 32 = 1,600 examples (under half an
# epoch of the 4,000-example subsample, so the subsample size only keeps preparation quick);
# 64 tokens truncate 12 of the 4,000 tweets (every training batch lands in the 64 bucket);
# one evaluation at the end on 8 x 64 = 512 validation examples; no data-order check (a fresh
# run per cell); one checkpoint per cell (the sweep deletes it once the cell has finished).
#
# Wall time, quiet 2-core CPU (MiniLM-L6 training step at 32 x 64 with dropout, relative to full
# fine-tuning's ~1.2 s: head_only ~0.23x, bitfit ~0.46x, lora:8 ~2x, measured with
# `experiments.benchmark --models minilm-l6 --batch_size 32 --seq_len 64 --policies ...`):
# per seed and optimizer 50 x (1.2 + 0.28 + 0.55 + 2.4) s ~ 220 s of steps, plus ~15 s per
# cell for building, compiling (cached on disk after a cell's first seed), evaluating and
# saving: 12 x (220 + 4 x 15) s ~ 56 min for the 48 cells. 60 steps would take ~65 min.
SHORT_TRAINING = {
    "train.num_steps": 50,
    "train.eval_every_steps": 50,
    "train.log_every_steps": 5,
    "train.max_eval_batches": 8,
    "train.check_data_order": False,
    "data.max_length": 64,
    "data.buckets": (32, 64),
    "data.max_train_examples": 4000,
    "optimizer.warmup_ratio": 0.1,  # 5 warmup steps, then linear decay to 0 (config default)
    "checkpoint.keep_best": 0,
    "checkpoint.keep_latest": 1,
}

# AdamW peak learning rate per preset. Full fine-tuning: 1e-4, twice the default job's 5e-5,
# because these runs are 10x shorter (50 vs 500 steps) and MiniLM-L6 is small (BERT-base recipes
# use 2e-5..5e-5 over epochs; 1e-4 is the usual upper end for 6-layer MiniLM models). Parameter-
# efficient presets train few, freshly initialized or bias-only weights: 2e-3 (the probe config
# uses 1e-3 for 500 steps; BitFit and LoRA papers use 1e-4..1e-3 over several epochs).
ADAMW_LR = {"full": 1e-4, "head_only": 2e-3, "bitfit": 2e-3, "lora:8": 2e-3}

# Learning rate of each optimizer relative to AdamW's, for the same preset.
#   sgd (momentum 0.9): x30. Plain SGD's step is lr x gradient; with global-norm clipping at 1.0
#     over millions of weights each coordinate's gradient is tiny, where Adam moves every
#     coordinate by ~lr. x10..x30 is the usual range; the top of it, given 50 steps.
#   lion: x0.2. Lion's sign update moves every coordinate by exactly lr (larger than Adam's
#     typical |m / sqrt(v)| < 1); its authors advise 3-10x smaller rates than AdamW.
#   adafactor: x20. optax.adafactor uses relative steps (multiply_by_parameter_scale): the update
#     is lr x the parameter's RMS, and MiniLM's matrices have RMS 0.04-0.1 (the new classifier
#     ~0.02), so lr = 20 x AdamW's gives steps of about AdamW's absolute size. Zero-initialized
#     leaves (LoRA's lora_b, the classifier bias) step at lr x 1e-3 (optax's floor) until they
#     grow: a known weak spot of Adafactor with LoRA, kept as is (it is what the optimizer does).
LR_SCALE = {"adamw": 1.0, "sgd": 30.0, "lion": 0.2, "adafactor": 20.0}

_OPTIMIZER_SETTINGS = {
    "sgd": {"optimizer.momentum": 0.9, "optimizer.nesterov": False},
    # Lion's own b2 (0.99; the config's 0.999 is Adam's) and 5x AdamW's decay, keeping
    # lr x weight_decay equal to AdamW's (decoupled decay is scaled by the learning rate).
    "lion": {"optimizer.b2": 0.99, "optimizer.weight_decay": 0.05},
    # Decoupled decay is scaled by Adafactor's 20x larger lr: 0.01 / 20 keeps lr x decay equal.
    "adafactor": {"optimizer.weight_decay": 0.0005},
}


def freezing_x_optimizers() -> dict:
    """4 freezing presets x 4 optimizers, shortened training (``SHORT_TRAINING``)."""
    overrides = {("optimizer.name", name): s for name, s in _OPTIMIZER_SETTINGS.items()}
    for preset in PRESETS:
        for name in OPTIMIZERS:
            lr = ADAMW_LR[preset] * LR_SCALE[name]
            overrides[(("freeze.policy", preset), ("optimizer.name", name))] = {
                "optimizer.learning_rate": float(f"{lr:.3g}")
            }
    return {
        "axes": {"freeze.policy": PRESETS, "optimizer.name": OPTIMIZERS},
        "base": dict(SHORT_TRAINING),
        "overrides": overrides,
    }


SWEEPS = {"freezing_x_optimizers": freezing_x_optimizers}


def get_sweep(name: str) -> dict:
    """The sweep ``name`` (a key of ``SWEEPS``) as ``{"axes", "base", "overrides"}``."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; named sweeps: {sorted(SWEEPS)}")
    return SWEEPS[name]()
