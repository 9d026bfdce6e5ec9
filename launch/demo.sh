#!/usr/bin/env bash
# The end-to-end POCL demo on 2 CPU ranks (see launch/demo.py):
#   bash launch/demo.sh [--data PATH] [--output DIR] [--quick] [--seeds 10 20 ...]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
started=$SECONDS
# One core per rank keeps the two ranks off each other's cores (needs Debian's numactl).
bind=()
if command -v numactl >/dev/null 2>&1; then
  bind=(--bind_cores_to_rank)
fi
deepspeed --num_gpus "${POCL_DEMO_RANKS:-2}" ${bind[@]+"${bind[@]}"} launch/demo.py "$@"
echo "[pocl_ds] demo finished in $((SECONDS - started)) s (bash launch/demo.sh, setup excluded)"
