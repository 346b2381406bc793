#!/usr/bin/env bash
# The GPU evidence behind the README's tables, in stages that each fit one 10-minute device call.
#   bash benchmarks/gpu_evidence.sh STAGE OUTDIR DATADIR
# DATADIR holds wikitext-2/{train,valid,test}.txt (on the device machine: a carried, git-ignored copy).
# Each step has its own time limit, so that a slow one cannot take the others' results with it; stages c-f
# pack OUTDIR into one tarball after each step (PACK_TO, default OUTDIR.tgz): a device call returns 8 files at most. Stages a-c ran on 2026-11-23 (benchmarks/results/h100_*);
# d-f are the runs still to make. With the lomo-optim wheel carried in .whl (git-ignored), prefix the command:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
set -u
stage=$1; out=$2; data=${3:-}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/device.txt" 2>&1
date -Is >> "$out/device.txt"
pack() {  # one tarball of everything so far, next to OUTDIR (for the device tool's 8-file limit)
  tar czf "${PACK_TO:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")"
}
gpt() {  # gpt-lm comparison: name, seconds, then CLI flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m adalomo.cli experiment gpt-lm --data-dir "$data" --dtype bf16 --device cuda \
    --quiet --log-every 100 --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$?"; tail -n 12 "$out/$name.log"
}
case $stage in
  a)  # kernels on CUDA, the fused-mode variants at 0.94B, gpt-lm at 125M
    timeout 150 python3 tests/test_kernels.py cuda > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
bad={k:v for k,v in d.items() if not k.endswith(':seconds') and v!='ok'}; print(len(d)//2,'cases, bad:',bad)" \
      "$out/tests_cuda.json"
    timeout 230 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b_buckets.json" --only \
      floor,adalomo_fused,adalomo_fused_b0,adalomo_fused_b256,adalomo_fused_side,adalomo_classic,lomo_fused \
      > "$out/bench_0.94b_buckets.log" 2>&1
    echo "bench rc=$?"; tail -n 10 "$out/bench_0.94b_buckets.log"
    gpt gpt_lm_125m 200 --size 125m --optimizers adamw,adalomo,adafactor,lomo,adapm,adapm-factored \
      --max-steps 400 --batch-size 16 --seq-len 512
    ;;
  b)  # AdaPM at 125M (joins stage a's table), profiles of the fused step, gpt-lm at ~1B (same token budget)
    gpt gpt_lm_125m_adapm 130 --size 125m --optimizers adapm,adapm-factored --max-steps 400 --batch-size 16 --seq-len 512
    for row in floor adalomo_fused adalomo_classic; do
      timeout 45 python3 benchmarks/profile_step.py --row $row --out "$out/profile_$row.json" > "$out/profile_$row.log" 2>&1
      echo "profile $row rc=$?"; grep SUMMARY "$out/profile_$row.log"
    done
    gpt gpt_lm_1b 300 --size 1b --optimizers adamw,adalomo,adafactor,lomo --max-steps 300 --batch-size 16 --seq-len 512
    ;;
  c)  # what stage b lost (at most 8 files come back from a device call: everything is packed in one tarball)
    gpt gpt_lm_1b 245 --size 1b --optimizers adamw,adalomo,adafactor,lomo --max-steps 300 --batch-size 16 --seq-len 512
    pack
    gpt gpt_lm_125m_adapm 155 --size 125m --optimizers adapm,adapm-factored --max-steps 400 --batch-size 16 --seq-len 512
    pack
    gpt gpt_lm_125m_long 170 --size 125m --optimizers adamw,adapm --max-steps 800 --batch-size 16 --seq-len 512 \
      --eval-every 200
    pack
    ;;
  d)  # the 6.7B table and the 80 GB fit ladder (lomo_optim rows need the carried .whl: see bench_gpu.py)
    timeout 330 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b.json" --only \
      floor,adalomo_fused,adalomo_classic,adafactor_fused,lomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
      > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 12 "$out/bench_6.7b.log"
    pack
    timeout 240 python3 benchmarks/bench_gpu.py --fit --fit-sizes 10b,20b,30b,34b --out "$out/fit.json" \
      > "$out/fit.log" 2>&1
    echo "fit rc=$?"; tail -n 5 "$out/fit.log"
    pack
    ;;
  e)  # runs still missing after stage c: 1B lomo, the long AdaPM leg, lr sweeps of the baselines at 125M
    gpt gpt_lm_1b_lomo 110 --size 1b --optimizers lomo --max-steps 300 --batch-size 16 --seq-len 512
    pack
    gpt gpt_lm_125m_long_adapm 170 --size 125m --optimizers adapm --max-steps 800 --batch-size 16 --seq-len 512 \
      --eval-every 200
    pack
    gpt gpt_lm_125m_sweep 200 --size 125m --optimizers adamw@3e-4,adamw@1.2e-3,adamw@2.4e-3,lomo@0.2,lomo@0.5 \
      --max-steps 400 --batch-size 16 --seq-len 512
    pack
    ;;
  f)  # the 0.94B table again with the cached launch plans (fused rows), and the peers in the same run
    timeout 300 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
      floor,adalomo_fused,adalomo_fused_b256,adalomo_classic,lomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
      > "$out/bench_0.94b.log" 2>&1
    echo "bench rc=$?"; tail -n 12 "$out/bench_0.94b.log"
    pack
    ;;
  *) echo "unknown stage $stage (a-f)"; exit 2 ;;
esac
