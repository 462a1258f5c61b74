#!/usr/bin/env bash
# What only a GPU can check (issue #17), in a few minutes on a lent one: the suite's CUDA-marked tests, a fixed
# and a dean `lis compress` of the CIFAR-10 ResNet-56 config on fake data with and without run.amp=bf16, a
# resume after SIGTERM, and benchmarks/ops.py and throughput.py. Their numbers go to $OUT/gpu_check.txt, for
# benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU host, from the repository root
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # the same steps on the CPU at a tiny budget (the suite
#                                                      # runs this: tests/test_benchmarks.py)
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.txt"
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  RUN=(experiments/mnist1d.yaml run.device=cpu teacher.epochs=1 kdp.epochs=1 finetune.epochs=1 data.batch_size=512)
  BENCH=(--device cpu --models resnet56 --batch 4 --iters 2 --warmup 1)
  OPS=(--device cpu --batch 2 --iters 12)
else
  DEVICE=cuda
  RUN=(experiments/cifar10_resnet56.yaml run.device=cuda data.name=fake data.fake_size=2048 teacher.epochs=1
       kdp.epochs=2 finetune.epochs=1)
  BENCH=(--device cuda --models resnet56)
  OPS=(--device cuda)
fi
COMMON=("run.dir=$OUT/runs" tracking.wandb=disabled checkpoint.every_iters=5)
: > "$REPORT"
note() { echo "$*" | tee -a "$REPORT"; }
summary() { "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('student_acc', 'macs', 'params', 'wall_time_s') if k in s})" "$1"; }

note "gpu_check on $DEVICE, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$DEVICE" = cuda ]; then
  "$PY" -m pytest -q -m cuda tests 2>&1 | tail -n 3 | tee -a "$REPORT"
fi
for policy in fixed dean; do
  for amp in fp32 bf16; do
    name="$policy-$amp"
    start=$(date +%s)
    [ "$amp" = bf16 ] && precision=run.amp=bf16 || precision=run.channels_last=false  # (the default)
    "$PY" -m lis compress "${RUN[@]}" "${COMMON[@]}" "policy.name=$policy" "$precision" "run.name=$name" \
      --overwrite > "$OUT/$name.log" 2>&1
    note "compress $name: $(( $(date +%s) - start )) s, $(summary "$OUT/runs/$name/summary.json")"
  done
done
# a resume: stop a dean run with SIGTERM part-way (it saves a checkpoint), then continue it
"$PY" -m lis compress "${RUN[@]}" "${COMMON[@]}" policy.name=dean run.name=resumed --overwrite > "$OUT/resumed.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  if grep -qs '"phase": "kdp", "iter": [1-9]' "$OUT/runs/resumed/metrics.jsonl"; then break; fi
  sleep 0.1
done
kill -TERM "$pid" 2>/dev/null || true
wait "$pid" || true
if [ -f "$OUT/runs/resumed/summary.json" ]; then
  note "resume: the run finished before SIGTERM reached it (nothing to resume)"
else
  "$PY" -m lis compress --resume "$OUT/runs/resumed" >> "$OUT/resumed.log" 2>&1
  note "resume: $(tail -n 1 "$OUT/runs/resumed/resume.log"); $(summary "$OUT/runs/resumed/summary.json")"
fi
"$PY" benchmarks/ops.py "${OPS[@]}" 2>&1 | tee -a "$REPORT"
"$PY" benchmarks/throughput.py "${BENCH[@]}" 2>&1 | tee -a "$REPORT"
note "gpu_check done"
