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
{ echo "cpus: $(nproc)"; uptime; } >> "$out/device.txt" 2>&1  # a busy host slows the rows whose hooks run in backward
pack() {  # one tarball of everything so far, next to OUTDIR (for the device tool's 8-file limit)
  tar czf "${PACK_TO:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")"
}
sweep_table() {  # bench_kernels.py --sweep's lines: per configuration, AdaLomo's total us per bucket
  grep -E "^sweep" "$1" | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[6:]); print(json.dumps(r['config']), {b: t['total_us'] for b, t in r['buckets'].items() if 'adalomo' in b})"
}
gpt() {  # gpt-lm comparison: name, seconds, then CLI flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m adalomo.cli experiment gpt-lm --data-dir "$data" --dtype bf16 --device cuda \
    --quiet --log-every 100 --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$?"; tail -n 12 "$out/$name.log"
}
f1b() {  # FSDP2 at 1B, batch 4x2048 per GPU: name, seconds, then bench_fsdp flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/bench_fsdp.py --sizes 1b --timeout 45 --out "$out/fsdp_1b_$name.json" "$@" \
    > "$out/fsdp_1b_$name.log" 2>&1
  echo "fsdp 1b $name rc=$?"; grep "^| 1b" "$out/fsdp_1b_$name.log"
}
exactness() {  # FSDP2/HSDP vs one process on NCCL, 2 GPUs: seconds
  timeout "$1" python3 -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/fsdp_exactness.py \
    --steps 10 --out "$out/fsdp_exactness.json" > "$out/fsdp_exactness.log" 2>&1
  echo "exactness rc=$?"; grep -v Warning "$out/fsdp_exactness.log" | tail -n 10
}
prof67() {  # torch.profiler over 2 steps of each given bench_gpu row at 6.7B
  local row
  for row in "$@"; do
    timeout 70 python3 benchmarks/profile_step.py --config 6.7b --row "$row" --steps 2 --out "$out/profile_6.7b_$row.json" \
      > "$out/profile_6.7b_$row.log" 2>&1
    echo "profile $row rc=$?"; grep SUMMARY "$out/profile_6.7b_$row.log"
  done
}
kernel_tests() {  # every case of tests/test_kernels.py on CUDA: seconds (writes tests_cuda.json/.err)
  timeout "$1" python3 tests/test_kernels.py cuda > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
  echo "kernel tests rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
bad={k:v for k,v in d.items() if not k.endswith(':seconds') and v!='ok'}; print(len(d)//2,'cases, bad:',bad)" \
    "$out/tests_cuda.json"
}
buckets() {  # the grouped kernels on gradient buckets under each kernel setting: name, seconds, JSON list of settings
  timeout "$2" python3 benchmarks/bench_kernels.py --skip-correctness --sweep --shapes "" --sweep-configs "$3" \
    --out "$out/$1.json" > "$out/$1.log" 2>&1
  echo "$1 rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
[print(r['config'], {b: t['total_us'] for b, t in r['buckets'].items()}) for r in d['sweep']]" "$out/$1.json"
}
fsdp1b() {  # the 1B FSDP2 table on 1 and 2 GPUs, AdaLomo and AdamW
  timeout 200 python3 benchmarks/bench_fsdp.py --sizes 1b --gpus 1,2 --optimizers adalomo,adamw --timeout 90 \
    --out "$out/fsdp_1b.json" > "$out/fsdp_1b.log" 2>&1
  echo "fsdp 1b rc=$?"; tail -n 7 "$out/fsdp_1b.log"
}
case $stage in
  a)  # kernels on CUDA, the fused-mode variants at 0.94B, gpt-lm at 125M
    kernel_tests 150
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
  g)  # 2 GPUs (nvidia-h200-x2): FSDP2 exactness on NCCL, then throughput/memory per GPU at 1B and 7B on 1 and 2 GPUs
    [ -f benchmarks/debug_lomo_clip.py ] && timeout 90 python3 benchmarks/debug_lomo_clip.py > "$out/debug_lomo.log" 2>&1
    tail -n 30 "$out/debug_lomo.log" | grep -v "^  warn\|Warning"
    exactness 150
    pack
    fsdp1b
    pack
    timeout 240 python3 benchmarks/bench_fsdp.py --sizes 7b --gpus 1,2 --optimizers adalomo,adamw --steps 8 \
      --warmup 2 --timeout 110 --out "$out/fsdp_7b.json" > "$out/fsdp_7b.log" 2>&1
    echo "fsdp 7b rc=$?"; tail -n 7 "$out/fsdp_7b.log"
    pack
    ;;
  h)  # 2 GPUs: the largest model that trains under FSDP2 on 2 GPUs (batch 1x2048 per GPU, checkpointing)
    timeout 330 python3 benchmarks/bench_fsdp.py --find-max --gpus 2 --optimizers adalomo,adamw \
      --sizes 13b,30b,70b,100b --batch-size 1 --steps 3 --warmup 1 --timeout 120 \
      --out "$out/fsdp_max.json" > "$out/fsdp_max.log" 2>&1
    echo "fsdp max rc=$?"; tail -n 9 "$out/fsdp_max.log"
    pack
    ;;
  i)  # 2 GPUs: GPU0 the gpt-lm runs still missing (1B Lomo memory, the 800-step AdaPM leg with its AdamW twin);
      # GPU1 LOMO kernel diagnostics; then both GPUs: a profile of the FSDP2 step on 2 GPUs
    ( export CUDA_VISIBLE_DEVICES=0
      gpt gpt_lm_1b_lomo 130 --size 1b --optimizers lomo --max-steps 300 --batch-size 16 --seq-len 512; pack
      gpt gpt_lm_125m_long 260 --size 125m --optimizers adamw,adapm --max-steps 800 --batch-size 16 --seq-len 512 \
        --eval-every 200; pack ) & p0=$!
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 60 python3 benchmarks/debug_lomo_clip.py > "$out/debug_lomo.log" 2>&1
      ADALOMO_FAST_LAUNCH=0 timeout 60 python3 benchmarks/debug_lomo_clip.py > "$out/debug_lomo_slow.log" 2>&1 ) & p1=$!
    wait $p1; head -n 40 "$out/debug_lomo.log"; grep -c "ok kernel False" "$out/debug_lomo_slow.log"
    wait $p0
    timeout 120 python3 benchmarks/bench_fsdp.py --sizes 1b --gpus 2 --optimizers adalomo --steps 5 --warmup 3 \
      --profile-out "$out/prof" --out "$out/fsdp_prof.json" > "$out/fsdp_prof.log" 2>&1
    echo "fsdp profile rc=$?"; tail -n 3 "$out/fsdp_prof.log"; head -c 5000 "$out"/prof.*.txt
    pack
    ;;
  j)  # 2 GPUs side by side: GPU0 the kernel tests on CUDA (the FMA fix) and the 0.94B table (issue 3); GPU1 the
      # gpt-lm runs whose files were lost on 2026-11-23 (1B Lomo memory; 125M, 800 steps, AdamW and AdaPM)
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 150 python3 tests/test_kernels.py cuda > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
      echo "kernel tests rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
bad={k:v for k,v in d.items() if not k.endswith(':seconds') and v!='ok'}; print(len(d)//2,'cases, bad:',bad)" \
        "$out/tests_cuda.json"
      timeout 300 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
        floor,adalomo_fused,adalomo_fused_b256,adalomo_classic,lomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
        > "$out/bench_0.94b.log" 2>&1
      echo "bench rc=$?"; tail -n 11 "$out/bench_0.94b.log" ) > "$out/gpu0.txt" 2>&1 & p0=$!
    ( export CUDA_VISIBLE_DEVICES=1
      gpt gpt_lm_1b_lomo 130 --size 1b --optimizers lomo --max-steps 300 --batch-size 16 --seq-len 512
      gpt gpt_lm_125m_long 270 --size 125m --optimizers adamw,adapm --max-steps 800 --batch-size 16 --seq-len 512 \
        --eval-every 200 ) > "$out/gpu1.txt" 2>&1 & p1=$!
    wait $p0 $p1; cat "$out/gpu0.txt" "$out/gpu1.txt"
    pack
    ;;
  k)  # 2 GPUs: FSDP2 with the grouped sharded kernels: exactness on NCCL, 1B on 1 and 2 GPUs, the largest AdaLomo model
    exactness 120
    pack
    fsdp1b
    pack
    timeout 270 python3 benchmarks/bench_fsdp.py --find-max --gpus 2 --optimizers adalomo --sizes 30b,70b,100b \
      --batch-size 1 --steps 3 --warmup 1 --timeout 125 --out "$out/fsdp_max_adalomo.json" > "$out/fsdp_max_adalomo.log" 2>&1
    echo "fsdp max adalomo rc=$?"; tail -n 6 "$out/fsdp_max_adalomo.log"
    pack
    ;;
  l)  # 2 GPUs: GPU0 the 6.7B table; GPU1 the 80 GB fit ladder; then both: FSDP2 1B AdaLomo again (1-GPU runs now
      # take the grouped kernels), the largest AdamW model under FSDP2
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 330 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b.json" --only \
        floor,adalomo_fused,adalomo_classic,lomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
        > "$out/bench_6.7b.log" 2>&1
      echo "bench 6.7b rc=$?"; tail -n 10 "$out/bench_6.7b.log" ) > "$out/gpu0.txt" 2>&1 & p0=$!
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 300 python3 benchmarks/bench_gpu.py --fit --cap-gb 80 --fit-sizes 6.7b,13b,25b,30b,34b \
        --out "$out/fit.json" > "$out/fit.log" 2>&1
      echo "fit rc=$?"; tail -n 4 "$out/fit.log" ) > "$out/gpu1.txt" 2>&1 & p1=$!
    wait $p0 $p1; cat "$out/gpu0.txt" "$out/gpu1.txt"
    pack
    timeout 90 python3 benchmarks/bench_fsdp.py --sizes 1b --gpus 1,2 --optimizers adalomo --timeout 60 \
      --out "$out/fsdp_1b_adalomo.json" > "$out/fsdp_1b_adalomo.log" 2>&1
    echo "fsdp 1b adalomo rc=$?"; tail -n 4 "$out/fsdp_1b_adalomo.log"
    pack
    timeout 170 python3 benchmarks/bench_fsdp.py --find-max --gpus 2 --optimizers adamw --sizes 13b,30b \
      --batch-size 1 --steps 3 --warmup 1 --timeout 110 --out "$out/fsdp_max_adamw.json" > "$out/fsdp_max_adamw.log" 2>&1
    echo "fsdp max adamw rc=$?"; tail -n 5 "$out/fsdp_max_adamw.log"
    pack
    ;;
  m)  # 2 GPUs: the rows the 0.94B/6.7B tables still lack (Adafactor, Lomo classic, lomo-optim Lomo, the side stream
      # at 6.7B; each with its own floor), kernel bandwidth on the H200; then FSDP2 at 1B: the statistics on their own
      # communicator (default) vs FSDP2's, bigger buckets, the side stream; AdamW in the same run
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 180 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b_rest.json" --only \
        floor,adafactor_fused,adafactor_classic,lomo_classic,lomo_optim_lomo > "$out/bench_0.94b_rest.log" 2>&1
      echo "bench 0.94b rest rc=$?"; tail -n 8 "$out/bench_0.94b_rest.log"
      timeout 90 python3 benchmarks/bench_kernels.py --skip-correctness --out "$out/kernels_h200.json" \
        > "$out/kernels_h200.log" 2>&1
      echo "kernels rc=$?"; tail -n 25 "$out/kernels_h200.log" ) > "$out/gpu0.txt" 2>&1 & p0=$!
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 270 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_rest.json" --only \
        floor,adalomo_fused_side,adalomo_fused_b256,adafactor_fused,lomo_optim_lomo > "$out/bench_6.7b_rest.log" 2>&1
      echo "bench 6.7b rest rc=$?"; tail -n 8 "$out/bench_6.7b_rest.log" ) > "$out/gpu1.txt" 2>&1 & p1=$!
    wait $p0 $p1; cat "$out/gpu0.txt" "$out/gpu1.txt"
    pack
    f1b ab 130 --gpus 1,2 --optimizers adalomo,adamw
    ( export ADALOMO_SHARED_STATS_GROUP=1; f1b shared 45 --gpus 2 --optimizers adalomo )  # (then the default was
    # a separate communicator, ADALOMO_SHARED_STATS_GROUP=1 turned it off; now ADALOMO_SEPARATE_STATS_GROUP=1 turns it on)
    f1b b512 45 --gpus 2 --optimizers adalomo --adalomo-kwargs '{"bucket_cap_mb": 512}'
    f1b side 45 --gpus 2 --optimizers adalomo --adalomo-kwargs '{"side_stream": true}'
    pack
    ;;
  n)  # 2 GPUs side by side: every row of ours at 0.94B (GPU0) and 6.7B (GPU1) in one run each, the side stream at
      # both sizes; then a profile of the FSDP2 step at 1B on 2 GPUs (the sharded kernels)
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 230 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b_ours.json" --only \
        floor,adalomo_fused,adalomo_fused_side,adalomo_classic,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic \
        > "$out/bench_0.94b_ours.log" 2>&1
      echo "bench 0.94b rc=$?"; tail -n 11 "$out/bench_0.94b_ours.log" ) > "$out/gpu0.txt" 2>&1 & p0=$!
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 250 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_ours.json" --only \
        floor,adalomo_fused,adalomo_fused_side,adafactor_fused,adafactor_classic > "$out/bench_6.7b_ours.log" 2>&1
      echo "bench 6.7b rc=$?"; tail -n 8 "$out/bench_6.7b_ours.log" ) > "$out/gpu1.txt" 2>&1 & p1=$!
    wait $p0 $p1; cat "$out/gpu0.txt" "$out/gpu1.txt"
    pack
    timeout 90 python3 benchmarks/bench_fsdp.py --sizes 1b --gpus 2 --optimizers adalomo --steps 5 --warmup 3 \
      --timeout 80 --profile-out "$out/prof" --out "$out/fsdp_prof.json" > "$out/fsdp_prof.log" 2>&1
    echo "fsdp profile rc=$?"; grep "^| 1b" "$out/fsdp_prof.log"; head -c 4000 "$out"/prof.*.txt
    pack
    ;;
  o)  # 1 GPU (nvidia-h200), nothing else on the host: the 0.94B fused rows again, AdaLomo first and last
    timeout 200 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b_alone.json" --only \
      floor,adalomo_fused,adafactor_fused,adalomo_classic,lomo_fused,adalomo_fused,floor \
      > "$out/bench_0.94b_alone.log" 2>&1
    echo "bench 0.94b alone rc=$?"; tail -n 9 "$out/bench_0.94b_alone.log"
    pack
    ;;
  p)  # 2 GPUs, NEXT SESSION (written 2026-11-29, not run yet): the FSDP2 path after the host-sync fix and with Lomo's
      # sharded kernels: exactness on NCCL, 1B on 1/2 GPUs (host_syncs_in_one_step in the JSON should be 0), a profile
    exactness 120
    pack
    f1b ab 130 --gpus 1,2 --optimizers adalomo,adamw
    python3 -c "import json,sys; [print(r['optimizer'], r['gpus'], r.get('host_syncs_in_one_step'), r.get('host_sync_examples')) \
for r in json.load(open(sys.argv[1]))['results']]" "$out/fsdp_1b_ab.json"
    pack
    timeout 90 python3 benchmarks/bench_fsdp.py --sizes 1b --gpus 2 --optimizers adalomo --steps 5 --warmup 3 \
      --timeout 80 --profile-out "$out/prof" --out "$out/fsdp_prof.json" > "$out/fsdp_prof.log" 2>&1
    echo "fsdp profile rc=$?"; grep -E "cudaStreamSynchronize|AllReduce" "$out"/prof.*.txt | cut -c1-160
    pack
    # is the write kernel (~40% of copy bandwidth) paying for stochastic rounding's Philox draw per element? the
    # default draw, round-to-nearest (--sr-ablation), and the experimental draw of one Philox per 4 elements
    for rng4 in 0 1; do
      CUDA_VISIBLE_DEVICES=0 ADALOMO_SR_RNG4=$rng4 timeout 75 python3 benchmarks/bench_kernels.py --skip-correctness \
        --sr-ablation --shapes "mlp 11008x4096" --out "$out/kernels_sr_rng4_$rng4.json" > "$out/kernels_sr_rng4_$rng4.log" 2>&1
      echo "kernels sr ablation rng4=$rng4 rc=$?"; grep -o '_fac_write_kernel": {"us": [0-9.]*\|_lomo_write_kernel": {"us": [0-9.]*\|"kernels_no_sr_us": {[^}]*}' "$out/kernels_sr_rng4_$rng4.log"
    done
    pack
    ;;
  q)  # 1 GPU (2026-11-29, after stage p showed the write kernels 2.5x slower with per-element Philox): the keyed
      # hash for the rounding bits (CUDA kernel tests, kernel times), a sweep of launch geometries on gradient
      # buckets, and the 6.7B fused step with the hash
    export ADALOMO_SR_RNG=hash
    timeout 150 python3 tests/test_kernels.py cuda > "$out/tests_cuda_hash.json" 2> "$out/tests_cuda_hash.err"
    echo "kernel tests (hash) rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
bad={k:v for k,v in d.items() if not k.endswith(':seconds') and v!='ok'}; print(len(d)//2,'cases, bad:',bad)" \
      "$out/tests_cuda_hash.json"
    timeout 75 python3 benchmarks/bench_kernels.py --skip-correctness --sr-ablation --shapes "mlp 11008x4096" \
      --out "$out/kernels_sr_hash.json" > "$out/kernels_sr_hash.log" 2>&1
    echo "kernels sr hash rc=$?"; grep -o '_fac_write_kernel": {"us": [0-9.]*\|_lomo_write_kernel": {"us": [0-9.]*' \
      "$out/kernels_sr_hash.log"
    pack
    timeout 200 python3 benchmarks/bench_kernels.py --skip-correctness --sweep --shapes "" \
      --out "$out/kernels_sweep.json" > "$out/kernels_sweep.log" 2>&1
    echo "sweep rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
[print(b, v) for b, v in d['sweep_best'].items()]; \
[print(r['config'], {b: t['total_us'] for b, t in r['buckets'].items()}) for r in d['sweep']]" "$out/kernels_sweep.json"
    pack
    timeout 200 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_hash.json" \
      --only floor,adalomo_fused,lomo_fused > "$out/bench_6.7b_hash.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 5 "$out/bench_6.7b_hash.log"
    pack
    ;;
  r)  # 1 GPU (2026-11-29, after stage q): CUDA kernel tests with the defaults (hash rounding bits, prefetching
      # reductions), the prefetch A/B on gradient buckets (the faster setting is kept for the rest), then the final
      # tables at 6.7B and 0.94B and the per-kernel bandwidth
    kernel_tests 160
    for pf in 0 1; do
      ADALOMO_PREFETCH=$pf timeout 60 python3 benchmarks/bench_kernels.py --skip-correctness --sweep --sweep-configs '[{}]' \
        --shapes "" --out "$out/kernels_prefetch_$pf.json" > "$out/kernels_prefetch_$pf.log" 2>&1
      echo "prefetch=$pf rc=$?"
    done
    pf=$(python3 -c "import json,sys; t=[sum(b['total_us'] for b in json.load(open(f))['sweep'][0]['buckets'].values()) \
for f in sys.argv[1:]]; print(t, file=sys.stderr); print(int(t[1] <= t[0]))" "$out/kernels_prefetch_0.json" \
      "$out/kernels_prefetch_1.json")
    export ADALOMO_PREFETCH=$pf; echo "ADALOMO_PREFETCH=$pf for the rest" | tee "$out/prefetch_choice.txt"
    pack
    rows=floor,adalomo_fused,adalomo_fused_side,adalomo_classic,adafactor_fused,lomo_fused,torch_adamw_fused,floor
    timeout 200 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b.json" --only $rows \
      > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 10 "$out/bench_6.7b.log"
    pack
    timeout 120 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only $rows \
      > "$out/bench_0.94b.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 10 "$out/bench_0.94b.log"
    pack
    timeout 100 python3 benchmarks/bench_kernels.py --skip-correctness --out "$out/kernels_h200.json" \
      > "$out/kernels_h200.log" 2>&1
    echo "kernels rc=$?"; tail -n 14 "$out/kernels_h200.log"
    pack
    ;;
  s)  # 1 GPU, diagnostic (2026-11-29): at 6.7B fused AdaLomo costs ~12 ms more than classic (stage r); where does
      # it go (GPU busy vs wall, optimizer kernel time in each mode), and do larger buckets help
    prof67 adalomo_fused adalomo_classic
    pack
    timeout 150 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_buckets.json" \
      --only floor,adalomo_fused,adalomo_fused_b128,adalomo_fused_b256,adalomo_classic > "$out/bench_6.7b_buckets.log" 2>&1
    echo "bench 6.7b buckets rc=$?"; tail -n 7 "$out/bench_6.7b_buckets.log"
    pack
    ;;
  t)  # 1 GPU (2026-11-29, final): the 0.94B table with the peers in one run (hash rounding bits, prefetching
      # reductions), then 6.7B with 256 MiB buckets against the default, the floor first and last each time
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    timeout 260 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
      floor,adalomo_fused,adalomo_classic,adafactor_fused,lomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo,adalomo_fused,floor \
      > "$out/bench_0.94b.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 12 "$out/bench_0.94b.log"
    pack
    timeout 120 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_b256.json" \
      --only floor,adalomo_fused,adalomo_fused_b256,floor > "$out/bench_6.7b_b256.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b_b256.log"
    pack
    ;;
  u)  # 1 GPU (2026-11-29, third session): the two ways to move fewer bytes, A/B on the grouped buckets, then the
      # 6.7B step with them (--rounds 2), then the CUDA kernel tests (carry_psq, reverse_usq included):
      # carry_psq (sum(p^2) from the previous write: 12 -> 10 bytes per parameter) and reverse_usq (the RMS(u) pass
      # in the reverse order of the statistics pass, so that it finds the last-read tiles of g in L2)
    buckets kernels_carry_rev 140 \
      '[{}, {"reverse_usq": true}, {"carry_psq": true}, {"carry_psq": true, "reverse_usq": true}]'
    pack
    timeout 270 python3 benchmarks/bench_gpu.py --config 6.7b --rounds 2 --out "$out/bench_6.7b.json" --only \
      floor,adalomo_fused,adalomo_fused_rev,adalomo_fused_b256_rev,adalomo_fused_b256_carry_rev,floor \
      > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 7 "$out/bench_6.7b.log"
    pack
    kernel_tests 130
    pack
    ;;
  x)  # 1 GPU (2026-11-29, third session, after stage u): the write passes now prefetch their next tile (stage u: the
      # AdaLomo write at 3.7 TB/s, +34% with carry_psq's extra sums), the p^2 sums are per row; the buckets A/B again,
      # the CUDA kernel tests, then 6.7B with 64/256 MiB buckets and carry_psq (--rounds 2)
    buckets kernels_buckets 110 '[{}, {"carry_psq": true}, {"carry_psq": true, "reverse_usq": true}]'
    pack
    kernel_tests 170
    pack
    timeout 240 python3 benchmarks/bench_gpu.py --config 6.7b --rounds 2 --out "$out/bench_6.7b.json" --only \
      floor,adalomo_fused,adalomo_fused_b256,adalomo_fused_b256_carry,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b.log"
    pack
    ;;
  y)  # 1 GPU (2026-11-29, third session, final): bucket_cap_mb="auto" (256 MiB at 6.7B, 64 at 0.94B) is the default
      # now; the tables at 6.7B (--rounds 2, with carry_psq and fused AdamW) and 0.94B, then the CUDA kernel tests
    timeout 230 python3 benchmarks/bench_gpu.py --config 6.7b --rounds 2 --out "$out/bench_6.7b.json" --only \
      floor,adalomo_fused,adalomo_fused_carry,torch_adamw_fused,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b.log"
    pack
    timeout 120 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
      floor,adalomo_fused,adalomo_classic,adafactor_fused,lomo_fused,torch_adamw_fused,floor \
      > "$out/bench_0.94b.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 9 "$out/bench_0.94b.log"
    pack
    kernel_tests 170
    pack
    ;;
  z)  # 1 GPU (2026-11-29, third session, last of the device budget): the other 6.7B rows with the "auto" buckets
      # (256 MiB at this size): classic AdaLomo, fused Adafactor and Lomo, and the side stream
    timeout 250 python3 benchmarks/bench_gpu.py --config 6.7b --out "$out/bench_6.7b_rest.json" --only \
      floor,adalomo_classic,adafactor_fused,lomo_fused,adalomo_fused_side,floor > "$out/bench_6.7b_rest.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 8 "$out/bench_6.7b_rest.log"
    pack
    ;;
  aa) # 1 GPU (written 2026-11-29, never run: stages ab-ad replaced it): the code after stage z (the statistics pass back to
      # stage u's kernel unless carry_psq is on; carry_psq's write checks the carried sums, 128-register cap): the
      # CUDA kernel tests, the buckets with and without carry_psq and register caps (more programs per SM for the
      # RMS(u) and write passes), then the 6.7B question with more steps per row
      # (20 instead of 8) and three rounds, the fastest-step ratios beside
    kernel_tests 170
    pack
    buckets kernels_buckets 120 '[{}, {"maxnreg_write": 80}, {"maxnreg_usq": 96, "maxnreg_write": 80},
      {"carry_psq": true}, {"carry_psq": true, "maxnreg_usq": 96, "maxnreg_write": 80}]'
    pack
    timeout 320 python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --rounds 3 --out "$out/bench_6.7b.json" \
      --only floor,adalomo_fused,adalomo_fused_carry,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 5 "$out/bench_6.7b.log"
    pack
    ;;
  ab) # 1 GPU (2026-11-29, fourth session): software-pipelined row loops (kernel settings stages_read /
      # stages_write: Triton's cp.async pipelining instead of a tile prefetched into registers, which bounded the loads
      # in flight: the read passes ran at 2.7-3.0 TB/s). Every CUDA kernel case with both loops pipelined (the
      # other_configs case also runs stages 3/3 and 4/2 against the torch path), then the buckets under each setting
    ADALOMO_KERNEL_CONFIG='{"stages_read": 3, "stages_write": 3}' kernel_tests 170
    pack
    buckets kernels_stages 260 '[{}, {"stages_read": 2}, {"stages_read": 3}, {"stages_read": 4},
      {"stages_read": 3, "stages_write": 2}, {"stages_read": 3, "stages_write": 3},
      {"stages_read": 3, "stages_write": 3, "maxnreg_write": 128}, {"carry_psq": true},
      {"carry_psq": true, "stages_read": 3}, {"carry_psq": true, "stages_read": 4, "stages_write": 2}]'
    pack
    ;;
  ac) # 1 GPU (2026-11-29, fourth session): stages_read=3 the default (stage ab: -3% to -6% per bucket), the shared
      # memory of pipelined loops bounded per tile size, the carry check at 1e-5: every CUDA kernel case at the new
      # defaults; the carry cases with pipelined writes (failed in ab; the cause, found after ad, was the test's device key: see ae); then 6.7B, three
      # rounds of 20 steps: the previous default (_r1), the new one, and with carry_psq
    kernel_tests 170
    pack
    ADALOMO_KERNEL_CONFIG='{"stages_write": 3}' timeout 90 python3 tests/test_kernels.py cuda \
      carry_psq,carry_stale_reported > "$out/tests_cuda_carry_w3.json" 2> "$out/tests_cuda_carry_w3.err"
    echo "carry w3 rc=$?"; tail -c 400 "$out/tests_cuda_carry_w3.json"; echo
    pack
    timeout 420 python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --rounds 3 --out "$out/bench_6.7b.json" \
      --only floor,adalomo_fused_r1,adalomo_fused,adalomo_fused_carry,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b.log"
    pack
    ;;
  ad) # 1 GPU (2026-11-29, fourth session): carry_psq on by default (stage ac: 1.089x against 1.106-1.111x at 6.7B),
      # its write never pipelined; every CUDA kernel case at the new defaults (ac's run of them timed out at 170 s:
      # other_configs compiles two more geometries), then 6.7B with and without the carry, three rounds of 20 steps
    kernel_tests 260
    pack
    timeout 320 python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --rounds 3 --out "$out/bench_6.7b.json" \
      --only floor,adalomo_fused,adalomo_fused_nocarry,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 5 "$out/bench_6.7b.log"
    pack
    ;;
  ae) # 1 GPU (2026-11-29, fourth session, last of the device budget): ad's carry_psq failure was the test asking for
      # the flag of torch.device("cuda") while the flags are keyed by cuda:0 (None, reported as "flagged"; fixed);
      # carried sums are now also tied to their tensor objects. Every CUDA kernel case again (a case that leaves the
      # check's flag set now fails), then 0.94B at the new defaults, one round. Ran on a fresh machine: every kernel
      # compiled anew, the tests ran out of their 220 s and the 0.94B run out of its 100 s before the last floor
    kernel_tests 220
    pack
    timeout 100 python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
      floor,adalomo_fused,adalomo_fused_nocarry,adafactor_fused,floor > "$out/bench_0.94b.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 7 "$out/bench_0.94b.log"
    pack
    ;;
  af) # 1 GPU (2026-11-29, fifth session): what ae could not finish. Every CUDA kernel case at the defaults (carry_psq,
      # stages_read 3) with the device-key fix and the per-case flag check, with room for a fresh machine's compiles
      # (ae: more than 220 s); then the 0.94B table at the defaults in what is left of the call (bench_gpu writes
      # its JSON after every row: the peers after the second floor, so that a cut run still has both floors)
    kernel_tests 400
    pack
    timeout $((585 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --out "$out/bench_0.94b.json" --only \
      floor,adalomo_fused,adalomo_classic,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic,floor,\
torch_adamw_fused,lomo_optim_adalomo,torch_adafactor > "$out/bench_0.94b.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 13 "$out/bench_0.94b.log"
    pack
    ;;
  ag) # 1 GPU (2026-11-29, fifth session): every row of ours at 6.7B at the defaults (classic AdaLomo and Adafactor,
      # fused Adafactor and Lomo were last measured without the carry in stage z), two rounds of 20 steps
    timeout 570 python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --rounds 2 --out "$out/bench_6.7b_all.json" \
      --only floor,adalomo_fused,adalomo_classic,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic,floor \
      > "$out/bench_6.7b_all.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 10 "$out/bench_6.7b_all.log"
    pack
    ;;
  ah) # 1 GPU (2026-11-29, fifth session): af and ag ran on a noisy host (lomo-optim's Python loop 36% slower than
      # in stage t; fused AdaLomo at 0.94B 87.6 ms, fastest step 77.1, against 71.3/70.2 in ae with the same code):
      # every row of ours at 0.94B in two rounds, then 6.7B's noisiest rows in one, each row now recording the
      # host's time to issue a step, a host-speed probe and every step's time
    timeout 380 python3 benchmarks/bench_gpu.py --config 0.94b --rounds 2 --out "$out/bench_0.94b_all.json" --only \
      floor,adalomo_fused,adalomo_classic,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic,floor \
      > "$out/bench_0.94b_all.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 9 "$out/bench_0.94b_all.log"; uptime
    pack
    timeout $((565 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --out "$out/bench_6.7b.json" \
      --only floor,adalomo_fused,adafactor_classic,lomo_fused,floor > "$out/bench_6.7b.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b.log"
    pack
    ;;
  ai) # 1 GPU (2026-11-29, fifth session, the last ~490 s): at 6.7B fused AdaLomo's host finished issuing a step
      # 3.6 ms before the device finished it, the floor's 18 ms before (ah): is the fused step host-bound (device
      # idle between kernels)? A profile of each; then the side stream at the device's highest priority (the
      # update's blocks scheduled first whenever an SM frees up) against the plain one, one round
    prof67 floor adalomo_fused
    pack
    timeout $((390 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --steps 20 --out "$out/bench_6.7b_side.json" \
      --only floor,adalomo_fused,adalomo_fused_sidehi,adalomo_fused_side,floor > "$out/bench_6.7b_side.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b_side.log"
    pack
    ;;
  aj) # 1 GPU (2026-11-29, fifth session, the last ~280 s of device time): each row against the floor in ONE process,
      # alternating blocks (bench_gpu --paired): what the one-process-per-row tables cannot separate from the host's
      # process-to-process variation (ag/ah/ai: fused AdaLomo 1.12-1.15x median, 1.095-1.098x fastest step)
    timeout 150 python3 benchmarks/bench_gpu.py --config 6.7b --paired 4 --steps 10 --warmup 2 \
      --only adalomo_fused,lomo_fused,adalomo_classic,adafactor_fused --out "$out/paired_6.7b.json" \
      > "$out/paired_6.7b.log" 2>&1
    echo "paired 6.7b rc=$?"; tail -n 6 "$out/paired_6.7b.log"
    pack
    timeout $((200 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --paired 4 --steps 10 \
      --only adalomo_fused,adafactor_fused,adalomo_classic,lomo_fused --out "$out/paired_0.94b.json" \
      > "$out/paired_0.94b.log" 2>&1
    echo "paired 0.94b rc=$?"; tail -n 6 "$out/paired_0.94b.log"
    pack
    ;;
  ak) # 1 GPU (written 2026-11-29, ran 2026-11-30: the host's speed drifts; docs/kernels.md): why fused AdaLomo at 0.94B runs at ~69.6 ms in some
      # processes and 77-106 ms in others (af: 87.6; ah: 69.4/69.7; aj --paired: 82.1 against the floor's 66.2 in
      # the same process, all four blocks). Six rounds of one fused process each, every row now recording its
      # counters (gc, cudaMalloc, pinned allocations, plans built, threads, CPU/NUMA node) and, with _timed, the
      # host time inside the hooks and flushes: compare a slow process with a fast one (the same hook time in
      # both = the cause is elsewhere); then the paired rows aj could not finish
    timeout 330 python3 benchmarks/bench_gpu.py --config 0.94b --rounds 6 --only floor,adalomo_fused_timed,floor \
      --out "$out/bench_0.94b_diag.json" > "$out/bench_0.94b_diag.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 5 "$out/bench_0.94b_diag.log"
    pack
    timeout $((570 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --paired 4 --steps 10 --warmup 2 \
      --only adalomo_classic,adafactor_fused,adafactor_classic,lomo_classic --out "$out/paired_6.7b.json" \
      > "$out/paired_6.7b.log" 2>&1
    echo "paired 6.7b rc=$?"; tail -n 6 "$out/paired_6.7b.log"
    pack
    ;;
  v)  # 1 GPU, NEXT SESSION (written 2026-11-29, not run yet): why the side stream is slower at 6.7B (1.315x against
      # 1.184x in stage r): a profile of each (do the update kernels overlap the backward's matmuls, and what do
      # they cost them), and both with --rounds
    prof67 adalomo_fused adalomo_fused_side
    pack
    timeout 200 python3 benchmarks/bench_gpu.py --config 6.7b --rounds 3 --out "$out/bench_6.7b_side.json" \
      --only floor,adalomo_fused,adalomo_fused_side,floor > "$out/bench_6.7b_side.log" 2>&1
    echo "bench 6.7b side rc=$?"; tail -n 5 "$out/bench_6.7b_side.log"
    pack
    ;;
  w)  # 2 GPUs, NEXT SESSION (written 2026-11-29, not run yet): FSDP2 exactness on NCCL now that the model has a 3-D
      # parameter (the >= 3-D path of the sharded kernels; checked on CPU with gloo and the interpreter: 1.2e-7..3e-7)
    exactness 150
    pack
    ;;
  al) # 1 GPU (2026-11-30): ak showed the fused step host-bound with the host's speed drifting within a process (the
      # slow fused processes spent 13-18 ms per step in the hooks against 11 in the fast one): flush_thread (the
      # buckets' host work on a worker thread, overlapping the backward's issuing) and larger buckets (fewer
      # flushes), each paired with the floor in its process; then the peaks, one process per row
    timeout 220 python3 benchmarks/bench_gpu.py --config 0.94b --paired 4 \
      --only adalomo_fused,adalomo_fused_thread,adalomo_fused_b256,adalomo_fused_thread_b256 \
      --out "$out/paired_0.94b.json" > "$out/paired_0.94b.log" 2>&1
    echo "paired 0.94b rc=$?"; tail -n 6 "$out/paired_0.94b.log"
    pack
    timeout $((440 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --paired 4 --steps 10 --warmup 2 \
      --only adalomo_fused,adalomo_fused_thread,lomo_fused_thread,adalomo_fused_thread_b512 \
      --out "$out/paired_6.7b.json" > "$out/paired_6.7b.log" 2>&1
    echo "paired 6.7b rc=$?"; tail -n 6 "$out/paired_6.7b.log"
    pack
    timeout $((575 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b \
      --only floor,adalomo_fused_thread,adalomo_fused_thread_b256 --out "$out/bench_0.94b_peak.json" \
      > "$out/bench_0.94b_peak.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 5 "$out/bench_0.94b_peak.log"
    pack
    ;;
  am) # 1 GPU (2026-11-30): the grouped launches replayed from CUDA graphs (kernel setting graphs, on by default
      # from this stage) against launched one by one (_nograph), flush_thread and larger buckets, every row in ONE
      # process with the floor (--together: the same drift of the host for all); correctness of the graph path
      # first, then the peaks one process per row
    timeout 110 python3 tests/test_kernels.py cuda gpu_graph_replay,fused_buckets,many_scaled,carry_psq \
      > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; cat "$out/tests_cuda.json"
    pack
    timeout 200 python3 benchmarks/bench_gpu.py --config 6.7b --paired 3 --together --steps 10 --warmup 2 \
      --only floor,adalomo_fused,adalomo_fused_nograph,adalomo_fused_thread_b512,lomo_fused,adafactor_fused,adafactor_classic,adalomo_classic,lomo_classic \
      --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 10 "$out/together_6.7b.log"
    pack
    timeout $((430 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --paired 4 --together \
      --only floor,adalomo_fused,adalomo_fused_nograph,adalomo_fused_thread,adalomo_fused_b256,lomo_fused,adafactor_fused \
      --out "$out/together_0.94b.json" > "$out/together_0.94b.log" 2>&1
    echo "together 0.94b rc=$?"; tail -n 8 "$out/together_0.94b.log"
    pack
    timeout $((540 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --only floor,adalomo_fused \
      --out "$out/bench_0.94b_peak.json" > "$out/bench_0.94b_peak.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 4 "$out/bench_0.94b_peak.log"
    pack
    ;;
  an) # 1 GPU (2026-11-30), with the lomo-optim wheel (prefix above): this version's defaults (256 MiB buckets from
      # ~0.9B parameters, graphs on) with every row of ours and the peers in ONE process per size (--together), then
      # the peaks at 0.94B one process per row. Ran once: lomo-optim's hooks stayed on the model (the harness now
      # removes them and refuses a block that leaves hooks), so the 0.94B part stopped and the 6.7B rounds after the
      # first were slowed. Rerun 2026-11-30 after the fix (results/h200_2026-11-30b/an). First the CUDA cases of grouped Lomo with
      # its lr in the metadata (graphs under an LR scheduler), written after the last run
    timeout 90 python3 tests/test_kernels.py cuda gpu_graph_replay,many_lomo,many_scaled,fused_buckets \
      > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; cat "$out/tests_cuda.json"
    pack
    timeout $((240 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --paired 3 --together \
      --only floor,adalomo_fused,adafactor_fused,lomo_fused,adalomo_classic,adafactor_classic,lomo_classic,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
      --out "$out/together_0.94b.json" > "$out/together_0.94b.log" 2>&1
    echo "together 0.94b rc=$?"; tail -n 11 "$out/together_0.94b.log"
    pack
    timeout $((360 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --paired 2 --together --steps 10 \
      --warmup 2 --only floor,adalomo_fused,torch_adamw_fused,torch_adafactor,lomo_optim_adalomo \
      --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 6 "$out/together_6.7b.log"
    pack
    timeout $((420 - SECONDS)) python3 benchmarks/bench_gpu.py --config 0.94b --only floor,adalomo_fused \
      --out "$out/bench_0.94b_peak.json" > "$out/bench_0.94b_peak.log" 2>&1
    echo "bench 0.94b rc=$?"; tail -n 4 "$out/bench_0.94b_peak.log"
    pack
    ;;
  ao) # 1 GPU (2026-11-30): a second 6.7B run with every row of ours in one process (an had only fused AdaLomo and
      # the peers: 1.100x against am's 1.082x), with the variants that could move the fused row at this size (smaller
      # buckets, updates on a side stream, graphs off), then the 6.7B peaks at this version's defaults, one process
      # per row
    timeout 330 python3 benchmarks/bench_gpu.py --config 6.7b --paired 3 --together --steps 10 --warmup 2 \
      --only floor,adalomo_fused,adalomo_classic,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic,adalomo_fused_b64,adalomo_fused_side,adalomo_fused_nograph,torch_adamw_fused \
      --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 12 "$out/together_6.7b.log"
    pack
    timeout $((540 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --only floor,adalomo_fused,adafactor_fused,lomo_fused \
      --out "$out/bench_6.7b_peak.json" > "$out/bench_6.7b_peak.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 6 "$out/bench_6.7b_peak.log"
    pack
    ;;
  ap) # 1 GPU (2026-11-30): can the statistics and RMS(u) passes share one read of g (8 instead of 10 bytes per
      # parameter)? benchmarks/probe_one_read_stats.py against this version's grouped kernels on the same tensors
    timeout 420 python3 benchmarks/probe_one_read_stats.py --out "$out/probe_one_read.json" > "$out/probe_one_read.log" 2>&1
    echo "probe rc=$?"; tail -n 7 "$out/probe_one_read.log"
    pack
    ;;
  aq) # 1 GPU (2026-11-30): the one-read statistics (kernel setting one_read, from this stage on by default): the
      # CUDA cases first (stop if they fail), then the grouped kernels per bucket with and without it and a few
      # geometries, then 6.7B with every row of ours in one process against the same rows in three passes (_three)
    timeout 150 python3 tests/test_kernels.py cuda one_read,many_scaled,fused_buckets,carry_psq,gpu_fac_big_bf16,gpu_fac_big_fp32_beta1,gpu_fac_wide,gpu_graph_replay,optimizers_end_to_end \
      > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; cat "$out/tests_cuda.json"
    pack
    if ! python3 -c "import json,sys; d=json.load(open('$out/tests_cuda.json')); sys.exit(any(v not in ('ok',) for k,v in d.items() if not k.endswith(':seconds')))"; then
      echo "CUDA cases failed: no benchmarks"; exit 1
    fi
    timeout 200 python3 benchmarks/bench_kernels.py --skip-correctness --shapes "" --sweep --out "$out/kernels_one_read.json" \
      --sweep-configs '[{"one_read": false}, {}, {"one_read_tm": 32}, {"one_read_tm": 128}, {"one_read_elems": 16384, "warps_one_read": 8}, {"one_read_elems": 4096, "warps_one_read": 8}, {"one_read_max_n": 16384}]' \
      > "$out/kernels_one_read.log" 2>&1
    echo "kernels rc=$?"; sweep_table "$out/kernels_one_read.log"
    pack
    timeout $((570 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --paired 3 --together --steps 10 --warmup 2 \
      --only floor,adalomo_fused,adalomo_fused_three,adafactor_fused,adalomo_classic,adalomo_classic_three \
      --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 8 "$out/together_6.7b.log"
    pack
    ;;
  ar) # 1 GPU (2026-11-30): one_read's tile geometry from aq's sweep as the default (16384 elements, 8 warps), a
      # few geometries around it per bucket, then both sizes with every row of ours in one process, one-read
      # against three passes (_three), the peers at 6.7B (AdamW) for scale
    timeout 150 python3 benchmarks/bench_kernels.py --skip-correctness --shapes "" --sweep --out "$out/kernels_one_read.json" \
      --sweep-configs '[{"one_read": false}, {}, {"one_read_tm": 128}, {"one_read_elems": 8192}, {"one_read_elems": 8192, "warps_one_read": 16}]' \
      > "$out/kernels_one_read.log" 2>&1
    echo "kernels rc=$?"; sweep_table "$out/kernels_one_read.log"
    pack
    timeout 150 python3 benchmarks/bench_gpu.py --config 0.94b --paired 3 --together \
      --only floor,adalomo_fused,adalomo_fused_three,adalomo_classic,adalomo_classic_three,adafactor_fused,lomo_fused \
      --out "$out/together_0.94b.json" > "$out/together_0.94b.log" 2>&1
    echo "together 0.94b rc=$?"; tail -n 8 "$out/together_0.94b.log"
    pack
    timeout $((580 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --paired 3 --together --steps 10 --warmup 2 \
      --only floor,adalomo_fused,adalomo_fused_three,adalomo_classic,adalomo_classic_three,adafactor_fused,adafactor_classic,lomo_fused,lomo_classic,torch_adamw_fused \
      --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 12 "$out/together_6.7b.log"
    pack
    ;;
  as) # 1 GPU (2026-11-30): more rounds of one-read against three passes, fused AdaLomo only, at both sizes (ar:
      # 0.94B 1.082x against 1.052x, 6.7B 1.100x against 1.103x, three rounds each), then the 6.7B peaks
    timeout 130 python3 benchmarks/bench_gpu.py --config 0.94b --paired 6 --together \
      --only floor,adalomo_fused,adalomo_fused_three --out "$out/together_0.94b.json" > "$out/together_0.94b.log" 2>&1
    echo "together 0.94b rc=$?"; tail -n 3 "$out/together_0.94b.log"
    pack
    timeout 190 python3 benchmarks/bench_gpu.py --config 6.7b --paired 6 --together --steps 10 --warmup 2 \
      --only floor,adalomo_fused,adalomo_fused_three --out "$out/together_6.7b.json" > "$out/together_6.7b.log" 2>&1
    echo "together 6.7b rc=$?"; tail -n 3 "$out/together_6.7b.log"
    pack
    timeout $((450 - SECONDS)) python3 benchmarks/bench_gpu.py --config 6.7b --only floor,adalomo_fused \
      --out "$out/bench_6.7b_peak.json" > "$out/bench_6.7b_peak.log" 2>&1
    echo "bench 6.7b rc=$?"; tail -n 3 "$out/bench_6.7b_peak.log"
    pack
    ;;
  at) # 1 GPU (2026-11-30): one_read with at least one_read_programs=128 programs per group (a matrix alone in its
      # group gets 128 row groups, as ar measured faster): the CUDA cases, then the buckets against three passes.
      # That rule made the geometry depend on the group (fused buckets and classic groups would round apart); it was
      # replaced after this run by one of the shape alone (one_read_rows): stage au
    timeout 100 python3 tests/test_kernels.py cuda one_read,many_scaled,fused_buckets,gpu_fac_big_bf16 \
      > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; cat "$out/tests_cuda.json"
    pack
    timeout 120 python3 benchmarks/bench_kernels.py --skip-correctness --shapes "" --sweep --out "$out/kernels_one_read.json" \
      --sweep-configs '[{"one_read": false}, {}]' > "$out/kernels_one_read.log" 2>&1
    echo "kernels rc=$?"; sweep_table "$out/kernels_one_read.log"
    pack
    ;;
  au) # 1 GPU (2026-11-30): the one-read geometry as a function of the shape alone (64 row groups, more for tall
      # matrices: one_read_rows=256): the CUDA case (fused buckets bit-identical to classic with several programs
      # per matrix), then the buckets against three passes
    timeout 60 python3 tests/test_kernels.py cuda one_read > "$out/tests_cuda.json" 2> "$out/tests_cuda.err"
    echo "kernel tests rc=$?"; cat "$out/tests_cuda.json"
    timeout 90 python3 benchmarks/bench_kernels.py --skip-correctness --shapes "" --sweep --out "$out/kernels_one_read.json" \
      --sweep-configs '[{}]' > "$out/kernels_one_read.log" 2>&1
    echo "kernels rc=$?"; sweep_table "$out/kernels_one_read.log"
    pack
    ;;
  *) echo "unknown stage $stage (a-z, aa-au)"; exit 2 ;;
esac
