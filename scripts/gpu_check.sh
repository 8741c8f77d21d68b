#!/usr/bin/env bash
# The one check of a lent GPU machine (one H200: 15 minutes of device time in all, start-up
# included; no internet; torch 2.11+cu130 but no ffcv): builds the op with the device's torch,
# runs `python -m app selftest --full` and leaves its report in $OUT, within about 9 minutes.
#
# On the CPU machine, once per session (~70 s: ffcv and the other wheels the device lacks):
#   bash ../shared/device-kit/build.sh
# then the device call:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".devlibs", ".device-kit"],
#       timeout_s=570)
# To rerun only what failed, in the same call: command="SELFTEST_ONLY=name,name bash
# scripts/gpu_check.sh".
#
# What comes back (the device returns at most 8 files, at most 2 folders deep):
#   $OUT/gpu_check.log                 all output: kit, nvidia-smi, op build, the selftest table
#   $OUT/selftest/report.md, .json     the selftest report (every check's status, seconds, data)
#   $OUT/selftest/pytest-cuda.log      the CUDA test suite's output
#   $OUT/selftest/bench.log            the tables of bench kernels, train and loader
#   $OUT/selftest/bench-kernels.json, bench-train.json, bench-loader.json
#
# Settings, from the environment:
#   TOTAL_S        seconds the whole script may take (default 540; the call's timeout_s is 570)
#   PYTHON         the interpreter (default python3, the device's)
#   KIT            the set-up to source (default .device-kit/on-device.sh; empty: none, e.g. for
#                  a dry run on the CPU machine: KIT= PYTHON=.venv/bin/python SELFTEST_ONLY=versions)
#   SELFTEST_ONLY  passed to selftest as --only
#   OUT            where the outputs go (the device tool sets it; default /tmp/gpu_check)
set -uo pipefail

TOTAL_S=${TOTAL_S:-540}
PYTHON=${PYTHON:-python3}
KIT=${KIT-.device-kit/on-device.sh}
SELFTEST_ONLY=${SELFTEST_ONLY:-}
OUT=${OUT:-/tmp/gpu_check}
BUILD_S=300     # a clean build of the CPU and CUDA kernels: 40-100 s on 2 cores
MARGIN_S=25     # for the copy and the summary after selftest

step() {  # step NAME SECONDS COMMAND...: COMMAND under a time limit; prints how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "---- $name (limit ${limit} s): $*"
  timeout --kill-after=20 "$limit" "$@"
  rc=$?
  local how=""
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then how=" (time limit)"; fi
  echo "---- $name: exit code $rc after $((SECONDS - t0)) s$how"
  return "$rc"
}

left() {  # seconds left of TOTAL_S, less the margin for what follows selftest
  echo $((TOTAL_S - SECONDS - MARGIN_S))
}

summarize() {  # the outcome in a few lines: the selftest summary and what came back
  local report=$OUT/selftest/report.json
  echo "==== gpu_check summary ($((SECONDS)) s)"
  if [[ -f $report ]]; then
    "$PYTHON" - "$report" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
counts = rep["counts"]
print(f"selftest: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
      f"in {rep['seconds']} s ({rep['machine']})")
for c in rep["checks"]:
    if c["status"] != "pass":
        print(f"  {c['name']}: {c['status']}: {c['detail'][:300]}")
EOF
  else
    echo "selftest: no report (see the log above)"
  fi
  local files
  files=$(find "$OUT" -type f | wc -l)
  echo "files in \$OUT: $files (8 come back)"
  find "$OUT" -type f -printf '  %P (%s bytes)\n' | sort
}

main() {
  local status=0
  echo "gpu_check: $(date -u +%FT%TZ), $(hostname), budget ${TOTAL_S} s"
  if [[ -n $KIT ]]; then
    # Going on without it still checks the op, DDP and the benchmarks; selftest then names what
    # is missing (ffcv's extension fails to load where the device's glibc is older than the kit's).
    # shellcheck source=/dev/null
    if ! source "$KIT"; then
      echo "gpu_check: sourcing $KIT failed (was bash ../shared/device-kit/build.sh run on the" \
           "CPU machine, and .whl .devlibs .device-kit carried?); going on without it"
      status=1
    fi
  fi
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv \
    || echo "gpu_check: nvidia-smi failed"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
    torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'

  # A fresh build with this machine's torch: one made with another torch does not load here.
  SELFNORM_OPS_DIR=$(mktemp -d /tmp/selfnorm-ops.XXXXXX)
  export SELFNORM_OPS_DIR PYTHONUNBUFFERED=1
  local full=(--full)
  if ! step "op build" "$BUILD_S" "$PYTHON" -m cuda_ops build --require-cuda; then
    # without the compiled op the full runs would only repeat its failure: the quick checks
    # still say what else works here
    echo "gpu_check: the op did not build (its build.log is under $SELFNORM_OPS_DIR)"
    full=()
    status=1
  fi
  "$PYTHON" -m cuda_ops info

  local budget
  budget=$(left)
  if ((budget < 90)); then
    echo "gpu_check: only ${budget} s left; the quick checks only"
    full=()
    budget=$((budget < 30 ? 30 : budget))
  fi
  local only=()
  if [[ -n $SELFTEST_ONLY ]]; then only=(--only "$SELFTEST_ONLY"); fi
  # --budget ends selftest in time on its own (checks not begun by then are skipped, the full
  # runs stopped at it); timeout, 20 s later, is the backstop, and its SIGTERM still leaves the
  # report of the checks done
  step "selftest" "$((budget + 20))" "$PYTHON" -m app selftest "${full[@]}" "${only[@]}" \
    --out "$OUT/selftest" --budget "$budget" || status=1
  summarize
  return "$status"
}

cd "$(dirname "$0")/.." || exit 1  # the checkout's root: the kit and `python -m app` expect it
mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
