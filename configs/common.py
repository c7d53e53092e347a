"""Config blocks shared by every experiment family: optimizer, freezing, training loop,
checkpointing and device mesh. Each family's config file sets its own values on top."""

import ml_collections


def optimizer(**overrides) -> ml_collections.ConfigDict:
    """AdamW with warmup (10% of steps) then decay, global-norm clipping at 1.0.

    Optimizers and schedules: ``sft_jax/optimizers.py`` and ``sft_jax/optim.py``."""
    c = ml_collections.ConfigDict()
    # adamw | adam | sgd | adafactor | lion | lamb | muon | schedule_free_adamw
    c.name = "adamw"
    c.learning_rate = 5e-5
    c.b1 = 0.9  # adamw, adam, lion, lamb, muon (its Adam part), schedule_free_adamw (b1 only)
    c.b2 = 0.999  # the same; adafactor uses its own factored defaults, not b1 / b2 / eps
    c.eps = 1e-8  # adamw, adam, lamb, muon, schedule_free_adamw
    c.momentum = 0.9  # sgd only
    c.nesterov = False  # sgd only
    c.muon_beta = 0.95  # muon: momentum of the orthogonalized (matrix) part
    c.muon_consistent_rms = 0.2  # muon: update RMS matched to AdamW's (0 = width scaling)
    c.weight_decay = 0.01  # decoupled, matrices only; adam and sgd use none
    c.schedule = "linear"  # constant | linear | cosine | wsd (after warmup)
    c.decay_ratio = 0.1  # wsd: decay over the last 10% of the steps
    c.decay_shape = "linear"  # wsd: linear | sqrt (1 - sqrt)
    c.warmup_steps = 0
    c.warmup_ratio = 0.1
    c.grad_clip_norm = 1.0
    c.accumulation_steps = 1
    # model.dtype=float16 only: the dynamic loss scale's start (halved after a gradient
    # overflow, doubled after 2000 finite steps; sft_jax/loss_scale.py)
    c.loss_scale_init = 2.0**16
    c.update(overrides)
    return c


def freeze(policy: str = "full") -> ml_collections.ConfigDict:
    """``policy``: a preset of ``sft_jax/policies.py`` (``full``, ``head_only``, ``llrd:0.8``,
    ``train_top:2``, ``gradual_unfreeze:100``, ``bitfit``, ...). ``rules``: explicit rules
    matched first (first match wins), ``(regex, trainable)`` or
    ``(regex, trainable, lr_mult, wd_mult)``, e.g. ``(("^classifier/", True, 10.0, 0.0),)``."""
    c = ml_collections.ConfigDict()
    c.policy = policy
    c.rules = ()
    return c


def train(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_epochs = 1
    c.num_steps = 0  # > 0 overrides num_epochs
    c.eval_every_steps = 0  # 0 = once per epoch
    c.log_every_steps = 10
    c.early_stopping_patience = 0  # evaluations without improvement; 0 = off
    c.max_eval_batches = 0  # 0 = the whole validation split
    c.max_skipped_steps = 5  # NaN/Inf updates skipped in a row before stopping with a checkpoint
    c.check_data_order = True  # log each epoch's batch hash; a resumed run must match it
    # Threads reading training batches ahead of the step (sft_jax.data.feed; the batches are the
    # same either way): -1 = 0 on a CPU backend (the cores run the step), else min(16, cores).
    c.prefetch_threads = -1
    c.update(overrides)
    return c


def checkpoint(best_metric: str, best_mode: str) -> ml_collections.ConfigDict:
    """Keep the latest and the best checkpoint by a validation metric ("max" or "min")."""
    c = ml_collections.ConfigDict()
    c.keep_latest = 1
    c.keep_best = 1
    c.best_metric = best_metric
    c.best_mode = best_mode
    c.async_save = True
    c.every_steps = 0  # also save every N steps (0 = only at evaluations and on preemption)
    return c


def mesh() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    c.mode = "jit"  # jit (sharded over the mesh) | pmap (replicated state, all local devices)
    return c


def runtime() -> ml_collections.ConfigDict:
    """Process setup (sft_jax.runtime): multi-host init and the persistent compilation cache."""
    c = ml_collections.ConfigDict()
    c.distributed = False  # jax.distributed.initialize() (or set SFT_JAX_DISTRIBUTED=1)
    # Explicit multi-host settings ("" / -1: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
    # $JAX_PROCESS_ID, else the cluster's auto-detection).
    c.coordinator_address = ""
    c.num_processes = -1
    c.process_id = -1
    c.compilation_cache_dir = ""  # "" = $SFT_JAX_COMPILATION_CACHE or ~/.cache/sft_jax/xla
    # auto|reuse|system: keep freed host memory in the process, so XLA CPU's per-step buffer is
    # not faulted in from the OS every step (sft_jax.cpu_allocator; auto: reuse on CPU-only
    # installs).
    c.cpu_allocator = "auto"
    # Kernel choices (speed only; sft_jax.runtime): attention xla|cudnn|cudnn_packed (GPU, bf16,
    # no attention dropout; cudnn_packed: segment ids as cuDNN sequence lengths, up to
    # packed_max_segments per row (1: padded rows), instead of a dense mask), dropout
    # threefry|hash (different masks), cpu_matmul xla|onednn.
    c.attention = "xla"
    c.packed_max_segments = 16
    c.dropout = "threefry"
    c.cpu_matmul = "xla"
    # Causal LM loss in chunks of this many positions (0 = whole sequence; sft_jax.lm_loss): only
    # one chunk's float32 logits in memory at a time, gradients formed in the forward pass.
    c.loss_chunk = 0
    # none|full: recompute each block's activations (transformer blocks, ResNet residual layers,
    # EfficientNet MBConv blocks) in the backward pass from its input instead of keeping them
    # (sft_jax.models.remat): less memory, a third more FLOPs.
    c.remat = "none"
    return c
