#!/usr/bin/env bash
# Stages of the ninth H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT. No model files travel: every stage runs on random LLaMA-shaped weights.
#   kron:   kron_quant layouts at prefill sizes (bench/probe_kron.py; SITES / TOKENS / VARIANTS / KRON_TAG env),
#           multi_token at its default launch only
#   ktest:  the GPU tests of the opt-in prefill layouts (bit equality with whole), K in KTEST
#   e2e:    bench_e2e with the engines in ENGINES (default: ours and the static-cache baseline)
#   tests:  the fast-engine GPU tests
# Usage: bash bench/device/h200_s9.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.site:$PWD
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton
export TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO=0
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
for stage in "$@"; do
case $stage in
kron)
  nvidia-smi --query-gpu=name --format=csv,noheader
  timeout ${KRON_S:-560} python3 bench/probe_kron.py --default-launch \
    --sites ${SITES:-kron11008,down11008glu,kron14336,down14336glu} --tokens ${TOKENS:-2048 32768} \
    --variants ${VARIANTS:-multi_token,multi_token_split,multi_token_pipe} \
    --out $OUT/probe_kron_h200_${KRON_TAG:-s9}.json 2>&1 | grep -v -i warn | tee $OUT/probe_kron_h200_${KRON_TAG:-s9}.log \
    | tail -60 ;;
ktest)
  timeout ${TEST_S:-300} $PYT --tb=short tests/ops/test_kron_quant.py -k "${KTEST:-multi_token_split or multi_token_pipe}" \
    2>&1 | grep -v DEBUG | tail -15 | tee $OUT/pytest_kron_cuda.log | grep -E "^E |passed|failed" ;;
e2e)
  timeout ${E2E_S:-595} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static} --budget-s ${E2E_BUDGET:-545} \
    --out $OUT/e2e_h200_s9.json 2>&1 | grep -v -i warn | tail -40 ;;
tests)
  timeout ${ENG_S:-250} $PYT --tb=short tests/models/test_real.py -k "fast_engine or cuda" 2>&1 \
    | grep -v DEBUG | tail -20 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
