#!/usr/bin/env bash
# One prepared call on one GPU machine (H100 / H200): every GPU check of this repository in at most BUDGET seconds
# of wall time (default 540), each stage time-boxed and its results written as it finishes, so that a call cut
# short still returns what finished. The stages answer, in this order: does the default CUDA pipeline (memory, on
# CIFAR-10) run and how fast, does the ViT teacher learn at the gpu profile's recipe, is SSKD finite at blr 0.05
# (stage 1: those runs of the reproduction first); the central configuration's speed, eager and --compile, MFU, and
# the loader on real JPEGs (stage 2: gpu_check, which times them before its correctness cases); the benches' ratios
# (stage 3); the rest of the reproduction (stage 4). Prepare it with bench/gpu_prepare.sh.
# Results (at most 8 files) in $OUT (default gpu_all_out/DATE-TIME):
#   summary.txt      versions, each stage's status and seconds, the tables printed by the stages
#   gpu_check.json   bench/gpu_check.py: every script on CUDA, bf16 vs fp32, resume, memory, compile, MFU
#   benches.txt      bench/run_benches.py: every bench's ratios at its GPU size
#   cifar10_gpu.{json,md}       bench/reproduce_cifar10.py --profile gpu, as far as its time budget reaches
#   logs.tgz         every command's log and the runs' metrics (no checkpoints)
#
#   bash bench/gpu_all.sh                       # data: .device/cifar10-jpg.tar.gz (git-ignored, carried)
#   BUDGET=300 DATA=/path/cifar10-jpg.tar.gz bash bench/gpu_all.sh
#   TINY=1 bash bench/gpu_all.sh                # the same stages at CPU sizes (a rehearsal: gpu_check --tiny,
#                                               # benches --tiny, the reproduction's tiny profile), no CUDA needed
#
# A carried timm wheel (.whl/timm-*.whl, git-ignored) is installed first so that the GPU runs the timm the CPU
# suite tested (the device machine's own timm version is unknown).
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-540}
OUT=${OUT:-gpu_all_out/$(date +%Y%m%d-%H%M%S)}
DATA=${DATA:-.device/cifar10-jpg.tar.gz}
WORK=${WORK:-/tmp/gpu_all_work}
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS COMMAND...: runs COMMAND with at most SECONDS (and never past the budget, 15 s kept for packing)
stage() {
  local name=$1 limit=$2; shift 2
  local avail=$(( $(left) - 15 ))
  (( limit > avail )) && limit=$avail
  if (( limit < 10 )); then say "== $name: skipped (limit ${limit} s)"; return; fi
  say "== $name: up to ${limit} s: $*"
  local t=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  say "== $name: exit $rc after $(( $(date +%s) - t )) s$([ $rc = 124 ] && echo ' (time limit)')"
  tail -n "${TAIL:-40}" "$WORK/$name.log" >> "$SUMMARY"
}

# 0. smoke: the carried timm, CUDA visible, versions (seconds)
if ls .whl/timm-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import os, torch, torchvision, timm
print(f"torch {torch.__version__} torchvision {torchvision.__version__} timm {timm.__version__} cuda {torch.version.cuda}")
print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}, {os.cpu_count()} CPU cores")
assert torch.cuda.is_available() or os.environ.get("TINY") == "1", "no CUDA device"
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { say "smoke step failed: stopping"; exit 1; }

TINY=${TINY:-0}; export TINY
SIZE=(); [ "$TINY" = 1 ] && SIZE=(--tiny)
PROFILE=(--profile gpu --data "$DATA"); [ "$TINY" = 1 ] && PROFILE=(--profile tiny)

# 1. the first answers, from the reproduction's own runs (kept: stage 4 skips them): the ViT teacher at its recipe, the
#    student alone on the default CUDA pipeline (its pipeline, img/s and data share), SSKD's student at blr 0.05
FIRST_S=${FIRST_S:-180}
stage first $((FIRST_S + 10)) python3 bench/reproduce_cifar10.py "${PROFILE[@]}" --runs teacher_vit vitkd_alone_s0 \
  sskd_alone_s0 --jobs 3 --runner subprocess --out "$WORK/repro" --results_dir "$WORK/first" --time_budget "$FIRST_S" --keep_going
python3 - "$WORK/repro" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import glob, json, os, sys
for d in sorted(glob.glob(os.path.join(sys.argv[1], "*_*", "*"))):
    if os.path.basename(d) not in ("teacher_vit", "vitkd_alone_s0", "sskd_alone_s0"):
        continue
    log = open(os.path.join(d, "suite_log.txt"), errors="replace").read().replace("\r", "\n").splitlines() \
        if os.path.exists(os.path.join(d, "suite_log.txt")) else []
    pipe = [l for l in log if "input pipeline" in l][-1:]
    speed = [l.strip() for l in log if " it/s" in l][-1:]
    nonfinite = [l for l in log if "non-finite" in l][-1:]
    m = json.load(open(os.path.join(d, "metrics.json"))) if os.path.exists(os.path.join(d, "metrics.json")) else {}
    print(f"-- {os.path.basename(d)}: metrics {m.get('metrics')} images/s {m.get('images_per_s')} {pipe} last line "
          f"{speed} {nonfinite or 'no non-finite loss'}")
EOF

# 2. every script on CUDA: the central configuration's timing (eager, --compile), MFU and real JPEGs first; then
#    correctness 6 cases at a time, the other timings
TAIL=60 stage gpu_check "${GPU_CHECK_S:-170}" python3 bench/gpu_check.py --out "$WORK/gpu_check" --jobs 6 --num_workers 2 \
  "${SIZE[@]}" ${GPU_CHECK_FLAGS:-}
cp "$WORK/gpu_check/gpu_check.json" "$OUT/" 2>/dev/null

# 3. the benches' ratios (ops, host syncs, paired times) at their GPU sizes
stage benches "${BENCHES_S:-150}" python3 bench/run_benches.py --out "$OUT/benches.txt" --timeout 45 "${SIZE[@]}"

# 4. the rest of the CIFAR-10 reproduction's gpu profile: teachers, every paper's central row at seed 0, the rest
REPRO_S=$(( $(left) - 30 ))
stage reproduce $((REPRO_S + 10)) python3 bench/reproduce_cifar10.py "${PROFILE[@]}" \
  --out "$WORK/repro" --results_dir "$OUT" --time_budget "$REPRO_S" --keep_going

# 4. pack: logs and metrics, never checkpoints
tar czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.pth' --exclude='data' --exclude='*.tmp*' . 2>/dev/null
say "== total $(( $(date +%s) - T0 )) s; files: $(ls "$OUT" | tr '\n' ' ')"
