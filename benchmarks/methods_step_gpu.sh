#!/usr/bin/env bash
# The identity methods' per-step cost at full size on one GPU (benchmarks/methods_step.py --scale full):
# SDXL in fp16 (UNet, + FaceID, + InstantID, + PuLID v1.1, CFG batch 2, 1024 px), then FLUX.1-dev in bf16
# (transformer, + PuLID-FLUX, + InfiniteYou, batch 1, 1024 px). Random weights, nothing downloaded.
# Needs about 35 GB of GPU memory (FLUX.1 11.9B + InfuseNet 3.0B + PuLID-FLUX 0.6B in bf16); each run has 5 minutes and is
# expected to take 1-2 (building the models on the GPU, 3 warm-up steps, 3 rounds of 5 timed steps per row).
#
#   benchmarks/methods_step_gpu.sh [OUTDIR]      # OUTDIR: default $OUT if set, else benchmarks/results
#
# Writes OUTDIR/gpu.txt (nvidia-smi), OUTDIR/methods_step_{sdxl_fp16,flux_bf16}.{txt,json}; exit status 1
# if a run failed (the other still runs). Paste the tables into benchmarks/README.md with the GPU and date.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
python="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
status=0
for run in "sdxl fp16" "flux bf16"; do
    set -- $run
    name="methods_step_$1_$2"
    echo "== $name"
    timeout 300 "$python" benchmarks/methods_step.py --device cuda --scale full --families "$1" --dtype "$2" \
        --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
done
exit $status
