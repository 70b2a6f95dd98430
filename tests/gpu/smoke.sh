#!/usr/bin/env bash
# GPU smoke test for a real NVIDIA node (not run in CI: CI machines have no GPU).
#
# Starts a CUDA workload (PyTorch matmul loop if `torch` imports with CUDA, else nothing and the
# check is of the idle device only) inside its own cgroup as a systemd-unit-shaped workload, runs
# the built agent against the real libnvidia-ml, and compares what the agent attributes with what
# nvidia-smi reports for the same processes: per-process GPU memory, per-process SM utilization,
# and that the workload's GPU seconds grow at the rate its utilization says.
#
#   sudo tests/gpu/smoke.sh                 # builds target/release/tally
#   sudo TALLY_BIN=path/to/tally SECONDS_TO_RUN=30 tests/gpu/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

run_for="${SECONDS_TO_RUN:-20}"
port="${TALLY_PORT:-19811}"
command -v nvidia-smi >/dev/null || { echo "smoke: nvidia-smi not found: not a GPU node" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "smoke: run as root (cgroups, eBPF)" >&2; exit 2; }

bin="${TALLY_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release -p tally-agent >&2
  bin=target/release/tally
fi

root=/sys/fs/cgroup
[[ -f $root/cgroup.controllers ]] || root=/sys/fs/cgroup/unified
unit="tally-gpu-smoke-$$.service"
cg="$root/system.slice/$unit"
mkdir -p "$cg"
work=$(mktemp -d)
cleanup() {
  [[ -n "${agent_pid:-}" ]] && kill "$agent_pid" 2>/dev/null || true
  for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.5; rmdir "$cg" 2>/dev/null || true; rm -rf "$work"
}
trap cleanup EXIT

if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  cat >"$work/load.py" <<'PY'
import time, torch
a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
end = time.time() + 3600
while time.time() < end:
    for _ in range(20): c = a @ b
    torch.cuda.synchronize(); time.sleep(0.05)   # ~ not 100%: leaves room to see a real share
PY
  sh -c "echo \$\$ > $cg/cgroup.procs; exec python3 $work/load.py" &
  load_pid=$!
  echo "smoke: PyTorch load pid $load_pid in $cg"
else
  load_pid=""
  echo "smoke: no CUDA PyTorch here: checking the idle device only"
fi

cat >"$work/tally.toml" <<TOML
[agent]
listen = "127.0.0.1:$port"
tick_interval_ms = 1000
[cri]
endpoints = []
TOML
"$bin" agent --config "$work/tally.toml" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
sleep 3
first=$(curl -s "127.0.0.1:$port/metrics")
sleep "$run_for"
last=$(curl -s "127.0.0.1:$port/metrics")

metric() { grep -E "^$1\{[^}]*$2" <<<"$3" | awk '{s+=$NF} END {printf "%.3f", s+0}'; }
echo
echo "== nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,utilization.gpu,memory.used,power.draw --format=csv
nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
nvidia-smi pmon -c 1 -s u || true
echo
echo "== agent"
grep -E '^tally_gpu_(up|info|utilization_ratio|memory_used_bytes|power_watts|nvml_calls_per_gpu) ' <<<"$last" || true
grep -E '^tally_gpu_(up|info|utilization_ratio|memory_used_bytes|power_watts|nvml_calls_per_gpu)\{' <<<"$last" || true
grep -E "^tally_workload_gpu_[a-z_]+\{[^}]*unit=\"$unit\"" <<<"$last" || echo "(no per-workload GPU series for $unit)"
grep -E '^tally_gpu_(nvml_errors_total|xid_errors_total)' <<<"$last" || true

status=0
if [[ -n "$load_pid" ]]; then
  echo
  echo "== comparison for pid $load_pid ($unit)"
  smi_mib=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p="$load_pid" '$1==p {print $2}')
  agent_bytes=$(metric tally_workload_gpu_memory_bytes "unit=\"$unit\"" "$last")
  echo "memory: nvidia-smi ${smi_mib:-?} MiB, agent $(awk -v b="$agent_bytes" 'BEGIN {printf "%.0f", b/1048576}') MiB"
  s0=$(metric tally_workload_gpu_seconds_total "unit=\"$unit\"" "$first")
  s1=$(metric tally_workload_gpu_seconds_total "unit=\"$unit\"" "$last")
  rate=$(awk -v a="$s0" -v b="$s1" -v t="$run_for" 'BEGIN {printf "%.2f", (b-a)/t}')
  sm=$(nvidia-smi pmon -c 3 -s u | awk -v p="$load_pid" '$2==p && $4 ~ /^[0-9]+$/ {s+=$4; n++} END {if (n) printf "%.0f", s/n; else print "?"}')
  echo "busy: agent $rate GPU-seconds per second (≈ SM share), nvidia-smi pmon sm ${sm}%"
  if [[ -n "$smi_mib" ]]; then
    awk -v a="$agent_bytes" -v m="$smi_mib" 'BEGIN {d=a/1048576-m; if (d<0) d=-d; exit !(d <= 0.05*m + 64)}' ||
      { echo "smoke: MEMORY MISMATCH" >&2; status=1; }
  fi
  awk -v r="$rate" 'BEGIN {exit !(r > 0.05)}' || { echo "smoke: NO GPU SECONDS ATTRIBUTED" >&2; status=1; }
fi
echo
[[ $status -eq 0 ]] && echo "smoke: ok" || echo "smoke: FAILED (agent log: $work/agent.log)"
exit $status
