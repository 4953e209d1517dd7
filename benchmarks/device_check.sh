#!/usr/bin/env bash
# Device check on a real NVIDIA GPU (issue 13), under 5 minutes:
#   1. the inventory: nvidia-smi, and the portal's own NVML walk (whole GPUs, MIG instances);
#   2. the sampler (spawners/telemetry.py NvmlSource) on the granted devices while a small
#      torch load runs on CUDA (matrix products for LOAD_SECONDS), then idle;
#   3. prints utilisation, power and the energy counter's increase, busy and idle, and
#      checks that the busy phase reads busy and the energy counter moved.
# It fails at once, saying why, on a machine without an NVIDIA GPU, NVML or CUDA torch.
#
#   PYTHON=.venv/bin/python LOAD_SECONDS=30 benchmarks/device_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOAD_SECONDS="${LOAD_SECONDS:-30}"
IDLE_SECONDS="${IDLE_SECONDS:-10}"

fail() { echo "device_check: FAILED: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this machine has no NVIDIA driver (run it on a GPU node)"
nvidia-smi -L || fail "nvidia-smi found no GPU"
echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,uuid,mig.mode.current,power.draw,memory.used --format=csv || true


"$PYTHON" - "$LOAD_SECONDS" "$IDLE_SECONDS" <<'EOF'
import importlib
import os
import sys
import threading
import time

load_s, idle_s = float(sys.argv[1]), float(sys.argv[2])


def fail(msg: str) -> None:
    print(f"device_check: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    import pynvml  # noqa: F401
except ImportError:
    fail("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
try:
    import torch
except ImportError:
    fail("torch is not installed (a CUDA build is needed)")
if not torch.cuda.is_available():
    fail(f"torch {torch.__version__} sees no CUDA device")

# the package under test: sovereign_portal (installed) or this checkout
try:
    tel = importlib.import_module("sovereign_portal.spawners.telemetry")
    inv = importlib.import_module("sovereign_portal.spawners.inventory")
except ImportError:
    sys.path.insert(0, os.getcwd())
    import types

    pkg = types.ModuleType("sovereign_portal")
    pkg.__path__ = [os.getcwd()]
    sys.modules["sovereign_portal"] = pkg
    try:
        tel = importlib.import_module("sovereign_portal.spawners.telemetry")
        inv = importlib.import_module("sovereign_portal.spawners.inventory")
    except ImportError as e:
        fail(f"the portal's package does not import ({e}): pip install -e . first")

print("== inventory (the portal's NVML walk)")
devices = inv.nvml_devices()
if not devices:
    fail("the portal's NVML walk found no device")
for d in devices:
    print(f"  {d}")

visible = os.environ.get("CUDA_VISIBLE_DEVICES")
src = tel.source_for("nvml", env={"CUDA_VISIBLE_DEVICES": visible} if visible else {})
print(f"== sampler: source {src.name}, measured={src.measured}, {len(src.handles)} device(s)")


def load(stop: threading.Event) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    while not stop.is_set():
        for _ in range(20):
            a = (a @ b).clamp_(-1, 1)
        torch.cuda.synchronize()


def phase(name: str, seconds: float) -> tuple[float, float, float]:
    first = src.read()
    t0 = time.time()
    utils, powers = [], []
    while time.time() - t0 < seconds:
        time.sleep(0.5)
        s = src.read()
        utils.append(max(d.utilization_pct for d in s))
        powers.append(sum(d.power_w or 0 for d in s))
    last = src.read()
    dt = last[0].at - first[0].at
    wh = sum(
        (b.energy_mj - a.energy_mj) / 3.6e6
        for a, b in zip(first, last)
        if a.energy_mj is not None and b.energy_mj is not None
    )
    mean_u = sum(utils) / len(utils)
    mean_p = sum(powers) / len(powers)
    print(
        f"  {name:5s} {dt:5.1f} s  utilisation mean {mean_u:5.1f} % max {max(utils):5.1f} %"
        f"  power mean {mean_p:6.1f} W  energy {wh:8.4f} Wh"
        f" (= {wh * 3600 / dt if dt else 0:6.1f} W average)"
    )
    for d in last:
        print(
            f"        device {d.index} {d.uuid}: {d.memory_used_mib:8.0f} MiB used,"
            f" shared={d.shared}"
        )
    return mean_u, mean_p, wh


stop = threading.Event()
worker = threading.Thread(target=load, args=(stop,), daemon=True)
worker.start()
time.sleep(3)  # the load is running
busy = phase("busy", load_s)
stop.set()
worker.join(30)
torch.cuda.empty_cache()
time.sleep(2)
idle = phase("idle", idle_s)
src.close()

problems = []
if busy[0] < 50:
    problems.append(f"the busy phase read {busy[0]:.1f} % utilisation (expected > 50 %)")
if busy[2] <= 0:
    problems.append("the energy counter did not move under load")
if idle[0] > busy[0]:
    problems.append("idle read busier than busy")
if problems:
    fail("; ".join(problems))
print("device_check: OK")
EOF
