#!/usr/bin/env bash
# One GPU check for a lent H100/H200, sized for one 10-minute call; everything goes to one log.
#
#   bash benchmarks/gpu_check.sh [LOG]        # from the repository root; LOG defaults to $OUT/gpu_check.log
#   DRY_RUN=1 bash benchmarks/gpu_check.sh    # the same script on a CPU: every python piece with --dry-run
#
# Sections, each under its own time limit (about 9 minutes in all, so that one stuck section cannot take the
# others' time): versions and device; `pytest -m gpu` with a result per test; the GPU step benchmark (ms/step,
# tokens/s, useful-FLOP MFU with the peak of the exact device model, peak memory per attention variant); GPU
# fbank clips/s at 1 and 16 shifts and its max difference from the CPU path, near silence too; host syncs per
# optimizer step and micro-step; compiled vs eager ms/step with the graph (recompile) count.
#
# Environment: PYTHON (default: python), DRY_RUN=1, and per-section limits T_PYTEST, T_STEP, T_FBANK, T_TRAIN
# (seconds). The package is imported as flexast.* from this checkout (a shim in a temp folder), never an install.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${1:-${OUT:-.}/gpu_check.log}
MODE=--gpu-only
if [ "${DRY_RUN:-0}" = 1 ]; then MODE=--dry-run; fi

# flexast.* must be this checkout's folders, whatever is installed: a shim of symlinks, first on the path
SHIM=$(mktemp -d)
mkdir -p "$SHIM/flexast"
for pkg in pipeline model configs; do ln -s "$PWD/$pkg" "$SHIM/flexast/$pkg"; done
export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"

section() { printf '\n=== %s (%s UTC)\n' "$1" "$(date -u +%H:%M:%S)"; }
limited() {  # limited SECONDS command...: run it, say how it ended
    local limit=$1
    shift
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "[TIMED OUT after ${limit}s]"; else echo "[exit $rc]"; fi
}

{
    section "versions and device"
    "$PY" - <<'EOF'
import platform, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {platform.platform()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {torch.cuda.get_device_name(i)!r}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
              f"{p.multi_processor_count} SMs")
else:
    print("no CUDA device")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (flex attention and Inductor need it)")
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"

    section "pytest -m gpu (a result per test)"
    limited "${T_PYTEST:-170}" "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider --no-header tests

    section "GPU step benchmark (ms/step, tokens/s, useful-FLOP MFU, peak memory per variant)"
    limited "${T_STEP:-130}" "$PY" benchmarks/step.py "$MODE"

    section "GPU fbank (clips/s at 1 and 16 shifts, max difference from the CPU path)"
    limited "${T_FBANK:-60}" "$PY" benchmarks/featurize.py "$MODE"

    section "training step: host syncs per step, compiled vs eager ms/step, graphs compiled"
    limited "${T_TRAIN:-170}" "$PY" benchmarks/gpu_train.py $([ "$MODE" = --dry-run ] && echo --dry-run)

    section "done"
} 2>&1 | tee "$LOG"
