#!/usr/bin/env bash
# One device call's worth of GPU checks, results packed into $OUT/results.tgz after every step
# (so a call cut short still returns what finished): the attention GPU tests, then the
# scripts/gpu_benchmark.sh lines named in $LINES (default: the cuDNN sequence-length A/B).
#   OUT=/tmp/out bash scripts/gpu_session.sh
#   LINES='smollm2-135m_b64 llama-1b_b32' TESTS=0 OUT=... bash scripts/gpu_session.sh
set -uo pipefail
out="${OUT:?set OUT}"
work="$out/work"
mkdir -p "$work"
pack() { tar -czf "$out/results.tgz" -C "$work" . 2>/dev/null; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax; print(jax.__version__, jax.devices())"; } >"$work/device.txt" 2>&1
pack
if [[ "${TESTS:-1}" == 1 ]]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/models/test_attention.py >"$work/pytest_attention.txt" 2>&1
  echo "exit $?" >>"$work/pytest_attention.txt"
  tail -5 "$work/pytest_attention.txt"
  pack
fi
lines="${LINES:-smollm2-135m_b64 smollm2-135m_b64_cudnn_packed_m1 smollm2-135m_b64_cudnn_packed_m16
  bert-base_b256 bert-base_b256_cudnn_packed_m1}"
for name in $lines; do  # one line at a time, each packed as soon as it ends
  OUT="$work" PROFILE="${PROFILE:-/tmp/gpu_profile}" ONLY="_${name}\$" \
    bash scripts/gpu_benchmark.sh | grep -E "^ *(smollm|bert|llama|resnet|vit)" | tail -2
  pack
done
ls -la "$work"
