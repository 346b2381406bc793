#!/usr/bin/env bash
# A/B of how RMS(p) gets its sum of p^2 (one GPU, ~5 minutes): the CUDA cases of the kernels' p^2 paths, then per
# size ONE process with the floor and three variants in rotated rounds (bench_gpu.py --paired 5 --together):
#   adalomo_fused           carry_psq on (the default): sums carried from the previous write
#   adalomo_fused_nocarry   carry_psq off: p re-read by the three-pass statistics (a second pass for one-read groups)
#   adalomo_fused_psqstats  psq_in_stats: p read in the one-read statistics pass itself
# Usage (repository root): OUT=dir bash benchmarks/ab_psq.sh
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-out/ab_psq}
mkdir -p "$O"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -Is; git log -1 --format=%h; } \
  | tee "$O/device.txt"
PYTHONPATH=src timeout 120 python3 tests/test_kernels.py cuda \
  psq_in_stats,psq_after_data_edit,one_read,carry_psq,fused_buckets,gpu_fac_big_bf16 > "$O/cuda_cases.json" \
  2> "$O/cuda_cases.err"
echo "cuda cases rc=$? t=$SECONDS"; cat "$O/cuda_cases.json"; echo; tail -n 3 "$O/cuda_cases.err"
ROWS=floor,adalomo_fused,adalomo_fused_nocarry,adalomo_fused_psqstats
run() {  # size time-limit extra...
  local size=$1 lim=$2; shift 2
  PYTHONPATH=src timeout "$lim" python3 benchmarks/bench_gpu.py --config "$size" --paired 5 --together --only $ROWS \
    --out "$O/psq_$size.json" "$@" > "$O/psq_$size.log" 2>&1
  echo "$size rc=$? t=$SECONDS"; tail -n 6 "$O/psq_$size.log"
}
run 0.94b 150
run 6.7b $((590 - SECONDS)) --steps 10 --warmup 2
