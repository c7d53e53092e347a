"""Task losses: how a batch and a model's outputs become a loss and countable statistics.

A task is the only place that knows which batch keys a model consumes. Losses are returned as
*sums* with their weights so that gradient accumulation and data-parallel reduction are exact:
``loss = loss_sum / weight`` over the whole global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sft_jax import lm_loss
from sft_jax.models import dropout


class ClassificationTask:
    """Sequence classification: ``model(input_ids, attention_mask, token_type_ids) -> [B, K]``.

    Batch keys: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32 [B, T]), ``labels``
    (int32 [B]), ``example_mask`` (float32 [B], 0 for padding rows).
    """

    name = "classification"

    def total_weight(self, batch: dict) -> jax.Array:
        """What the global-batch loss is averaged over: the real examples."""
        return jnp.sum(batch["example_mask"].astype(jnp.float32))

    def _forward(self, model: Any, batch: dict, dropout_rng: jax.Array | None, train: bool):
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            dropout_rng=dropout_rng,
        )

    def logits(
        self, model: Any, batch: dict, dropout_rng: jax.Array | None, train: bool = False
    ) -> jax.Array:
        with dropout.dropout_scope(dropout_rng):  # LoRA adapters read their key from it
            logits = self._forward(model, batch, dropout_rng, train)
        return logits.astype(jnp.float32)  # loss in float32 whatever the compute dtype

    def loss_sums(
        self, model: Any, batch: dict, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns ``(loss_sum, stats)``: stats are sums over real examples (``weight``,
        ``correct``). Called by the train step: the model runs in training mode."""
        logits = self.logits(model, batch, dropout_rng, train=True)  # [B, K]
        w = batch["example_mask"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])  # [B]
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        loss_sum = jnp.sum(losses * w)
        return loss_sum, {
            "loss_sum": loss_sum,
            "weight": jnp.sum(w),
            "correct": jnp.sum(correct * w),
        }

    def eval_outputs(self, model: Any, batch: dict) -> dict[str, jax.Array]:
        """Per-example outputs the host accumulates: predictions with the labels and example
        mask they are scored against (a multi-host process holds only its own rows of the
        batch, so the host reads all three here), and the loss sums."""
        logits = self.logits(model, batch, None)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return {
            "preds": jnp.argmax(logits, -1).astype(jnp.int32),
            "labels": batch["labels"],
            "example_mask": batch["example_mask"],
            "loss_sum": jnp.sum(losses * batch["example_mask"]),
            "weight": jnp.sum(batch["example_mask"]),
        }


class CausalLMTask:
    """Next-token prediction on (possibly packed) rows, loss only where ``target_mask`` is 1.

    Batch keys (int32 [B, T]): ``input_ids``, ``targets`` (the token each position predicts),
    ``target_mask`` (1 where that target carries loss: assistant tokens and end-of-turn),
    ``segment_ids`` (1, 2, ... per packed conversation, 0 = padding) and ``positions`` (restarting
    per segment). Packing therefore changes nothing: no token attends across segments and each
    segment sees the positions it would see alone.
    """

    name = "causal_lm"

    def total_weight(self, batch: dict) -> jax.Array:
        """What the global-batch loss is averaged over: the target tokens."""
        return jnp.sum(batch["target_mask"].astype(jnp.float32))

    def logits(self, model: Any, batch: dict, dropout_rng: jax.Array | None) -> jax.Array:
        with dropout.dropout_scope(dropout_rng):  # LoRA adapters read their key from it
            logits = model(**self._inputs(batch), dropout_rng=dropout_rng)
        return logits.astype(jnp.float32)  # [B, T, V]

    @staticmethod
    def _inputs(batch: dict) -> dict[str, jax.Array]:
        return {k: batch[k] for k in ("input_ids", "segment_ids", "positions")}

    def _sums(self, model: Any, batch: dict, dropout_rng: jax.Array | None) -> dict:
        """Loss, target-token count and correct argmax predictions, summed over target tokens.

        Models that expose ``hidden_states`` / ``lm_head_fn`` (Llama family, GPT-2) hand the
        loss their logits in the compute dtype (``lm_loss.cross_entropy`` works in float32 and
        returns the logits' gradient in that dtype), in chunks of ``lm_loss.loss_chunk()``
        positions where it is set."""
        chunk, targets = lm_loss.loss_chunk(), batch["targets"]
        w = batch["target_mask"].astype(jnp.float32)  # [B, T]
        if hasattr(model, "lm_head_fn"):
            with dropout.dropout_scope(dropout_rng):  # also around the head (LoRA adapters)
                hidden = model.hidden_states(**self._inputs(batch), dropout_rng=dropout_rng)
                head, params = model.lm_head_fn()
                if chunk:
                    sums = lm_loss.chunked_loss_sums(head, params, hidden, targets, w, chunk)
                else:
                    sums = lm_loss.weighted_sums(head(params, hidden), targets, w)
        else:
            sums = lm_loss.weighted_sums(self.logits(model, batch, dropout_rng), targets, w)
        return {"loss_sum": sums[0], "weight": jnp.sum(w), "correct": sums[1]}

    def loss_sums(
        self, model: Any, batch: dict, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns ``(loss_sum, stats)`` summed over target tokens (``weight``, ``correct``)."""
        sums = self._sums(model, batch, dropout_rng)
        return sums["loss_sum"], sums

    def eval_outputs(self, model: Any, batch: dict) -> dict[str, jax.Array]:
        """Summed loss, target count and correct argmax predictions: perplexity =
        exp(loss_sum / weight)."""
        return self._sums(model, batch, None)


class ImageClassificationTask(ClassificationTask):
    """Image classification: ``model(pixel_values, train=..., dropout_rng=...) -> [B, K]``.

    Batch keys: ``pixel_values`` (float32 [B, H, W, C], normalized), ``labels`` (int32 [B]),
    ``example_mask`` (float32 [B]). In training the model normalizes with batch statistics
    (BatchNorm layers that are not frozen) and updates its running ones; in evaluation it uses
    the running statistics and no dropout.
    """

    name = "image_classification"

    def _forward(self, model: Any, batch: dict, dropout_rng: jax.Array | None, train: bool):
        return model(batch["pixel_values"], train=train, dropout_rng=dropout_rng)


def batch_units(batch: dict) -> tuple[str, Any]:
    """What throughput counts in a batch, and how many: ``("images", real examples)`` for
    image batches, else ``("tokens", real tokens)`` (attention mask, else packed segment ids);
    padding rows and padding tokens count for nothing. The count is a sum over the batch's
    arrays: a numpy scalar for a host batch, a traced scalar inside the train step (which
    reports it over the global batch, ``units``)."""
    if "pixel_values" in batch:
        return "images", batch["example_mask"].sum()
    if "attention_mask" in batch:
        return "tokens", batch["attention_mask"].sum()
    return "tokens", (batch["segment_ids"] > 0).sum()


TASKS = {
    "classification": ClassificationTask,
    "causal_lm": CausalLMTask,
    "image_classification": ImageClassificationTask,
}


def get_task(name: str) -> ClassificationTask | CausalLMTask:
    if name not in TASKS:
        raise ValueError(f"model.task={name!r}; supported: {sorted(TASKS)}")
    return TASKS[name]()
