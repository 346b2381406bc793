#!/usr/bin/env bash
# One device call: CUDA kernel cases of this tree; the kernel settings graphs/carry_psq A/B on the code before this
# session's redesign (.device/old = git archive 6f9c519); this tree next to its floor; 0.94B and 6.7B, every row of
# a size and code version in one process (bench_gpu.py --paired 3 --together).
set -u
export PYTHONUNBUFFERED=1
O=$OUT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -Is; nproc; uptime; } | tee $O/device.txt
PYTHONPATH=src timeout 110 python3 tests/test_kernels.py cuda \
  fac2d_bf16_scale_wd,nonfinite_nan_2d,optimizers_end_to_end,fused_buckets,many_scaled,many_lomo,one_read,carry_psq,gpu_fast_launch_used,gpu_graph_replay,gpu_fac_big_bf16 \
  > $O/cuda_cases.json 2> $O/cuda_cases.err
echo "cuda cases rc=$? t=$SECONDS"; cat $O/cuda_cases.json; tail -n 3 $O/cuda_cases.err
AB=floor,adalomo_fused,adalomo_fused_nograph,adalomo_fused_nocarry,adalomo_classic
NEW=floor,adalomo_fused,adalomo_classic,lomo_fused
run() {  # label dir size limit rows extra...
  local label=$1 dir=$2 size=$3 lim=$4 rows=$5; shift 5
  (cd $dir && PYTHONPATH=src timeout $lim python3 benchmarks/bench_gpu.py --config $size --paired 3 --together \
     --only $rows --out $O/${label}_$size.json "$@" > $O/${label}_$size.log 2>&1)
  echo "$label $size rc=$? t=$SECONDS"; tail -n 7 $O/${label}_$size.log
}
run old .device/old 0.94b 90 $AB
run new . 0.94b 75 $NEW
run old .device/old 6.7b 140 $AB --steps 10 --warmup 2
run new . 6.7b $((585 - SECONDS)) $NEW --steps 10 --warmup 2
