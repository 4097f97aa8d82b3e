#!/usr/bin/env bash
# Stages of one H200 session through the device tool (see bench/README.md); each writes logs and JSON under $OUT.
#   check:  the GPU tests of this session's kernels and engine paths, the kron_quant / attention probes, and a
#           per-kernel engine profile (batch 1 and 16)
#   e2e:    bench_e2e with every baseline, in one command (carry .whl for torchao)
#   part1 / part2: keep a third of the SmolLM2 GGUF (.gguf1 / .gguf2 carried) on the warm machine
#   gpu-tests: the engine-level -m cuda tests (fast vs unfused engine, Qwen2/Qwen3 GPU vs CPU engine), then all
#   generate: join the GGUF with the third part (.gguf3 carried, with its sha256), export the W4A4KV4 checkpoint of
#           bench/results/transforms_smollm2_w4a4kv4_15ep and time `flatquant generate`'s engine against
#           transformers' static-cache generate (bench/bench_generate.py --device cuda)
# Usage: bash bench/device/h200_s3.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
FQ=/root/fq
mkdir -p $FQ
for stage in "$@"; do
case $stage in
part1) cp .gguf1/part $FQ/p1 ;;
part2) cp .gguf2/part $FQ/p2 ;;
generate)
  cat $FQ/p1 $FQ/p2 .gguf3/part > $FQ/smollm2.gguf
  echo "$(cat .gguf3/sha)  $FQ/smollm2.gguf" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf-*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout 400 python3 bench/bench_generate.py --model $FQ/smollm2.gguf --device cuda \
    --transforms bench/results/transforms_smollm2_w4a4kv4_15ep --new 128 --out $OUT/generate_h200.json 2>&1 \
    | grep -v Warning | tail -25 ;;
check)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 100 python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=short tests/models/test_real.py \
    -k fast_engine 2>&1 | grep -v DEBUG | tail -40 | tee $OUT/pytest_fast_engine.log | grep -E "Error|assert|passed|failed"
  timeout 100 python3 bench/probe_kron.py --tokens ${KRON_TOKENS:-1 2048 32768} --out $OUT/probe_kron_h200.json 2>&1 \
    | grep -v Warning | tee $OUT/probe_kron.log
  timeout 120 python3 bench/engine_probe.py --profile --variants fast --batches 1,16 --decode 32 \
    --out $OUT/engine_probe_h200_s3.json > $OUT/engine_probe.log 2>&1
  grep -A22 "decode_kernels\|prefill_kernels" $OUT/engine_probe.log | grep -v "^--" | head -100
  grep -A4 "variant |" $OUT/engine_probe.log
  timeout ${TEST_S:-200} python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=line \
    tests/ops/test_kron_quant.py tests/ops/test_kv_quant.py tests/ops/test_kv_attention.py tests/ops/test_gemv.py \
    tests/models/test_real_linear.py tests/models/test_real_families.py tests/models/test_layer.py 2>&1 \
    | grep -v DEBUG | tail -40 | tee $OUT/pytest_cuda.log | tail -14 ;;
e2e)
  timeout 60 python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=short tests/models/test_real.py \
    -k fast_engine 2>&1 | grep -v DEBUG | tail -30 | tee $OUT/pytest_fast_engine.log | grep -E "Error|assert|passed|failed"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/torchao-*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout ${E2E_S:-470} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines real-w4a4kv4,hf-bf16-static,torchao-fp8,ours-bf16,hf-bf16-eager,torchao-int4 \
    --budget-s ${E2E_BUDGET:-330} --out $OUT/e2e_h200_s3.json 2>&1 | grep -v -i warn | tail -30
  timeout ${TEST_S:-80} python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=line \
    tests/models/test_real_families.py tests/models/test_real.py tests/models/test_real_linear.py \
    tests/ops/test_kv_attention.py 2>&1 | grep -v DEBUG | tail -20 | tee $OUT/pytest_cuda2.log | tail -8 ;;
gpu-tests)
  # what this session could not re-run: the fast-vs-unfused engine test after the SymBool fix, and the families'
  # GPU-vs-CPU engine test (Qwen2/Qwen3), then the rest of the -m cuda suite while time allows
  timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=short \
    tests/models/test_real.py tests/models/test_real_families.py 2>&1 | grep -v DEBUG | tail -30 \
    | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed"
  timeout ${TEST_S:-300} python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no --tb=line tests 2>&1 \
    | grep -v DEBUG | tail -30 | tee $OUT/pytest_cuda_all.log | tail -8 ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
