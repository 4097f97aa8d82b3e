#!/usr/bin/env bash
# Stages of the seventh H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT. The compile caches live in the git-ignored .cache/ of the repository root, which the device keeps between
# calls while the machine stays warm.
#   warm:  fill the compile caches of the two torchao baselines (each engine in its own process, both at once,
#          batch 1 then 16 exactly as the measured run does, so that its graphs hit the cache); meanwhile the
#          GPU tests of the last review fixes (kron_quant ties / pipelined layouts, persistent TMA GEMM)
#   e2e:   bench_e2e with every engine in one command (carry .whl for torchao); hf-bf16-static, the baseline
#          to beat, compiles cold there as in every earlier run
#   kron:  kron_quant layouts at prefill sizes (bench/probe_kron.py; SITES / TOKENS / VARIANTS env)
#   tests: the fast-engine GPU tests
# Usage: bash bench/device/h200_s7.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.site:$PWD
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton
# no profile-guided dynamic shapes across processes: every process compiles batch 1 static, then batch 16 with a
# dynamic batch (automatic dynamic), whatever ran before it
export TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO=0
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
E2E="bench/bench_e2e.py --quick --decode 256"
ENGINES_ALL=real-w4a4kv4,hf-bf16-static,torchao-int4,torchao-fp8,ours-bf16,hf-bf16-eager
install_ao() {
  [ -d .site/torchao ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/torchao-*.whl
}
for stage in "$@"; do
case $stage in
warm)
  nvidia-smi --query-gpu=name --format=csv,noheader
  install_ao
  mkdir -p .cache
  for e in torchao-int4 torchao-fp8; do
    timeout ${WARM_S:-450} python3 $E2E --engines $e --out $OUT/warm_$e.json > $OUT/warm_$e.log 2>&1 &
  done
  timeout ${TEST_S:-400} $PYT --tb=short tests/ops/test_kron_quant.py tests/ops/test_matmul.py \
    -k "tie or pipelined or layouts or persistent or overflow" 2>&1 | grep -v DEBUG | tail -12 \
    | tee $OUT/pytest_review_cuda.log | grep -E "^E |passed|failed"
  wait
  for e in torchao-int4 torchao-fp8; do echo "== $e"; grep -E "warm-up|error|Error" $OUT/warm_$e.log | tail -4; done
  du -sh .cache ;;
e2e)
  install_ao
  timeout ${E2E_S:-595} python3 $E2E --engines ${ENGINES:-$ENGINES_ALL} --budget-s ${E2E_BUDGET:-545} \
    --out $OUT/e2e_h200_s7.json 2>&1 | grep -v -i warn | tail -40 ;;
kron)
  timeout ${KRON_S:-200} python3 bench/probe_kron.py --sites ${SITES:-kron14336,kron11008,down14336glu,kron4096} \
    --tokens ${TOKENS:-2048 32768} ${VARIANTS:+--variants $VARIANTS} --out $OUT/probe_kron_h200_s7.json 2>&1 \
    | grep -v -i warn | tee $OUT/probe_kron_h200_s7.log | tail -80 ;;
tests)
  timeout ${ENG_S:-250} $PYT --tb=short tests/models/test_real.py -k "fast_engine or cuda" 2>&1 \
    | grep -v DEBUG | tail -20 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
