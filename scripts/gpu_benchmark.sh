#!/usr/bin/env bash
# The GPU benchmark behind the README's GPU table: bf16 compute, float32 master weights and
# AdamW state, fused cuDNN attention (causal blocks skipped for the decoders), XLA's cuDNN
# LayerNorm. Run on a machine with one NVIDIA GPU and jax[cuda], flax, optax, absl-py
# (torch + transformers for the PyTorch columns):
#   OUT=results/gpu bash scripts/gpu_benchmark.sh            # every line
#   OUT=results/gpu ONLY='smollm2|bert' bash scripts/gpu_benchmark.sh   # lines matching ONLY
#   EXTRA=--torch ...: extra flags for every line (here: also time the PyTorch step)
# Each line is one `experiments.benchmark` call (own process, own JSON), most important first;
# profiles (jax.profiler traces) go to $PROFILE (default /tmp/gpu_profile).
set -uo pipefail
out="${OUT:-results/gpu}"
only="${ONLY:-.}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_cudnn_layer_norm=true}"
profile="${PROFILE:-/tmp/gpu_profile}"
kind="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z_')"
bench() {  # NAME ARGS...: one benchmark run, its table in NAME.txt, its JSON in NAME.json
  local name="${kind}_$1"; shift
  [[ "$name" =~ $only ]] || return 0
  # shellcheck disable=SC2086  # EXTRA: words on purpose
  timeout 200 "${PYTHON:-python3}" -m experiments.benchmark --dtype bfloat16 \
    --out "$out/$name.json" "$@" ${EXTRA:-} 2>&1 | grep -v '^[IW][0-9]' | tee "$out/$name.txt"
}
bench smollm2-135m_b64 --models smollm2-135m --batch_size 64 --attention cudnn --steps 6 \
  --profile "$profile"
bench smollm2-135m_b64_loss_chunk256 --models smollm2-135m --batch_size 64 --attention cudnn \
  --loss_chunk 256 --steps 6
# A/B: the segment ids (the benchmark's LM batch carries them, one sequence per row) as cuDNN
# sequence lengths (M = 1) or its packed layout (M = 16) instead of a dense segment mask
# (sft_jax/models/cudnn_attention.py).
bench smollm2-135m_b64_cudnn_packed_m1 --models smollm2-135m --batch_size 64 \
  --attention cudnn_packed --packed_max_segments 1 --steps 6 --profile "$profile"
bench smollm2-135m_b64_cudnn_packed_m16 --models smollm2-135m --batch_size 64 \
  --attention cudnn_packed --packed_max_segments 16 --steps 6 --profile "$profile"
bench bert-base_b256 --models bert-base --batch_size 256 --attention cudnn \
  --attention_dropout 0 --dropout hash --steps 6 --profile "$profile"
# A/B: BERT's padding mask as cuDNN sequence lengths instead of a dense [B, 1, T, T] mask.
bench bert-base_b256_cudnn_packed_m1 --models bert-base --batch_size 256 \
  --attention cudnn_packed --packed_max_segments 1 --attention_dropout 0 --dropout hash --steps 6
# A/B: cuBLASLt matmuls with fused bias / GELU epilogues (the elementwise work around BERT's
# matmuls is what keeps it under 50% MFU; README "Speed").
XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_cublaslt=true" bench bert-base_b256_cublaslt \
  --models bert-base --batch_size 256 --attention cudnn --attention_dropout 0 --dropout hash \
  --steps 6
bench bert-base_b512 --models bert-base --batch_size 512 --attention cudnn \
  --attention_dropout 0 --dropout hash --steps 6
bench llama-1b_b32 --models llama-1b --batch_size 32 --attention cudnn --steps 6
# Memory: each block recomputed in the backward pass (runtime.remat=full; about a third more
# model FLOPs). The peak memory against llama-1b_b32's, and the batch it lets fit.
bench llama-1b_b32_remat_full --models llama-1b --batch_size 32 --attention cudnn \
  --remat full --steps 6
bench llama-1b_b64_remat_full --models llama-1b --batch_size 64 --attention cudnn \
  --remat full --steps 6
bench images_b128 --models resnet-50,vit-b16 --batch_size 128 --attention cudnn --torch
