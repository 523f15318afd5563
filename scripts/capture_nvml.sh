#!/usr/bin/env bash
# Record one minute of real NVML samples with the host agent, as test data for
# tests/test_agent_real_capture.py (which replays it through the GPU detectors).
#
# Run on a machine with an NVIDIA GPU and driver, from the repository root:
#     scripts/capture_nvml.sh            # 60 cycles at 1 s
#     SECONDS_TO_CAPTURE=120 scripts/capture_nvml.sh
# It loads the GPU for part of the minute (PyTorch or CuPy when installed; otherwise the GPU is
# captured as it is), writes tests/data/nvml_capture_<gpu>_<date>.jsonl.gz and prints a summary.
# Nothing is sent anywhere: the agent writes to the file only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
N=${SECONDS_TO_CAPTURE:-60}
nvidia-smi -L || { echo "no NVIDIA GPU visible (nvidia-smi -L failed)" >&2; exit 1; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
out="tests/data/nvml_capture_${gpu}_$(date -u +%Y%m%dT%H%M%SZ).jsonl"
mkdir -p tests/data

# A background GPU load for the middle third of the capture, so the data holds idle and busy samples.
load() {
  sleep $((N / 3))
  timeout $((N / 3)) "$PY" - <<'PYEOF' || true
import time
try:
    import torch
    a = torch.randn(8192, 8192, device="cuda")
    while True:
        a = a @ a
        a = a / a.norm()
        torch.cuda.synchronize()
except ImportError:
    try:
        import cupy as cp
        a = cp.random.rand(8192, 8192, dtype=cp.float32)
        while True:
            a = a @ a
            a = a / cp.linalg.norm(a)
            cp.cuda.Device().synchronize()
    except ImportError:
        print("no torch or cupy: capturing the GPU as it is")
        time.sleep(3600)
PYEOF
}
load &
loader=$!
GPUSENTRY_AGENT__COLLECTORS='["gpu"]' GPUSENTRY_AGENT__SPOOL_DIR="$(mktemp -d)" \
  "$PY" -m gpusentry.cli agent --output "jsonl:$out" --interval 1 --cycles "$N" --host-name capture-host
kill "$loader" 2>/dev/null || true
wait "$loader" 2>/dev/null || true
gzip -f "$out"
"$PY" - "$out.gz" <<'PYEOF'
import gzip, json, sys
events = [json.loads(line) for line in gzip.open(sys.argv[1])]
gpus = sorted({e["gpu"]["uuid"] for e in events})
busy = sum(1 for e in events if (e["gpu"]["utilization"]["gpu_pct"] or 0) > 50)
print(f"{sys.argv[1]}: {len(events)} samples of {len(gpus)} GPU(s), {busy} busy (>50 %)")
nulls = sorted({k for e in events for k, v in e["gpu"].items() if v is None})
print("fields this GPU does not report:", ", ".join(nulls) or "none")
PYEOF
echo "commit $out.gz; tests/test_agent_real_capture.py replays it"
