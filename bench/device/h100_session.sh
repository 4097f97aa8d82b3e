#!/usr/bin/env bash
# Stages of one H100 session through the device tool (see bench/README.md). Each stage writes under $OUT.
#   setup:    first half of the GGUF (.model1/part) and the wheels (.whl) -> /root/fq, /tmp/site
#   probe:    calibration step variants on one LLaMA-3-8B layer (2 epochs); GEMM tile/operand probe
#   calib15:  paper-settings calibration speed/memory of LLaMA-3-8B layers (default = compiled step)
#   accuracy: second GGUF half (.model2), resume the accuracy runs carried in .accprog/acc.tgz
#   bench-ops: kernel benchmark (all shapes);  bench-e2e: end-to-end benchmark and real-path generation on the GPU
#   cuda-tests: the whole `pytest -m cuda` suite;  kron-final: kron_quant grid probe, CUDA tests, e2e again
#   (each its own call: a call returns at most 8 files and runs at most 10 minutes)
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
FQ=/root/fq
stage=$1
case $stage in
setup)
  mkdir -p $FQ && cp .model1/part $FQ/part1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl ;;
probe)
  # calibration step variants on one LLaMA-3-8B layer (2 epochs: ms/step and peak memory), then the GEMM probe
  for v in "" "--compile on" "--cuda-graph on" "--recompute off" "--compile on --cuda-graph on"; do
    timeout 110 python3 bench/bench_calib.py --shape llama3-8b --epochs 2 $v --out $OUT --tag "_$(echo $v | tr -d ' -')" \
      2>&1 | tail -1
  done
  timeout 240 python3 bench/probe_gemm.py --out $OUT/probe_gemm_h100.json 2>&1 | tee $OUT/probe_gemm_h100.log ;;
calib15)
  # paper settings (15 epochs): two LLaMA-3-8B layers in a row with the default (compiled) step; the first pays
  # compilation, the second is the per-layer figure
  timeout 400 python3 bench/bench_calib.py --shape llama3-8b --epochs 15 --layers 2 --out $OUT 2>&1 | tail -4 ;;
accuracy)
  cat $FQ/part1 .model2/part > $FQ/smollm2.gguf
  echo "$(cat .model2/sha)  $FQ/smollm2.gguf" | sha256sum -c - || exit 3
  mkdir -p $FQ/acc $FQ/res $FQ/logs && tar xzf .accprog/acc.tgz -C $FQ/acc
  A="--device cuda --work $FQ/acc --results $FQ/res --epochs 15"
  M="--model $FQ/smollm2.gguf --eval-windows 20"
  # setsid: the runs outlive this call (the machine stays warm for the next one); collect waits for them
  setsid python3 bench/accuracy.py --name smollm2_w4a4kv4_15ep --presets w4a4kv4 $A -- $M \
    > $FQ/logs/p1.log 2>&1 < /dev/null &
  setsid python3 bench/accuracy.py --name smollm2_w4a16_15ep --presets w4a16 $A -- $M > $FQ/logs/p2.log 2>&1 < /dev/null &
  setsid python3 bench/accuracy.py --name smollm2_w4a4kv4_15ep_fp16 --methods flatquant --weight-quants rtn \
    --presets w4a4kv4 $A -- $M --amp float16 > $FQ/logs/p3.log 2>&1 < /dev/null &
  sleep 5; bash $0 collect ${2:-520} ;;
collect)
  end=$((SECONDS + ${2:-520}))
  while pgrep -f bench/accuracy.py > /dev/null && [ $SECONDS -lt $end ]; do sleep 10; done
  grep -h "captured\|capture of\|PPL\|Error\|layer .*mse" $FQ/logs/p*.log | cut -c1-160 | tail -40
  cp $FQ/res/* $OUT/ 2>/dev/null
  tar czf $OUT/transforms_15ep.tgz -C $FQ/acc smollm2_w4a4kv4_15ep/flatquant-w4a4kv4/transforms.json \
    smollm2_w4a4kv4_15ep/flatquant-w4a4kv4/transforms.safetensors 2>/dev/null
  tar czf $OUT/logs.tgz -C $FQ logs ;;
bench-ops)
  while pgrep -f bench/accuracy.py > /dev/null; do sleep 5; done  # quiet GPU for timings
  python3 bench/bench_ops.py --out $OUT/ops_h100_all.json 2>&1 | tee $OUT/ops_h100_all.log | tail -60 ;;
kron-final)
  # kron_quant grid probe, the CUDA tests of the files it touches plus those the cuda-tests stage did not reach
  # in its 530 s, then the end-to-end speed again
  timeout 90 python3 bench/probe_kron.py --out $OUT/probe_kron_h100.json 2>&1 | tee $OUT/probe_kron_h100.log
  timeout 250 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ops/test_kron_quant.py tests/ops/test_matmul.py \
    tests/ops/test_pack.py tests/models/test_real.py tests/ops/test_kv_quant.py tests/ops/test_kv_attention.py 2>&1 \
    | tee $OUT/pytest_cuda_h100_part2.log | tail -5
  timeout 230 python3 bench/bench_e2e.py --out $OUT/e2e_h100.json --engines real-w4a4kv4,ours-bf16,hf-bf16-sdpa 2>&1 \
    | tee $OUT/e2e_h100.log | tail -12 ;;
cuda-tests)
  timeout 530 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee $OUT/pytest_cuda_h100.log | tail -15 ;;
bench-e2e)
  # speed on random LLaMA-3-8B-shaped weights; real-vs-fake PPL and generation need the model (.model1 + .model2
  # in back-to-back calls, see accuracy) and run only when it was joined on this machine
  while pgrep -f bench/accuracy.py > /dev/null; do sleep 5; done
  if [ -f $FQ/smollm2.gguf ]; then
    PPL="--ppl-transforms bench/results/transforms_smollm2_w4a4kv4_15ep --ppl-model $FQ/smollm2.gguf"
  else
    PPL=""
  fi
  python3 bench/bench_e2e.py --out $OUT/e2e_h100.json --engines real-w4a4kv4,ours-bf16,hf-bf16-sdpa $PPL 2>&1 \
    | tee $OUT/e2e_h100.log | tail -40
  [ -f $FQ/smollm2.gguf ] && python3 -m flatquant.cli export --transforms bench/results/transforms_smollm2_w4a4kv4_15ep \
    --model $FQ/smollm2.gguf --out $FQ/ckpt > /dev/null 2>&1 && python3 -m flatquant.cli generate --checkpoint $FQ/ckpt \
    --chat --device cuda --prompt "What is the capital of France?" --max-new-tokens 40 2>&1 \
    | tee $OUT/generate_h100.txt | tail -5 ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
