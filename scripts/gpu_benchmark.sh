#!/usr/bin/env bash
# The GPU benchmark behind the README's GPU table: bf16 compute, float32 master weights and
# AdamW state, fused cuDNN attention. Run on a machine with one NVIDIA GPU and jax[cuda], flax,
# optax, absl-py (torch + transformers for the PyTorch columns):
#   OUT=results/gpu bash scripts/gpu_benchmark.sh
# Each line is one `experiments.benchmark` call (own process, own JSON), most important first.
set -uo pipefail
out="${OUT:-results/gpu}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
bench() {  # NAME ARGS...: one benchmark run, its table in NAME.txt, its JSON in NAME.json
  local name="$1"; shift
  timeout 170 python -m experiments.benchmark --dtype bfloat16 --out "$out/$name.json" "$@" \
    2>&1 | grep -v '^[IW][0-9]' | tee "$out/$name.txt"
}
kind="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z_')"
bench "${kind}_llama-1b_b32" --models llama-1b --batch_size 32 --attention cudnn --steps 6
bench "${kind}_bert-base_b256_profile" --models bert-base --batch_size 256 \
  --attention cudnn --attention_dropout 0 --dropout hash --steps 5 --profile "$out/profile"
bench "${kind}_images_b128" --models resnet-50,vit-b16 --batch_size 128 --attention cudnn --torch
bench "${kind}_smollm2-135m_b64" --models smollm2-135m --batch_size 64 --attention cudnn \
  --steps 6
