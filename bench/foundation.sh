#!/usr/bin/env bash
# Foundation benchmark for the Tally agent: /metrics latency, idle CPU and memory with 100 and
# 1,000 live Kubernetes-shaped workloads on this node's real cgroup hierarchies.
#
#   sudo bench/foundation.sh                      # builds target/release/tally first
#   sudo TALLY_BIN=/path/to/tally bench/foundation.sh
#
# Knobs (environment): TALLY_BIN (skip the build), BENCH_COUNTS ("100 1000"),
# BENCH_CPU_WINDOW_S (30), BENCH_WRK_DURATION (10s), BENCH_TICK_MS (1000),
# BENCH_RESULTS_DIR (bench/results), BENCH_STRICT=1 (exit 1 when a target is missed).
#
# Targets: /metrics p99 <= 1 ms at >= 1,000 series; agent CPU <= 0.5 % of one core with 100
# workloads at a 1 s tick; agent RSS <= 30 MiB with 1,000 workloads.
#
# Everything it creates (cgroups under a distinctive pod UID prefix, one `sleep` per workload,
# the agent) is removed again on exit, including on Ctrl-C.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

COUNTS=${BENCH_COUNTS:-"100 1000"}
CPU_WINDOW_S=${BENCH_CPU_WINDOW_S:-30}
WRK_DURATION=${BENCH_WRK_DURATION:-10s}
TICK_MS=${BENCH_TICK_MS:-1000}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$SCRIPT_DIR/results}
STRICT=${BENCH_STRICT:-0}
CGROUP_ROOT=/sys/fs/cgroup

# Every pod UID this run creates starts with this prefix plus a per-run id, so cleanup (and a
# human looking for leftovers) can tell our cgroups from anyone else's.
UID_PREFIX=bec4be4c
RUN_ID=$(printf '%04x' $((RANDOM % 65536)))
QOS_REL=kubepods.slice/kubepods-besteffort.slice

log() { printf '[foundation] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- state for cleanup

WORKDIR=""
AGENT_PID=""
SLEEP_PIDS=()
POD_RELS=()       # kubepods.slice/…/kubepods-besteffort-pod….slice, one per workload
CONTAINER_RELS=() # …/cri-containerd-<id>.scope, one per workload
CREATED_PARENTS=() # absolute dirs (QoS slice, kubepods.slice) that did not exist before us
ROOTS=()

stop_agent() {
    [[ -n $AGENT_PID ]] || return 0
    if kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            kill -0 "$AGENT_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
    fi
    wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
}

# rmdir_all, pick_port, wrk_pct_ms.
source "$SCRIPT_DIR/lib.sh"

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_agent
    if ((${#SLEEP_PIDS[@]} > 0)); then
        kill -KILL "${SLEEP_PIDS[@]}" 2>/dev/null
        wait "${SLEEP_PIDS[@]}" 2>/dev/null
    fi
    local root rel dirs
    for root in "${ROOTS[@]}"; do
        # Deepest first: every container scope, then every pod slice.
        dirs=()
        for rel in "${CONTAINER_RELS[@]}"; do dirs+=("$root/$rel"); done
        for rel in "${POD_RELS[@]}"; do dirs+=("$root/$rel"); done
        rmdir_all "${dirs[@]}"
    done
    # Parents we created, deepest first (they are stored kubepods.slice first, QoS slices after,
    # so iterate in reverse). Only if empty: someone else may have started using them.
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

# ---------------------------------------------------------------- prerequisites

[[ $EUID -eq 0 ]] || die "must run as root (creates cgroups and moves processes into them)"

if ! command -v wrk >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "wrk is required (https://github.com/wg/wrk)"
    log "installing wrk with apt-get"
    # Wait for a concurrent apt/dpkg rather than failing on its lock.
    apt_get() { apt-get -o DPkg::Lock::Timeout=300 -y -q "$@"; }
    apt_get install wrk >/dev/null 2>&1 ||
        { apt_get update >/dev/null && apt_get install wrk >/dev/null; } ||
        die "could not install wrk"
    command -v wrk >/dev/null 2>&1 || die "wrk still missing after apt-get install"
fi
command -v curl >/dev/null 2>&1 || die "curl is required"

if [[ -n ${TALLY_BIN:-} ]]; then
    BIN=$TALLY_BIN
else
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found (under sudo?): build as your user and pass TALLY_BIN=target/release/tally"
    log "building release agent (cargo build --release -p tally-agent)"
    (cd "$REPO_ROOT" && cargo build --release -p tally-agent)
    BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/tally
fi
[[ -x $BIN ]] || die "agent binary $BIN is not executable"

CLK_TCK=$(getconf CLK_TCK)

# The hierarchies the agent reads workloads from: cgroup2 plus, on hybrid nodes, the v1 cpuacct,
# memory and blkio controllers at the same relative path (as kubelet's systemd driver lays them
# out), so every workload costs the agent its real hybrid reads.
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
    # kubelet creates the pod in every v1 controller; blkio is where hybrid disk bytes come from.
    [[ -f $CGROUP_ROOT/blkio/cgroup.procs ]] && ROOTS+=("$CGROUP_ROOT/blkio")
fi

WORKDIR=$(mktemp -d /tmp/tally-bench.XXXXXX)

# ---------------------------------------------------------------- workloads

for root in "${ROOTS[@]}"; do
    for parent in "$root/kubepods.slice" "$root/$QOS_REL"; do
        [[ -d $parent ]] || CREATED_PARENTS+=("$parent")
    done
done
# kubepods.slice entries must be removed after the QoS slices: reorder so that, iterated in
# reverse by cleanup, every QoS slice comes before its kubepods.slice.
ordered=()
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] && ordered+=("$p"); done
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] || ordered+=("$p"); done
CREATED_PARENTS=("${ordered[@]}")

# Grows the set of live workloads to $1: a pod slice with one containerd container scope each,
# in every hierarchy, with one `sleep` moved into it.
grow_workloads() {
    local want=$1 i idx uid pod ctr pid root
    local -a dirs
    for ((i = ${#SLEEP_PIDS[@]}; i < want; i++)); do
        idx=$(printf '%012x' "$i")
        uid="${UID_PREFIX}_${RUN_ID}_4000_8000_${idx}"
        pod="$QOS_REL/kubepods-besteffort-pod${uid}.slice"
        ctr="$pod/cri-containerd-$(printf '%s%04x%052x' "$UID_PREFIX" $((16#$RUN_ID)) "$i").scope"
        dirs=()
        for root in "${ROOTS[@]}"; do dirs+=("$root/$ctr"); done
        POD_RELS+=("$pod")
        CONTAINER_RELS+=("$ctr")
        mkdir -p -- "${dirs[@]}"
        sleep 100000 </dev/null >/dev/null 2>&1 &
        pid=$!
        SLEEP_PIDS+=("$pid")
        for root in "${ROOTS[@]}"; do
            echo "$pid" >"$root/$ctr/cgroup.procs"
        done
    done
}

# ---------------------------------------------------------------- measurement helpers

URL_BASE=""

scrape() { curl -sf --max-time 5 "$URL_BASE/metrics"; }

metric_value() { # metric line prefix (name plus labels), from stdin; reads it all (pipefail)
    awk -v p="$1" 'index($0, p " ") == 1 && !done { print $2; done = 1 }'
}

cpu_ticks() { # utime + stime of the whole process, in clock ticks
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) } # after "pid (comm) ": field 3 (state) is index 0
    local -a f
    read -ra f <<<"$stat"
    echo $((f[11] + f[12]))
}

sched_ns() { # time on CPU of every thread, in ns (finer grained than clock ticks)
    local total=0 t v
    for t in /proc/"$1"/task/*/schedstat; do
        read -r v _ <"$t" 2>/dev/null || continue
        total=$((total + v))
    done
    echo "$total"
}

status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

now_s() { date +%s.%N; }

run_wrk() { # output file, extra wrk args…
    local out=$1
    shift
    wrk -t1 -c1 -d"$WRK_DURATION" --latency "$@" "$URL_BASE/metrics" >"$out" 2>&1 ||
        die "wrk failed: $(cat "$out")"
    if grep -q 'Non-2xx\|Socket errors' "$out"; then
        die "wrk saw errors: $(cat "$out")"
    fi
    log "  wrk $*: $(awk '/Requests\/sec/ { print $2 " req/s" }' "$out"), p50 $(wrk_pct_ms "$out" 50%) ms, p99 $(wrk_pct_ms "$out" 99%) ms"
}

agent_alive() { # agent log file
    kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited during the benchmark: $(tail -20 "$1")"
}

ROWS=()

bench_one() {
    local n=$1 port cfg logf i
    log "N=$n: creating workloads"
    grow_workloads "$n"

    port=$(pick_port)
    URL_BASE="http://127.0.0.1:$port"
    cfg=$WORKDIR/tally-$n.toml
    logf=$WORKDIR/agent-$n.log
    cat >"$cfg" <<EOF
[agent]
listen = "127.0.0.1:$port"
tick_interval_ms = $TICK_MS
[cri]
endpoints = []
EOF
    "$BIN" agent --config "$cfg" >"$logf" 2>&1 &
    AGENT_PID=$!
    log "N=$n: agent pid $AGENT_PID on $URL_BASE"

    local deadline=$((SECONDS + 60)) running=0
    until curl -sf --max-time 2 "$URL_BASE/readyz" >/dev/null 2>&1; do
        agent_alive "$logf"
        ((SECONDS < deadline)) || die "agent not ready after 60 s: $(cat "$logf")"
        sleep 0.2
    done
    while :; do
        running=$(scrape | metric_value 'tally_workloads{state="running"}' || true)
        running=${running%.*}
        ((${running:-0} >= n)) && break
        ((SECONDS < deadline)) || die "agent sees ${running:-0} running workloads, want >= $n"
        sleep 0.5
    done
    log "N=$n: agent ready, $running running workloads"
    # Let a couple of steady-state ticks pass before measuring.
    sleep $((2 * TICK_MS / 1000 + 1))

    # CPU over an idle window: ticks only, nobody scrapes.
    local t0 c0 s0 t1 c1 s1 cpu_pct sched_pct
    t0=$(now_s) c0=$(cpu_ticks "$AGENT_PID") s0=$(sched_ns "$AGENT_PID")
    sleep "$CPU_WINDOW_S"
    agent_alive "$logf"
    t1=$(now_s) c1=$(cpu_ticks "$AGENT_PID") s1=$(sched_ns "$AGENT_PID")
    cpu_pct=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" \
        'BEGIN { printf "%.3f", d / hz / (b - a) * 100 }')
    sched_pct=$(awk -v d=$((s1 - s0)) -v a="$t0" -v b="$t1" \
        'BEGIN { printf "%.3f", d / 1e9 / (b - a) * 100 }')
    log "N=$n: CPU ${cpu_pct}% of a core over ${CPU_WINDOW_S}s (utime+stime); ${sched_pct}% by schedstat"

    # Size of the exposition, plain and gzip.
    local body=$WORKDIR/metrics-$n.txt series bytes gz_bytes ours
    scrape >"$body"
    series=$(grep -cv '^#' "$body" || true)
    bytes=$(wc -c <"$body")
    # The agent compresses only once a scraper has asked for gzip: ask, wait for a tick, measure.
    curl -sf --max-time 5 -H 'Accept-Encoding: gzip' "$URL_BASE/metrics" >/dev/null || true
    sleep $(( (TICK_MS + 999) / 1000 + 1 ))
    gz_bytes=$(curl -sf --max-time 5 -H 'Accept-Encoding: gzip' "$URL_BASE/metrics" | wc -c)
    ours=$(grep -c "pod_uid=\"${UID_PREFIX}-${RUN_ID}-" "$body" || true)
    log "N=$n: $series series ($ours ours), $bytes bytes, $gz_bytes bytes gzip"
    grep '^tally_collector_errors_total\|^tally_probe_up' "$body" | sed 's/^/[foundation]   /' >&2 || true

    # Tick duration, averaged over a few scrapes one tick apart.
    local tick_ms sum=0 v samples=5
    for ((i = 0; i < samples; i++)); do
        v=$(scrape | metric_value tally_tick_duration_seconds)
        sum=$(awk -v s="$sum" -v v="$v" 'BEGIN { print s + v }')
        sleep "$(awk -v t="$TICK_MS" 'BEGIN { print t / 1000 }')"
    done
    tick_ms=$(awk -v s="$sum" -v n="$samples" 'BEGIN { printf "%.2f", s / n * 1000 }')
    log "N=$n: tick ${tick_ms} ms (mean of $samples)"

    # Latency: one connection, back to back, plain then gzip.
    local plain=$WORKDIR/wrk-$n.txt gz=$WORKDIR/wrk-gzip-$n.txt
    run_wrk "$plain"
    run_wrk "$gz" -H 'Accept-Encoding: gzip'

    # Memory: steady state after serving, and the lifetime peak.
    agent_alive "$logf"
    local rss hwm
    rss=$(awk -v k="$(status_kb "$AGENT_PID" VmRSS)" 'BEGIN { printf "%.1f", k / 1024 }')
    hwm=$(awk -v k="$(status_kb "$AGENT_PID" VmHWM)" 'BEGIN { printf "%.1f", k / 1024 }')
    log "N=$n: RSS $rss MiB, HWM $hwm MiB"

    stop_agent
    ROWS+=("$n $series $bytes $gz_bytes $(wrk_pct_ms "$plain" 50%) $(wrk_pct_ms "$plain" 99%) $(wrk_pct_ms "$gz" 50%) $(wrk_pct_ms "$gz" 99%) $cpu_pct $sched_pct $rss $hwm $tick_ms")
}

# ---------------------------------------------------------------- run

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for n in $COUNTS; do
    bench_one "$n"
done

# ---------------------------------------------------------------- report

verdicts=()
miss=0
check() { # description, ok (1/0)
    if (($2)); then verdicts+=("PASS  $1"); else
        verdicts+=("MISS  $1")
        miss=1
    fi
}
for row in "${ROWS[@]}"; do
    read -r n series _ _ _ p99 _ _ cpu _ rss _ _ <<<"$row"
    if ((series >= 1000)); then
        check "p99 ${p99} ms <= 1 ms at N=$n ($series series)" "$(awk -v v="$p99" 'BEGIN { print (v <= 1) }')"
    fi
    if ((n == 100)) && ((TICK_MS == 1000)); then
        check "CPU ${cpu}% <= 0.5% of a core at N=100, 1 s tick" "$(awk -v v="$cpu" 'BEGIN { print (v <= 0.5) }')"
    fi
    if ((n >= 1000)); then
        check "RSS ${rss} MiB <= 30 MiB at N=$n" "$(awk -v v="$rss" 'BEGIN { print (v <= 30) }')"
    fi
done

mkdir -p "$RESULTS_DIR"
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=$RESULTS_DIR/foundation-$stamp.txt
{
    echo "Tally foundation benchmark, $stamp"
    echo "commit:   $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
    echo "host:     $(uname -sr), $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "cgroups:  $MODE (${ROOTS[*]})"
    echo "load:     $LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (1/5/15 min)"
    echo "agent:    $BIN (built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)), tick ${TICK_MS} ms, no CRI"
    echo "method:   wrk -t1 -c1 -d$WRK_DURATION --latency /metrics (and with Accept-Encoding: gzip);"
    echo "          CPU = utime+stime over a ${CPU_WINDOW_S} s idle window (schedstat alongside);"
    echo "          RSS/HWM from /proc/<pid>/status after the latency runs; tick = mean of 5 scrapes"
    echo
    printf '%6s %7s %9s %8s %8s %8s %8s %8s %7s %7s %7s %7s %8s\n' \
        N series bytes gz_bytes p50_ms p99_ms p50gz_ms p99gz_ms cpu_% sched_% rss_MiB hwm_MiB tick_ms
    for row in "${ROWS[@]}"; do
        # shellcheck disable=SC2086 # split the row into its columns
        printf '%6s %7s %9s %8s %8s %8s %8s %8s %7s %7s %7s %7s %8s\n' $row
    done
    echo
    printf '%s\n' "${verdicts[@]}"
} | tee "$out"
log "results written to $out"

if ((STRICT)) && ((miss)); then
    exit 1
fi
