#!/usr/bin/env bash
# The end-to-end POCL demo on 2 CPU ranks (see launch/demo.py):
#   bash launch/demo.sh [--data PATH] [--output DIR] [--quick] [--seeds 10 20 ...]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
started=$SECONDS
# No --bind_cores_to_rank: it made DeepSpeed rebuild its cached shm op (minutes on 2 cores)
# each time runs with and without it alternated.
deepspeed --num_gpus "${POCL_DEMO_RANKS:-2}" launch/demo.py "$@"
echo "[pocl_ds] demo finished in $((SECONDS - started)) s (bash launch/demo.sh, setup excluded)"
