#!/usr/bin/env bash
# Issue 11's GPU figures in one call on a 2-GPU H200 host (device kind nvidia-h200-x2); everything lands under $OUT.
#   1. layer-parallel calibration, 4 LLaMA-3-8B-shaped random layers at paper settings (128 x 2048, batch 4,
#      15 epochs), eager step (--compile off: no per-rank compilation in the timing), 2 ranks over NCCL;
#   2. the same on 1 rank (GPU 0), while GPU 1 times one LLaMA-3-70B-shaped layer (bench_calib_70b.py);
#   3. the bit-identity check between 1 and 2 ranks.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
EP=${EPOCHS:-15}
nvidia-smi -L
python3 -m torch.distributed.run --nproc-per-node 2 bench/bench_layer_parallel.py --layers 4 --epochs "$EP" \
  --compile off --tag _w2 --out "$OUT" 2>&1 | grep -v "INFO" | tail -5
CUDA_VISIBLE_DEVICES=1 timeout 330 python3 bench/bench_calib_70b.py --layers 1 --epochs 3 --tag _h200 --out "$OUT" \
  >"$OUT/calib_70b.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --nproc-per-node 1 bench/bench_layer_parallel.py --layers 4 \
  --epochs "$EP" --compile off --tag _w1 --out "$OUT" 2>&1 | grep -v "INFO" | tail -5
wait
tail -15 "$OUT/calib_70b.log"
python3 bench/bench_layer_parallel.py --compare "$OUT/layer_parallel_llama3-8b_${EP}ep_w1" \
  "$OUT/layer_parallel_llama3-8b_${EP}ep_w2"
