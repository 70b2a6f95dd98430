#!/usr/bin/env bash
# Where the agent's tick spends its time at N live Kubernetes-shaped workloads (default 1,000).
#
#   sudo bench/tick_cost.sh                     # builds target/release/tally first
#   sudo TALLY_BIN=/path/to/tally bench/tick_cost.sh
#
# It creates N workloads the way foundation.sh does (a besteffort pod slice with one
# cri-containerd scope each, in cgroup2 and, on hybrid nodes, the v1 cpuacct, memory and blkio
# hierarchies, one `sleep` moved in), starts a fresh agent (1 s tick, no CRI), waits until it sees
# them all, and then measures three windows one after the other, nobody scraping:
#
#   1. untraced: CPU (utime+stime), read/write syscall counts from /proc/<pid>/io (syscr,
#      syscw), and the tick duration the agent reports (tally_tick_duration_seconds, sampled
#      once a second);
#   2. perf: `perf record -e cpu-clock -F 999 --call-graph dwarf -p PID`, reported as self time
#      by symbol (kernel and agent), by shared object, and as inclusive time (children);
#   3. strace: `strace -c -f -p PID`, syscall counts and time by type, turned into calls per tick
#      and per workload per tick (strace slows the agent down: read its counts, not its times).
#
# Knobs: TALLY_BIN, BENCH_N (1000), BENCH_WINDOW_S (30), BENCH_TICK_MS (1000),
# BENCH_RESULTS_DIR (bench/results), PERF (perf).
# BENCH_TALLY_CONFIG: TOML appended to the agent's configuration (its own sections, e.g.
# $'[cgroupfs]\nread_interval_ms = 5000').

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

N=${BENCH_N:-1000}
WINDOW_S=${BENCH_WINDOW_S:-30}
TICK_MS=${BENCH_TICK_MS:-1000}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$SCRIPT_DIR/results}
PERF=${PERF:-perf}
EXTRA_CONFIG=${BENCH_TALLY_CONFIG:-}
CGROUP_ROOT=/sys/fs/cgroup

UID_PREFIX=bec4be4e
RUN_ID=$(printf '%04x' $((RANDOM % 65536)))
QOS_REL=kubepods.slice/kubepods-besteffort.slice

log() { printf '[tick-cost] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

WORKDIR=""
AGENT_PID=""
TRACER_PID=""
SLEEP_PIDS=()
POD_RELS=()
CONTAINER_RELS=()
CREATED_PARENTS=()
ROOTS=()

stop_pid() {
    local pid=$1 sig=${2:-TERM} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# rmdir_all, pick_port, wrk_pct_ms.
source "$SCRIPT_DIR/lib.sh"

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $TRACER_PID ]] && stop_pid "$TRACER_PID" INT
    [[ -n $AGENT_PID ]] && stop_pid "$AGENT_PID"
    if ((${#SLEEP_PIDS[@]} > 0)); then
        kill -KILL "${SLEEP_PIDS[@]}" 2>/dev/null
        wait "${SLEEP_PIDS[@]}" 2>/dev/null
    fi
    local root rel dirs
    for root in "${ROOTS[@]}"; do
        dirs=()
        for rel in "${CONTAINER_RELS[@]}"; do dirs+=("$root/$rel"); done
        for rel in "${POD_RELS[@]}"; do dirs+=("$root/$rel"); done
        rmdir_all "${dirs[@]}"
    done
    local i
    for ((i = ${#CREATED_PARENTS[@]} - 1; i >= 0; i--)); do
        rmdir -- "${CREATED_PARENTS[i]}" 2>/dev/null
    done
    [[ -n $WORKDIR ]] && rm -rf -- "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $EUID -eq 0 ]] || die "must run as root"
for c in curl strace "$PERF"; do
    command -v "$c" >/dev/null 2>&1 || die "$c is required (apt-get install curl strace linux-perf)"
done

if [[ -n ${TALLY_BIN:-} ]]; then
    BIN=$TALLY_BIN
else
    command -v cargo >/dev/null 2>&1 || die "cargo not found: pass TALLY_BIN=target/release/tally"
    log "building release agent (cargo build --release -p tally-agent)"
    (cd "$REPO_ROOT" && cargo build --release -p tally-agent)
    BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/tally
fi
[[ -x $BIN ]] || die "agent binary $BIN is not executable"
CLK_TCK=$(getconf CLK_TCK)

if [[ -f $CGROUP_ROOT/cgroup.controllers ]]; then
    MODE=v2
    ROOTS=("$CGROUP_ROOT")
else
    [[ -f $CGROUP_ROOT/unified/cgroup.controllers ]] || die "no cgroup2 hierarchy under $CGROUP_ROOT"
    MODE=hybrid
    ROOTS=("$CGROUP_ROOT/unified")
    for c in cpuacct cpu,cpuacct cpuacct,cpu; do
        if [[ -f $CGROUP_ROOT/$c/cgroup.procs ]]; then
            ROOTS+=("$CGROUP_ROOT/$c")
            break
        fi
    done
    [[ -f $CGROUP_ROOT/memory/cgroup.procs ]] && ROOTS+=("$CGROUP_ROOT/memory")
    [[ -f $CGROUP_ROOT/blkio/cgroup.procs ]] && ROOTS+=("$CGROUP_ROOT/blkio")
fi

WORKDIR=$(mktemp -d /tmp/tally-tickcost.XXXXXX)

for root in "${ROOTS[@]}"; do
    for parent in "$root/kubepods.slice" "$root/$QOS_REL"; do
        [[ -d $parent ]] || CREATED_PARENTS+=("$parent")
    done
done
ordered=()
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] && ordered+=("$p"); done
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] || ordered+=("$p"); done
CREATED_PARENTS=("${ordered[@]}")

log "creating $N workloads"
for ((i = 0; i < N; i++)); do
    idx=$(printf '%012x' "$i")
    pod="$QOS_REL/kubepods-besteffort-pod${UID_PREFIX}_${RUN_ID}_4000_8000_${idx}.slice"
    ctr="$pod/cri-containerd-$(printf '%s%04x%052x' "$UID_PREFIX" $((16#$RUN_ID)) "$i").scope"
    dirs=()
    for root in "${ROOTS[@]}"; do dirs+=("$root/$ctr"); done
    POD_RELS+=("$pod")
    CONTAINER_RELS+=("$ctr")
    mkdir -p -- "${dirs[@]}"
    sleep 100000 </dev/null >/dev/null 2>&1 &
    pid=$!
    SLEEP_PIDS+=("$pid")
    for d in "${dirs[@]}"; do echo "$pid" >"$d/cgroup.procs"; done
done

port=$((20000 + RANDOM % 30000))
URL=http://127.0.0.1:$port
cat >"$WORKDIR/tally.toml" <<EOF
[agent]
listen = "127.0.0.1:$port"
tick_interval_ms = $TICK_MS
[cri]
endpoints = []
$EXTRA_CONFIG
EOF
"$BIN" agent --config "$WORKDIR/tally.toml" >"$WORKDIR/agent.log" 2>&1 &
AGENT_PID=$!
log "agent pid $AGENT_PID on $URL"

metric() { # name (with labels) → value, from one scrape (awk reads it all: pipefail)
    curl -sf --max-time 5 "$URL/metrics" | awk -v p="$1" 'index($0, p " ") == 1 && !done { print $2; done = 1 }'
}
deadline=$((SECONDS + 120))
while :; do
    kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited: $(tail -20 "$WORKDIR/agent.log")"
    running=$(metric 'tally_workloads{state="running"}' 2>/dev/null || true)
    running=${running%.*}
    ((${running:-0} >= N)) && break
    ((SECONDS < deadline)) || die "agent sees ${running:-0} running workloads, want >= $N"
    sleep 0.5
done
log "agent sees $running running workloads"
sleep 3

# ------------------------------------------------ 1. untraced
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    local -a f
    read -ra f <<<"$s"
    echo $((f[11] + f[12]))
}
io_field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/io"; }

log "window 1: untraced, ${WINDOW_S} s"
t0=$(date +%s.%N) c0=$(cpu_ticks "$AGENT_PID") r0=$(io_field "$AGENT_PID" syscr) w0=$(io_field "$AGENT_PID" syscw)
k0=$(metric tally_ticks_total)
ticks_ms=()
for ((i = 0; i < WINDOW_S; i++)); do
    sleep 1
    v=$(metric tally_tick_duration_seconds)
    ticks_ms+=("$(awk -v v="$v" 'BEGIN { printf "%.2f", v * 1000 }')")
done
t1=$(date +%s.%N) c1=$(cpu_ticks "$AGENT_PID") r1=$(io_field "$AGENT_PID" syscr) w1=$(io_field "$AGENT_PID" syscw)
k1=$(metric tally_ticks_total)
ticks=$(awk -v a="$k0" -v b="$k1" 'BEGIN { printf "%d", b - a }')
cpu_pct=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", d / hz / (b - a) * 100 }')
tick_stats=$(printf '%s\n' "${ticks_ms[@]}" | sort -n | awk '{ v[NR] = $1; s += $1 } END { printf "mean %.2f ms, median %.2f ms, min %.2f ms, max %.2f ms (n=%d)", s / NR, v[int((NR + 1) / 2)], v[1], v[NR], NR }')
cpu_per_tick_ms=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v k="$ticks" 'BEGIN { if (k > 0) printf "%.1f", d / hz / k * 1000; else print "n/a" }')
log "  CPU $cpu_pct% of a core, $ticks ticks, $cpu_per_tick_ms ms CPU per tick; tick duration $tick_stats"
log "  syscr $((r1 - r0)), syscw $((w1 - w0)) (the scrapes above add one request a second)"

# ------------------------------------------------ 2. perf
log "window 2: perf record, ${WINDOW_S} s"
"$PERF" record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$AGENT_PID" -o "$WORKDIR/perf.data" \
    -- sleep "$WINDOW_S" >"$WORKDIR/perf-record.log" 2>&1 || log "perf record: $(tail -3 "$WORKDIR/perf-record.log")"
"$PERF" report -i "$WORKDIR/perf.data" --stdio --no-children --sort dso -g none --percent-limit 0.5 2>/dev/null |
    grep -v '^$' >"$WORKDIR/perf-dso.txt" || true
"$PERF" report -i "$WORKDIR/perf.data" --stdio --no-children --sort sym -g none --percent-limit 0.7 2>/dev/null |
    grep -v '^$' >"$WORKDIR/perf-self.txt" || true
"$PERF" report -i "$WORKDIR/perf.data" --stdio --children --sort sym -g none --percent-limit 1 2>/dev/null |
    grep -v '^$' >"$WORKDIR/perf-children.txt" || true

# ------------------------------------------------ 3. strace
log "window 3: strace -c -f, ${WINDOW_S} s"
k0=$(metric tally_ticks_total)
strace -c -f -q -p "$AGENT_PID" -o "$WORKDIR/strace.txt" &
TRACER_PID=$!
sleep "$WINDOW_S"
stop_pid "$TRACER_PID" INT
TRACER_PID=""
k1=$(metric tally_ticks_total)
sticks=$(awk -v a="$k0" -v b="$k1" 'BEGIN { printf "%d", b - a }')
kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited under strace"

# ------------------------------------------------ report
mkdir -p "$RESULTS_DIR"
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=$RESULTS_DIR/tick-cost-$stamp.txt
{
    echo "Tally tick cost at $N workloads, $stamp"
    echo "commit:   $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
    echo "host:     $(uname -sr), $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "cgroups:  $MODE (${ROOTS[*]})"
    echo "load:     $(cut -d' ' -f1-3 /proc/loadavg) at end (1/5/15 min); other builds and a VM shared the CPUs"
    echo "agent:    $BIN (built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)), tick ${TICK_MS} ms, no CRI, $running running workloads"
    [[ -z $EXTRA_CONFIG ]] || echo "config:   ${EXTRA_CONFIG//$'\n'/ }"
    echo
    echo "1. Untraced, ${WINDOW_S} s (one /metrics scrape a second to sample the tick gauge):"
    echo "   CPU (utime+stime) $cpu_pct % of a core = $cpu_per_tick_ms ms CPU per tick over $ticks ticks"
    echo "   tally_tick_duration_seconds: $tick_stats"
    echo "   read syscalls (syscr) $((r1 - r0)) = $(awk -v d=$((r1 - r0)) -v k="$ticks" -v n="$N" 'BEGIN { if (k > 0) printf "%.0f per tick, %.1f per workload per tick", d / k, d / k / n }')"
    echo "   write syscalls (syscw) $((w1 - w0))"
    echo
    echo "2. perf record -e cpu-clock -F 999 --call-graph dwarf, ${WINDOW_S} s, no scrapes"
    echo "   by shared object (self):"
    grep -v '^#' "$WORKDIR/perf-dso.txt" | sed 's/^/   /'
    echo "   by symbol, self time (>= 0.7 %):"
    grep -v '^#' "$WORKDIR/perf-self.txt" | sed 's/^/   /' | head -45
    echo "   the agent's own functions, inclusive time (children, >= 1 %):"
    grep -v '^#' "$WORKDIR/perf-children.txt" | grep 'tally_' | sed 's/^/   /' | head -40
    echo "   by symbol, inclusive time (children, >= 4 %):"
    grep -v '^#' "$WORKDIR/perf-children.txt" | awk '$1 + 0 >= 4' | sed 's/^/   /' | head -45
    echo
    echo "3. strace -c -f, ${WINDOW_S} s, $sticks ticks, no scrapes (times are inflated by tracing;"
    echo "   per_tick = calls / ticks, per_wl = calls / ticks / $N workloads)"
    awk -v k="$sticks" -v n="$N" '
        /^% time/ { printf "   %s %10s %8s\n", $0, "per_tick", "per_wl"; next }
        /^------/ { print "   " $0; next }
        NF >= 5 && $1 ~ /^[0-9.]+$/ {
            calls = $4
            printf "   %s %10.1f %8.2f\n", $0, (k > 0 ? calls / k : 0), (k > 0 ? calls / k / n : 0)
            next
        }
        { print "   " $0 }' "$WORKDIR/strace.txt"
} | tee "$out"
log "results written to $out"
