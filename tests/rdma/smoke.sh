#!/usr/bin/env bash
# RDMA smoke test for a real RDMA node (not run in CI: CI machines have no RDMA hardware).
#
# Runs ib_write_bw over one device's port (server and client on this node, each in a cgroup of
# its own), runs the built agent with QP counter auto mode allowed, and compares with what the
# kernel reports through the `rdma` tool and sysfs: the port's byte rate, each process's byte
# rate from its QP counter, the pids of `rdma resource show qp`, and that auto mode is back to
# what it was after the agent stops. See tests/rdma/README.md.
#
#   sudo tests/rdma/smoke.sh                      # first ACTIVE port; builds target/release/tally
#   sudo DEVICE=mlx5_0 PORT=1 TALLY_BIN=path/to/tally tests/rdma/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in rdma ib_write_bw python3 curl; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool not found" >&2; exit 2; }
done
[[ $(id -u) -eq 0 ]] || { echo "smoke: run as root (cgroups, RDMA netlink)" >&2; exit 2; }

device="${DEVICE:-}"
port="${PORT:-1}"
if [[ -z "$device" ]]; then
  read -r device port < <(rdma -j link show | python3 -c 'import json,sys
links=[l for l in json.load(sys.stdin) if l.get("state")=="ACTIVE"]
print(*((links[0]["ifname"], links[0]["port"]) if links else ("", "")))') || true
  [[ -n "$device" ]] || { echo "smoke: no ACTIVE RDMA port" >&2; exit 2; }
fi
http="${TALLY_PORT:-19811}"
bin="${TALLY_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release -p tally-agent >&2
  bin=target/release/tally
fi

mode_before=$(rdma statistic qp mode link "$device/$port")
echo "smoke: $device/$port, mode before: $mode_before"

root=/sys/fs/cgroup
[[ -f $root/cgroup.controllers ]] || root=/sys/fs/cgroup/unified
work=$(mktemp -d)
cleanup() {
  [[ -n "${agent_pid:-}" ]] && kill "$agent_pid" 2>/dev/null || true
  for u in srv cli; do
    cg="$root/system.slice/tally-rdma-smoke-$u-$$.service"
    for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    sleep 0.3; rmdir "$cg" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

run_in() { # unit-tag command...
  local cg="$root/system.slice/tally-rdma-smoke-$1-$$.service"; shift
  mkdir -p "$cg"
  sh -c "echo \$\$ > $cg/cgroup.procs; exec $*" >"$work/$(basename "$cg").log" 2>&1 &
}

cat >"$work/tally.toml" <<TOML
[agent]
listen = "127.0.0.1:$http"
tick_interval_ms = 1000
[cri]
endpoints = []
[rdma]
allow_qp_counter_auto_mode = true
qp_optional_counters = true
TOML
"$bin" check --config "$work/tally.toml" | grep -E '^rdma ' || true
"$bin" agent --config "$work/tally.toml" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$http/readyz" >/dev/null && break; sleep 0.2; done
echo "smoke: mode with the agent: $(rdma statistic qp mode link "$device/$port")"

run_in srv ib_write_bw -d "$device" -i "$port" -D 40 -p 18515
sleep 1
run_in cli ib_write_bw -d "$device" -i "$port" -D 40 -p 18515 localhost
sleep 5

snapshot() { # -> JSON: port bytes, per-pid tx bytes (rdma tool), per-unit tx bytes (agent)
  local metrics; metrics=$(curl -s "127.0.0.1:$http/metrics")
  rdma -j statistic qp show link "$device/$port" >"$work/stat.json"
  rdma -j resource show qp link "$device/$port" >"$work/qp.json"
  DEVICE="$device" PORT="$port" ROOT="$root" METRICS="$metrics" python3 - "$work" <<'PY'
import json, os, re, sys
work = sys.argv[1]
dev, port, root = os.environ["DEVICE"], os.environ["PORT"], os.environ["ROOT"]
xmit = int(open(f"/sys/class/infiniband/{dev}/ports/{port}/counters/port_xmit_data").read()) * 4
def unit_of(pid):
    try:
        for line in open(f"/proc/{pid}/cgroup"):
            m = re.search(r"(tally-rdma-smoke-\w+-\d+\.service)", line)
            if m: return m.group(1)
    except OSError: pass
    return None
tool = {}
for c in json.load(open(f"{work}/stat.json")):
    u = unit_of(c.get("pid", 0))
    if u: tool[u] = tool.get(u, 0) + int(c.get("rdma_tx_bytes", 0))
qp_pids = sorted({q["pid"] for q in json.load(open(f"{work}/qp.json")) if "pid" in q})
agent, port_metric = {}, None
for line in os.environ["METRICS"].splitlines():
    m = re.match(r'tally_workload_rdma_transmit_bytes_total\{.*unit="([^"]+)".*device="%s",port="%s",method="qp_counter"\} (\S+)' % (dev, port), line)
    if m: agent[m.group(1)] = agent.get(m.group(1), 0) + float(m.group(2))
    m = re.match(r'tally_rdma_port_transmit_bytes_total\{device="%s",port="%s"\} (\S+)' % (dev, port), line)
    if m: port_metric = float(m.group(1))
print(json.dumps({"sysfs": xmit, "port_metric": port_metric, "tool": tool, "agent": agent, "qp_pids": qp_pids}))
PY
}
a=$(snapshot); sleep 10; b=$(snapshot)
verdict=$(A="$a" B="$b" python3 - <<'PY'
import json, os
a, b = json.loads(os.environ["A"]), json.loads(os.environ["B"])
ok = True
def rate_close(name, x, y, tolerance=0.10):
    global ok
    good = y > 0 and abs(x - y) <= tolerance * y
    print(f"smoke: {name}: agent {x/10/1e9:.3f} GB/s, kernel {y/10/1e9:.3f} GB/s {'ok' if good else 'MISMATCH'}")
    ok &= good
rate_close("port", b["port_metric"] - a["port_metric"], b["sysfs"] - a["sysfs"])
if not b["tool"]:
    print("smoke: the QP counters hold no rdma_tx_bytes: enable the optional counters (README)")
    ok = False
for unit in sorted(b["tool"]):
    rate_close(unit, b["agent"].get(unit, 0) - a["agent"].get(unit, 0), b["tool"][unit] - a["tool"].get(unit, 0))
print(f"smoke: QP pids (rdma resource show qp): {b['qp_pids']}")
print("PASS" if ok else "FAIL")
PY
)
echo "$verdict"
kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=""
mode_after=$(rdma statistic qp mode link "$device/$port")
echo "smoke: mode after the agent stopped: $mode_after"
if [[ "$mode_after" != "$mode_before" ]]; then
  echo "smoke: FAIL: auto mode not restored"; exit 1
fi
[[ "$verdict" == *PASS ]] || { cat "$work/agent.log" >&2; exit 1; }
