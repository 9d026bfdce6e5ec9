#!/usr/bin/env bash
# The GPU check of issue 14, at most 8 minutes on a machine with one NVIDIA GPU:
#   1. the fused kernel against naive, Liger's chunked JSD (when importable) and the matmul
#      floor, bf16, N=8192 H=4096 V=128256: time, peak CUDA memory, ratio to the floor;
#   2. a few KD steps of the large-vocabulary pair (Llama-3.2-1B-shaped teacher, ZeRO-3,
#      -> Llama-3-shaped 149M student, ZeRO-2) on the GPU, fused and naive: tokens/s, peak
#      memory, and launch/plan.py's prediction for it;
#   3. the test files that have GPU paths.
# Writes OUT/gpu_check.csv (one row per measurement) and OUT/gpu_check.md.
#
#   bash launch/gpu_check.sh [OUT]          OUT defaults to benchmarks/gpu_check
#   POCL_SKIP_SETUP=1 bash launch/gpu_check.sh   use the active Python as it is (no pip)
#
# Exits 3 at once, before installing anything, when there is no CUDA GPU.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/benchmarks/gpu_check}
BUDGET_S=480
no_gpu() {
  echo "gpu_check: no CUDA GPU: $1. This script needs one NVIDIA GPU; nothing was installed or run." >&2
  exit 3
}

# 1. The CUDA check comes first: nothing slow happens on a machine without a GPU.
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
[ -n "$GPU" ] || no_gpu "nvidia-smi lists no device"

# 2. Environment: an existing Python with CUDA torch + DeepSpeed is used as it is; otherwise
#    launch/env.sh makes one (needs the package index).
PY=${POCL_PYTHON:-python3}
if [ "${POCL_SKIP_SETUP:-0}" != 1 ] && ! "$PY" -c "import torch, deepspeed, transformers, pytest" 2>/dev/null; then
  # shellcheck source=/dev/null
  POCL_EXTRAS=${POCL_EXTRAS:-dev} source "$ROOT/launch/env.sh" || { echo "gpu_check: setup failed" >&2; exit 1; }
  PY=python
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || no_gpu "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) sees no CUDA device ($GPU)"
if ! "$PY" -c "import liger_kernel.chunked_loss" 2>/dev/null; then
  timeout 60 "$PY" -m pip install -q --no-deps liger-kernel >/dev/null 2>&1 \
    || echo "gpu_check: liger-kernel not installable here; its rows are skipped" >&2
fi

cd "$ROOT" || exit 1
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
left() { echo $((BUDGET_S - SECONDS)); }
STATUS=0
step() {  # step NAME SECONDS COMMAND...: run within the budget that is left, log to OUT
  local name=$1 limit=$2
  shift 2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -le 10 ]; then
    echo "$name: skipped (time budget spent)" | tee "$OUT/$name.log"
    return
  fi
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || STATUS=1
}

step kernel 150 "$PY" launch/bench.py kernel --device cuda --dtype bf16 --n 8192 --hidden 4096 \
  --vocab 128256 --kinds jsd --impls floor naive fused liger --repeats 5 --output-dir "$OUT"
step kd_steps 210 "$PY" launch/bench.py scale --ranks 1 --steps 4 --micro-batch 4 --seq-len 1024 \
  --cases llama3-1b-z2 llama3-1b-z2-naive --output-dir "$OUT"
mapfile -t GPU_TESTS < <(grep -l "cuda" tests/test_*.py 2>/dev/null)
if [ ${#GPU_TESTS[@]} -gt 0 ]; then
  step gpu_tests 100 "$PY" -m pytest -q -x "${GPU_TESTS[@]}"
else
  echo "gpu_tests: no test file has a GPU path" | tee "$OUT/gpu_tests.log"
fi

"$PY" - "$OUT" "$GPU" <<'EOF'
import csv, datetime, sys
from pathlib import Path

out, gpu = Path(sys.argv[1]), sys.argv[2]
rows = []
def read(name):
    path = out / name
    return list(csv.DictReader(path.open())) if path.is_file() else []
for r in read("kernel.csv"):
    for metric in ("median_s", "floor_s", "peak_extra_mb"):
        rows.append(("kernel", f"{r['impl']} N={r['n']} H={r['hidden']} V={r['vocab']} {r['dtype']}", metric, r[metric] or r["status"]))
    if r["median_s"] and r["floor_s"]:
        rows.append(("kernel", f"{r['impl']} N={r['n']}", "x_floor", f"{float(r['median_s']) / float(r['floor_s']):.2f}"))
for r in read("scale.csv"):
    for metric in ("tokens_per_s", "step_s", "step1_peak_rank0_mb", "later_peak_mb", "predicted_mb", "prediction_error", "status"):
        rows.append(("kd_steps", f"{r['case']} T={r['seq_len']} B={r['micro_batch']}", metric, r[metric]))
tests = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:] if (out / "gpu_tests.log").is_file() else ["not run"]
rows.append(("tests", "gpu test files", "result", tests[0] if tests else ""))
stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
with (out / "gpu_check.csv").open("w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["timestamp", "device", "check", "case", "metric", "value"])
    writer.writerows([stamp, gpu, *row] for row in rows)
lines = [f"GPU check, {gpu}, {stamp}", "", "| check | case | metric | value |", "|---|---|---|---|"]
lines += [f"| {c} | {n} | {m} | {v} |" for c, n, m, v in rows]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check: wrote $OUT/gpu_check.csv and $OUT/gpu_check.md in ${SECONDS}s"
exit $STATUS
