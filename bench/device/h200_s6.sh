#!/usr/bin/env bash
# Stages of the sixth H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT.
#   gemm:  the prefill int8 GEMM schedules (one tile per program vs persistent, flattened or not) on the engine's
#          fused projection shapes (bench/probe_tma.py --shapes engine), after the TMA kernel's GPU tests
#   overlap: the prefill's weight unpack on a second stream behind the GEMMs (bench/probe_overlap.py)
#   prefill: the prefill fusions A/B (FLATQUANT_PREFILL_FUSIONS per process; PREFILL env list), engine_probe
#   kron:  kron_quant layouts at many tokens (bench/probe_kron.py; SITES / TOKENS env)
#   e2e:   bench_e2e with the real engine and transformers' static-cache generate (the baseline to beat)
#   tests: the fast-engine GPU tests (fused engine vs the unfused one in llama / qwen2 / qwen3 styles)
# Usage: bash bench/device/h200_s6.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
probe() {  # $1: tag; extra engine_probe arguments in PROBE_ARGS
  PYTHONPATH=$PWD timeout ${PROBE_S:-140} python3 bench/engine_probe.py --variants fast --batches 1,16 \
    --decode ${DECODE:-64} ${PROBE_ARGS:-} --out $OUT/engine_$1.json > $OUT/engine_$1.log 2>&1
  echo "== $1"; grep -E "^\| fast" $OUT/engine_$1.log; tail -2 $OUT/engine_$1.log | grep -i error
}
for stage in "$@"; do
case $stage in
gemm)
  nvidia-smi --query-gpu=name --format=csv,noheader
  PYTHONPATH=$PWD timeout ${OPS_S:-90} $PYT --tb=short tests/ops/test_matmul.py -k tma 2>&1 | grep -v DEBUG \
    | tail -8 | tee $OUT/pytest_tma_cuda.log | grep -E "^E |passed|failed"
  PYTHONPATH=$PWD timeout ${GEMM_S:-300} python3 bench/probe_tma.py --shapes engine --out $OUT/probe_tma_h200.json \
    2>&1 | grep -v -i warn | tee $OUT/probe_tma_h200.log | tail -120 ;;
overlap)
  PYTHONPATH=$PWD timeout ${OVL_S:-200} python3 bench/probe_overlap.py --out $OUT/probe_overlap_h200.json 2>&1 \
    | grep -v -i warn | tail -20 ;;
prefill)
  for f in ${PREFILL:-none norm,residual}; do
    FLATQUANT_PREFILL_FUSIONS=$f probe prefill_${f//,/_}
  done ;;
kron)
  PYTHONPATH=$PWD timeout ${KOPS_S:-120} $PYT --tb=short tests/ops/test_kron_quant.py -k "pipelined or layouts or tie" 2>&1 \
    | grep -v DEBUG | tail -8 | tee $OUT/pytest_kron_cuda.log | grep -E "^E |passed|failed"
  PYTHONPATH=$PWD timeout ${KRON_S:-200} python3 bench/probe_kron.py --sites ${SITES:-down14336glu,kron14336,kron4096} \
    --tokens ${TOKENS:-2048 32768} --variants ${VARIANTS:-whole,pipelined,pipelined_fastq} \
    --out $OUT/probe_kron_h200_s6.json 2>&1 | grep -v -i warn | tee $OUT/probe_kron_h200_s6.log | tail -60 ;;
e2e)
  PYTHONPATH=$PWD timeout ${E2E_S:-420} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static} --budget-s ${E2E_BUDGET:-380} --out $OUT/e2e_h200_s6.json \
    2>&1 | grep -v -i warn | tail -30 ;;
tests)
  PYTHONPATH=$PWD timeout ${ENG_S:-250} $PYT --tb=short tests/models/test_real.py -k "fast_engine or cuda" 2>&1 \
    | grep -v DEBUG | tail -20 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
