#!/usr/bin/env bash
# The GPU measurements behind README's performance section, most wanted first, in one command
# that fits a short lease of a GPU machine (torch only; no Ray needed):
#
#   bash bench/gpu_suite.sh OUT_DIR            # BUDGET_S=480 by default
#
# Each part writes OUT_DIR/<part>.log (and .json for the step benchmarks); a part that fails or
# times out is noted and the next one runs; parts that would start after BUDGET_S seconds are skipped.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}
budget=${BUDGET_S:-480}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' | tee "$out/device.log"

part() {  # part NAME TIMEOUT_S SCRIPT ARGS...
  local name=$1 limit=$2; shift 2
  if (( SECONDS > budget )); then echo "== $name: skipped (${SECONDS}s > budget ${budget}s)" | tee -a "$out/skipped.log"; return; fi
  echo "== $name: python $* (at ${SECONDS}s)"
  timeout "$limit" python "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  (( rc == 0 )) || echo "== $name: exit code $rc (124: timed out after ${limit}s)" | tee -a "$out/failed.log"
}

# 1. Is the b512 Block-KD step still bound by the host, and do CUDA graphs or stacked stones fix it?
part profile_default 150 bench/step_profile.py 512
part profile_cudagraphs 150 bench/step_profile.py 512 --compile-mode reduce-overhead
part profile_stones_one_by_one 150 bench/step_profile.py 512 --stones-one-by-one
# Do CUDA graphs train the same (losses, student BN statistics updated, teacher untouched)?
part cuda_graphs_check 150 bench/cuda_graphs_check.py
# 2. The ratios with CUDA graphs: reference vs bkd Block-KD and KD at 512 and 1024.
part sweep_cudagraphs 300 bench/step_bench.py --device cuda --batch-sweep 512,1024 --compile-mode reduce-overhead \
  --json-out "$out/sweep_cudagraphs.json"
# 3. The full ladder with the default compile mode (includes stacked vs one-by-one stones).
part ladder 420 bench/step_bench.py --device cuda --json-out "$out/ladder.json"
echo "done in ${SECONDS}s; logs in $out"
