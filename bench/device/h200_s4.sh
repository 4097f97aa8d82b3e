#!/usr/bin/env bash
# Stages of the fourth H200 session through the device tool (see bench/README.md); each writes logs and JSON under
# $OUT. Calls that share the GGUF parts must follow each other within the machine's idle window.
#   part1 / part2: keep a third of the SmolLM2 GGUF (.gguf1 / .gguf2 carried) on the warm machine
#   probe:     programmatic dependent launch (PDL) checks and the engine's launch A/B (PDL off/on, GEMV L2
#              prefetch depths), the engine-level -m cuda tests (fast vs unfused engine, Qwen2/Qwen3 GPU vs CPU
#              engine), a cold-weight GEMV launch sweep at one token, then the kernels' -m cuda tests
#   generate:  join the GGUF with the third part (.gguf3 carried), export the W4A4KV4 checkpoint and time
#              `flatquant generate`'s engine against transformers' static-cache generate (bench_generate.py)
#   final:     bench_e2e (real engine, bf16-static, our bf16, eager), the families' GPU test, the engine tests
#   tma:       the TMA GEMM tile probe (is a 128 x 128 tile faster for the k/v projections at 2048 tokens?)
#   verify:    the families' GPU test for every config, then the engine-level GPU tests (for the next session)
#   e2e:       the fast-engine test, then bench_e2e with every baseline the time allows, in one command
# Usage: bash bench/device/h200_s4.sh STAGE [STAGE ...]
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
FQ=/root/fq
mkdir -p $FQ
PYT="python3 -m pytest -q -m cuda -p no:cacheprovider --show-capture=no"
for stage in "$@"; do
case $stage in
part1) cp .gguf1/part $FQ/p1 ;;
part2) cp .gguf2/part $FQ/p2 ;;
probe)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import triton, torch; from triton.language.extra import cuda as c; print('triton', triton.__version__, 'torch', torch.__version__, 'gdc', hasattr(c, 'gdc_wait'))"
  timeout 120 $PYT --tb=short tests/ops/test_launch.py 2>&1 | grep -v DEBUG | tail -25 | tee $OUT/pytest_launch.log | grep -E "^E |passed|failed"
  grep -q failed $OUT/pytest_launch.log && export FLATQUANT_PDL=0 && echo "PDL test failed: PDL off from here"
  timeout 200 python3 bench/engine_probe.py --launch-ab "PDL=0;PDL=1,PF=0;PDL=1,PF=2;PDL=1,PF=8" --batches 1,16 \
    --decode 128 --out $OUT/engine_launch_ab_h200.json > $OUT/engine_launch_ab.log 2>&1
  grep "^|" $OUT/engine_launch_ab.log; tail -3 $OUT/engine_launch_ab.log | grep -i error
  timeout 200 $PYT --tb=short tests/models/test_real.py tests/models/test_real_families.py 2>&1 | grep -v DEBUG | tail -30 \
    | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed"
  timeout 110 python3 bench/probe_gemv.py --sweep 1 --out $OUT/probe_gemv_sweep_h200.json 2>&1 | grep -v Warn
  timeout ${TEST_S:-120} $PYT --tb=line tests/ops/test_gemv.py tests/ops/test_kron_quant.py tests/ops/test_kv_quant.py \
    tests/ops/test_kv_attention.py tests/ops/test_pack.py tests/ops/test_matmul.py 2>&1 | grep -v DEBUG | tail -20 \
    | tee $OUT/pytest_ops_cuda.log | tail -6 ;;
generate)
  cat $FQ/p1 $FQ/p2 .gguf3/part > $FQ/smollm2.gguf
  echo "$(cat .gguf3/sha)  $FQ/smollm2.gguf" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf-*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout ${GEN_S:-400} python3 bench/bench_generate.py --model $FQ/smollm2.gguf \
    --device cuda --transforms bench/results/transforms_smollm2_w4a4kv4_15ep --new 128 --out $OUT/generate_h200.json \
    2>&1 | grep -v Warning | tail -25 ;;
e2e)
  timeout 60 $PYT --tb=short tests/models/test_real.py -k fast_engine 2>&1 | grep -v DEBUG | tail -30 | tee $OUT/pytest_fast_engine.log \
    | grep -E "^E |passed|failed"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/torchao-*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout ${E2E_S:-500} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static,ours-bf16,hf-bf16-eager,torchao-fp8,torchao-int4} \
    --budget-s ${E2E_BUDGET:-420} --out $OUT/e2e_h200_s4.json 2>&1 | grep -v -i warn | tail -30 ;;
final)
  # the e2e numbers first (anchored on hf-bf16-static), then the GPU tests the probe stage ran out of time for
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/torchao-*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout ${E2E_S:-300} python3 bench/bench_e2e.py --quick --decode 256 \
    --engines ${ENGINES:-real-w4a4kv4,hf-bf16-static,ours-bf16,hf-bf16-eager} --budget-s ${E2E_BUDGET:-240} \
    --out $OUT/e2e_h200_s4.json 2>&1 | grep -v -i warn | tail -30
  timeout 170 $PYT --tb=short tests/models/test_real_families.py 2>&1 | grep -v DEBUG | tail -30 \
    | tee $OUT/pytest_families_cuda.log | grep -E "^E |passed|failed"
  timeout ${TEST_S:-110} $PYT --tb=short tests/models/test_real.py tests/ops/test_launch.py tests/ops/test_gemv.py 2>&1 \
    | grep -v DEBUG | tail -30 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
tma)
  # the prefill GEMM's tiles on the H200, with the k/v shape (N = 1024) whose 256 x 128 tiles fill under half the GPU
  timeout 200 python3 bench/probe_tma.py --out $OUT/probe_tma_h200.json 2>&1 | grep -v Warn | tail -40 ;;
verify)
  # what this session's device time did not reach: the families' GPU test for every config (Qwen3 included; the
  # kernels without torch.compile) and the engine-level tests (fast engine in llama/qwen2/qwen3 styles,
  # generate's graph reuse), each file its own process so that a timeout keeps the other's result
  timeout ${FAM_S:-200} $PYT -s --tb=short tests/models/test_real_families.py 2>&1 | grep -v DEBUG \
    | grep -E "GPU vs|^E |passed|failed|Error" | tee $OUT/pytest_families_cuda.log
  timeout ${ENG_S:-380} $PYT --tb=short tests/models/test_real.py tests/ops/test_launch.py 2>&1 | grep -v DEBUG \
    | tail -30 | tee $OUT/pytest_engine_cuda.log | grep -E "^E |passed|failed" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
