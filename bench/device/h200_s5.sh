#!/usr/bin/env bash
# Stages of the fifth H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT.
#   fusions: the new decode fusions' kernel tests (-m cuda: GEMV residual epilogue, RMSNorm in kron_quant_multi,
#            q's K^-T in the attention kernel), then the decode A/B in one call: bench/engine_probe.py on the
#            previous commit's package (ab_base/, carried untracked) and on this one, alternated, then the
#            fast-engine GPU tests (fused engine vs the unfused one in llama / qwen2 / qwen3 styles)
#   attrib:  the decode A/B per fusion (FLATQUANT_DECODE_FUSIONS), one process each
#   e2e:     bench_e2e with the real engine and transformers' static-cache generate (the baseline to beat)
# Usage: bash bench/device/h200_s5.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
probe() {  # $1: package root, $2: tag
  PYTHONPATH=$1 timeout ${PROBE_S:-140} python3 bench/engine_probe.py --variants fast --batches 1,16 --decode 128 \
    --out $OUT/engine_ab_$2.json > $OUT/engine_ab_$2.log 2>&1
  echo "== $2"; grep -E "^\| fast" $OUT/engine_ab_$2.log; tail -2 $OUT/engine_ab_$2.log | grep -i error
}
for stage in "$@"; do
case $stage in
fusions)
  nvidia-smi --query-gpu=name --format=csv,noheader
  PYTHONPATH=$PWD timeout ${OPS_S:-100} $PYT --tb=short tests/ops/test_gemv.py tests/ops/test_kron_quant.py \
    tests/ops/test_kv_attention.py -k "residual or norm or q_trans" 2>&1 | grep -v DEBUG | tail -15 \
    | tee $OUT/pytest_fusions_cuda.log | grep -E "^E |passed|failed"
  probe $PWD/ab_base base; probe $PWD new
  [ -n "${AB_TWICE:-}" ] && { probe $PWD/ab_base base2; probe $PWD new2; }
  PYTHONPATH=$PWD timeout ${ENG_S:-200} $PYT --tb=short tests/models/test_real.py -k "fast_engine or cuda" 2>&1 \
    | grep -v DEBUG | tail -20 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
attrib)
  # each decode fusion on its own (separate processes: the setting is read when the decode step compiles)
  for f in ${FUSIONS:-none norm,residual q_trans}; do
    FLATQUANT_DECODE_FUSIONS=$f probe $PWD f_${f//,/_}
  done ;;
e2e)
  PYTHONPATH=$PWD timeout ${E2E_S:-420} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static} --budget-s ${E2E_BUDGET:-380} --out $OUT/e2e_h200_s5.json \
    2>&1 | grep -v -i warn | tail -30 ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
