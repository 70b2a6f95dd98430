#!/usr/bin/env bash
# Peer benchmark: Tally next to netdata's cgroups plugin (Debian netdata 1.37.1) on the same N
# live Kubernetes-shaped workloads, each agent running alone, in alternating rounds.
#
#   sudo bench/peer.sh                      # builds target/release/tally first
#   sudo TALLY_BIN=/path/to/tally bench/peer.sh
#
# For each N and round it measures, for each agent: CPU (% of one core, the whole process tree,
# utime+stime+cutime+cstime from /proc/<pid>/stat, and the agent's own cgroup v2 cpu.stat beside
# it), RSS and PSS (summed over the tree), scrape latency p50/p99 (Tally: GET /metrics; netdata:
# GET /api/v1/allmetrics?format=prometheus; both plain and with Accept-Encoding: gzip), the time
# from start until all N containers have series, and the time to first series of a container
# created while the agent runs.
#
# Knobs (environment): TALLY_BIN (skip the build), NETDATA_BIN (/usr/sbin/netdata),
# BENCH_COUNTS ("100 1000"), BENCH_ROUNDS (3), BENCH_CPU_WINDOW_S (30), BENCH_WRK_DURATION (10s),
# BENCH_TICK_MS (1000), BENCH_NETDATA_DISCOVERY_S (10, netdata's shipped "check for new cgroups
# every"), BENCH_NETDATA_DB (dbengine, netdata's default), BENCH_NETDATA_NETWORK (0: point
# "script to get cgroup network interfaces" at /bin/true; 1: keep netdata's cgroup-network),
# BENCH_READY_TIMEOUT_S (900), BENCH_TTFS_TIMEOUT_S (120), BENCH_RESULTS_DIR (bench/results),
# BENCH_TALLY_CONFIG (TOML appended to Tally's configuration, e.g.
# $'[cgroupfs]\nread_interval_ms = 5000'), BENCH_AGENTS ("tally netdata"; "tally" alone for the
# 10,000-workload run, where netdata takes many minutes to discover everything).
#
# netdata and Kubernetes names: netdata names a kubepods container with cgroup-name.sh, which asks
# the Kubernetes API (or kubectl) for the pod list. There is no API server here, and without a
# name netdata falls back to a chart id made of the whole cgroup path, which is longer than
# RRD_ID_LENGTH_MAX, so it disables every container ("disabled because chart_id exceeds the limit
# (RRD_ID_LENGTH_MAX)"). This script therefore fills the pod-name cache that cgroup-name.sh reads
# before asking the API ($TMPDIR/netdata-cgroups-containers, plus the cluster-name and kube-system
# uid files), one line per container, so the shipped script names every container
# k8s_cntr_<namespace>_<pod>_<container> from the cache, without any API access.
#
# Everything it creates (cgroups under a distinctive pod UID prefix, one `sleep` per workload,
# the agents, netdata's private config/cache directories) is removed again on exit.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

COUNTS=${BENCH_COUNTS:-"100 1000"}
ROUNDS=${BENCH_ROUNDS:-3}
CPU_WINDOW_S=${BENCH_CPU_WINDOW_S:-30}
WRK_DURATION=${BENCH_WRK_DURATION:-10s}
TICK_MS=${BENCH_TICK_MS:-1000}
ND_DISCOVERY_S=${BENCH_NETDATA_DISCOVERY_S:-10}
ND_DB=${BENCH_NETDATA_DB:-dbengine}
ND_NETWORK=${BENCH_NETDATA_NETWORK:-0}
READY_TIMEOUT_S=${BENCH_READY_TIMEOUT_S:-900}
TTFS_TIMEOUT_S=${BENCH_TTFS_TIMEOUT_S:-120}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$SCRIPT_DIR/results}
EXTRA_CONFIG=${BENCH_TALLY_CONFIG:-}
AGENTS=${BENCH_AGENTS:-"tally netdata"}
NETDATA_BIN=${NETDATA_BIN:-/usr/sbin/netdata}
CGROUP_ROOT=/sys/fs/cgroup

# Pod UIDs (and container ids) must be hex for netdata's cgroup-name.sh to parse them; this
# prefix differs from foundation.sh's so the two never share cgroups.
UID_PREFIX=bec4be4d
RUN_ID=$(printf '%04x' $((RANDOM % 65536)))
QOS_REL=kubepods.slice/kubepods-besteffort.slice
NAMESPACE=bench

log() { printf '[peer] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- state for cleanup

WORKDIR=""
AGENT_PID=""
AGENT_CG="" # the agent's own cgroup v2 directory (CPU cross-check)
SLEEP_PIDS=()
POD_RELS=()
CONTAINER_RELS=()
CREATED_PARENTS=()
ROOTS=()
NEXT_IDX=0

# Every pid in the tree rooted at $1 (itself included), from ps.
tree_pids() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            keep[root] = 1; print root
            changed = 1
            while (changed) {
                changed = 0
                for (i in pids) {
                    p = pids[i]
                    if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; print p; changed = 1 }
                }
            }
        }'
}

stop_agent() {
    [[ -n $AGENT_PID ]] || return 0
    local -a tree
    mapfile -t tree < <(tree_pids "$AGENT_PID")
    if kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$AGENT_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
    fi
    wait "$AGENT_PID" 2>/dev/null || true
    # Helpers (netdata's spawn server) that outlived the main process.
    local p
    for p in "${tree[@]}"; do
        [[ $p == "$AGENT_PID" ]] && continue
        kill -KILL "$p" 2>/dev/null || true
    done
    AGENT_PID=""
    if [[ -n $AGENT_CG && -d $AGENT_CG ]]; then
        for ((i = 0; i < 50; i++)); do
            [[ -s $AGENT_CG/cgroup.procs ]] || break
            sleep 0.1
        done
    fi
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
        dirs=()
        for rel in "${CONTAINER_RELS[@]}"; do dirs+=("$root/$rel"); done
        for rel in "${POD_RELS[@]}"; do dirs+=("$root/$rel"); done
        rmdir_all "${dirs[@]}"
    done
    local i
    for ((i = ${#CREATED_PARENTS[@]} - 1; i >= 0; i--)); do
        rmdir -- "${CREATED_PARENTS[i]}" 2>/dev/null
    done
    [[ -n $AGENT_CG && -d $AGENT_CG ]] && rmdir_all "$AGENT_CG"
    [[ -n $WORKDIR ]] && rm -rf -- "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- prerequisites

[[ $EUID -eq 0 ]] || die "must run as root (creates cgroups and moves processes into them)"

apt_get() { apt-get -o DPkg::Lock::Timeout=300 -y -q "$@"; }
need_pkg() { # command, package
    command -v "$1" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$1 is required (package $2)"
    log "installing $2 with apt-get"
    apt_get install "$2" >/dev/null 2>&1 ||
        { apt_get update >/dev/null && apt_get install "$2" >/dev/null; } ||
        die "could not install $2"
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after apt-get install $2"
}
need_pkg wrk wrk
need_pkg curl curl
need_pkg jq jq # cgroup-name.sh gives up on Kubernetes names without jq
need_pkg python3 python3
[[ -x $NETDATA_BIN ]] || need_pkg netdata netdata
[[ -x $NETDATA_BIN ]] || NETDATA_BIN=$(command -v netdata)
ND_PLUGINS=/usr/lib/netdata/plugins.d
[[ -x $ND_PLUGINS/cgroup-name.sh ]] || die "no $ND_PLUGINS/cgroup-name.sh (netdata package layout changed?)"
ND_VERSION=$("$NETDATA_BIN" -v 2>&1 | head -1)

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

# Neither agent may share the machine with another copy of itself.
if pgrep -x netdata >/dev/null; then
    die "a netdata is already running (pid $(pgrep -x netdata | head -1)): stop it first"
fi

CLK_TCK=$(getconf CLK_TCK)

if [[ -f $CGROUP_ROOT/cgroup.controllers ]]; then
    MODE=v2
    CG2=$CGROUP_ROOT
    ROOTS=("$CGROUP_ROOT")
else
    [[ -f $CGROUP_ROOT/unified/cgroup.controllers ]] || die "no cgroup2 hierarchy under $CGROUP_ROOT"
    MODE=hybrid
    CG2=$CGROUP_ROOT/unified
    ROOTS=("$CG2")
    for c in cpuacct cpu,cpuacct cpuacct,cpu; do
        if [[ -f $CGROUP_ROOT/$c/cgroup.procs ]]; then
            ROOTS+=("$CGROUP_ROOT/$c")
            break
        fi
    done
    [[ -f $CGROUP_ROOT/memory/cgroup.procs ]] && ROOTS+=("$CGROUP_ROOT/memory")
    [[ -f $CGROUP_ROOT/blkio/cgroup.procs ]] && ROOTS+=("$CGROUP_ROOT/blkio")
fi

WORKDIR=$(mktemp -d /tmp/tally-peer.XXXXXX)
ND_TMP=$WORKDIR/netdata-tmp # netdata's $TMPDIR: where cgroup-name.sh keeps its pod cache
mkdir -p "$ND_TMP"
echo unknown >"$ND_TMP/netdata-cgroups-k8s-cluster-name"
echo null >"$ND_TMP/netdata-cgroups-kubesystem-uid"
: >"$ND_TMP/netdata-cgroups-containers"
RAW=$WORKDIR/raw.txt
: >"$RAW"

# The agent under test runs in a cgroup v2 directory of its own, so its CPU can be read a second
# way (cpu.stat usage_usec, which also counts children that exit). Outside kubepods.slice, so it
# is no workload to either agent's Kubernetes view.
AGENT_CG=$CG2/tally-peer-bench-$RUN_ID.scope
mkdir "$AGENT_CG"

# ---------------------------------------------------------------- workloads

for root in "${ROOTS[@]}"; do
    for parent in "$root/kubepods.slice" "$root/$QOS_REL"; do
        [[ -d $parent ]] || CREATED_PARENTS+=("$parent")
    done
done
ordered=()
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] && ordered+=("$p"); done
for p in "${CREATED_PARENTS[@]}"; do [[ $p == */kubepods.slice ]] || ordered+=("$p"); done
CREATED_PARENTS=("${ordered[@]}")

pod_uid_of() { printf '%s-%s-4000-8000-%012x' "$UID_PREFIX" "$RUN_ID" "$1"; }
ctr_id_of() { printf '%s%s%052x' "$UID_PREFIX" "$RUN_ID" "$1"; }
pod_name_of() { printf 'peer-%s-%d' "$RUN_ID" "$1"; }

# Adds workload number $1: a besteffort pod slice with one containerd scope in every hierarchy,
# and its line in netdata's pod cache (written first, as a kubelet's pod list would be). The
# workload's shell writes itself into its cgroups and then execs `sleep`, so the container has
# used some CPU: netdata 1.37 did not chart a container whose cpuacct.usage was still 0.
add_workload() {
    local i=$1 uid pod ctr root pid
    local -a dirs=()
    uid=$(pod_uid_of "$i")
    pod="$QOS_REL/kubepods-besteffort-pod${uid//-/_}.slice"
    ctr="$pod/cri-containerd-$(ctr_id_of "$i").scope"
    printf 'namespace="%s",pod_name="%s",pod_uid="%s",node_name="%s",container_name="sleep",container_id="%s"\n' \
        "$NAMESPACE" "$(pod_name_of "$i")" "$uid" "$(hostname)" "$(ctr_id_of "$i")" \
        >>"$ND_TMP/netdata-cgroups-containers"
    for root in "${ROOTS[@]}"; do dirs+=("$root/$ctr"); done
    POD_RELS+=("$pod")
    CONTAINER_RELS+=("$ctr")
    mkdir -p -- "${dirs[@]}"
    (
        for d in "${dirs[@]}"; do echo "$BASHPID" >"$d/cgroup.procs"; done
        exec sleep 100000
    ) </dev/null >/dev/null 2>&1 &
    pid=$!
    SLEEP_PIDS+=("$pid")
    LAST_PID=$pid
    LAST_DIRS=("${dirs[@]}")
}

grow_workloads() {
    while ((NEXT_IDX < $1)); do
        add_workload "$NEXT_IDX"
        NEXT_IDX=$((NEXT_IDX + 1))
    done
}

# Removes the newest workload (the one a time-to-first-series probe made).
drop_last_workload() {
    kill -KILL "$LAST_PID" 2>/dev/null || true
    wait "$LAST_PID" 2>/dev/null || true
    local d
    local -a pods=()
    for d in "${LAST_DIRS[@]}"; do pods+=("$(dirname "$d")"); done
    rmdir_all "${LAST_DIRS[@]}" "${pods[@]}"
    unset 'SLEEP_PIDS[-1]' 'POD_RELS[-1]' 'CONTAINER_RELS[-1]'
}

# ---------------------------------------------------------------- measurement helpers

URL="" # the scrape URL of the agent under test

now_s() { date +%s.%N; }

tree_cpu_ticks() { # utime+stime+cutime+cstime over the whole tree, in clock ticks
    local total=0 p stat
    local -a f
    for p in $(tree_pids "$1"); do
        stat=$(<"/proc/$p/stat") 2>/dev/null || continue
        stat=${stat##*) }
        read -ra f <<<"$stat"
        total=$((total + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$total"
}

cg_usage_usec() { awk '$1 == "usage_usec" { print $2 }' "$AGENT_CG/cpu.stat"; }

tree_mem_kb() { # "rss pss" summed over the tree, in KiB
    local rss=0 pss=0 p r s
    for p in $(tree_pids "$1"); do
        r=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        s=$(awk '$1 == "Pss:" { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        rss=$((rss + ${r:-0}))
        pss=$((pss + ${s:-0}))
    done
    echo "$rss $pss"
}

run_wrk() { # output file, extra wrk args…
    local out=$1
    shift
    wrk -t1 -c1 -d"$WRK_DURATION" --timeout 10s --latency "$@" "$URL" >"$out" 2>&1 ||
        die "wrk failed: $(cat "$out")"
    if grep -q 'Non-2xx\|Socket errors' "$out"; then
        die "wrk saw errors: $(cat "$out")"
    fi
    log "    wrk $*: $(awk '/Requests\/sec/ { print $2 " req/s" }' "$out"), p50 $(wrk_pct_ms "$out" 50%) ms, p99 $(wrk_pct_ms "$out" 99%) ms"
}

agent_alive() {
    kill -0 "$AGENT_PID" 2>/dev/null || die "$1 exited during the benchmark: $(tail -20 "$2")"
}

# How many of this run's containers the agent under test exposes (from a scrape on stdin).
count_ours() { # agent
    if [[ $1 == tally ]]; then
        grep -o "pod_uid=\"${UID_PREFIX}-${RUN_ID}-[^\"]*\"" | sort -u | wc -l
    else
        grep -o "chart=\"cgroup_k8s_cntr_${NAMESPACE}_peer-${RUN_ID}-[0-9]*_" | sort -u | wc -l
    fi
}

# Does a scrape on stdin carry workload $2's series?
has_workload() { # agent, index
    if [[ $1 == tally ]]; then
        grep -q "pod_uid=\"$(pod_uid_of "$2")\""
    else
        grep -q "chart=\"cgroup_k8s_cntr_${NAMESPACE}_$(pod_name_of "$2")_"
    fi
}

start_tally() { # n, port, logfile
    local cfg=$WORKDIR/tally-$1.toml
    cat >"$cfg" <<EOF
[agent]
listen = "127.0.0.1:$2"
tick_interval_ms = $TICK_MS
[cri]
endpoints = []
$EXTRA_CONFIG
EOF
    # shellcheck disable=SC2016 # $$ and $0 are the inner shell's
    bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$AGENT_CG" "$BIN" agent --config "$cfg" >"$3" 2>&1 &
    AGENT_PID=$!
    URL="http://127.0.0.1:$2/metrics"
}

start_netdata() { # n, port, logfile
    local d=$WORKDIR/netdata-run
    rm -rf -- "$d"
    mkdir -p "$d"/{etc,log,cache,lib,lock}
    local netscript=$ND_PLUGINS/cgroup-network
    ((ND_NETWORK)) || netscript=/bin/true
    cat >"$d/etc/netdata.conf" <<EOF
[global]
    run as user = root
    hostname = peer-bench
    update every = 1
[db]
    mode = $ND_DB
[directories]
    config = $d/etc
    stock config = /usr/lib/netdata/conf.d
    log = $d/log
    cache = $d/cache
    lib = $d/lib
    home = $d
    lock = $d/lock
    plugins = $ND_PLUGINS
    web = /usr/share/netdata/web
[logs]
    debug = /dev/null
    error = $d/log/error.log
    access = none
[health]
    enabled = no
[ml]
    enabled = no
[registry]
    enabled = no
[statsd]
    enabled = no
[web]
    bind to = 127.0.0.1:$2
[plugins]
    enable running new plugins = no
    check for new plugins every = 3600
    cgroups = yes
    proc = no
    diskspace = no
    tc = no
    idlejitter = no
    timex = no
    checks = no
    netdata monitoring = no
    statsd = no
    apps = no
    charts.d = no
    python.d = no
    go.d = no
    ebpf = no
    perf = no
    slabinfo = no
    fping = no
    ioping = no
    nfacct = no
    cups = no
[plugin:cgroups]
    update every = 1
    check for new cgroups every = $ND_DISCOVERY_S
    use unified cgroups = $([[ $MODE == v2 ]] && echo yes || echo no)
    max cgroups to allow = 100000
    script to get cgroup names = $ND_PLUGINS/cgroup-name.sh
    script to get cgroup network interfaces = $netscript
EOF
    # shellcheck disable=SC2016
    TMPDIR=$ND_TMP bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$AGENT_CG" \
        "$NETDATA_BIN" -D -c "$d/etc/netdata.conf" >"$3" 2>&1 &
    AGENT_PID=$!
    ND_ERRLOG=$d/log/error.log
    URL="http://127.0.0.1:$2/api/v1/allmetrics?format=prometheus"
}

scrape() { curl -sf --max-time 30 "$URL"; }

# One agent, one round: start it alone, wait for all N containers, measure, stop it.
bench_agent() { # agent, n, round
    local agent=$1 n=$2 round=$3 port logf t_start
    port=$(pick_port)
    logf=$WORKDIR/$agent-$n-$round.log
    t_start=$(now_s)
    "start_$agent" "$n" "$port" "$logf"
    log "N=$n round $round: $agent pid $AGENT_PID on $URL"

    # Ready: every container of this run has series.
    local deadline=$((SECONDS + READY_TIMEOUT_S)) ours=0 poll=0.2
    [[ $agent == netdata ]] && poll=1
    while :; do
        agent_alive "$agent" "$logf"
        ours=$(scrape 2>/dev/null | count_ours "$agent" || true)
        ((${ours:-0} >= n)) && break
        ((SECONDS < deadline)) || die "$agent shows ${ours:-0} of $n containers after ${READY_TIMEOUT_S} s"
        sleep "$poll"
    done
    local ready_s
    ready_s=$(awk -v a="$t_start" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }')
    log "  all $n containers have series after ${ready_s} s"
    # Let a few steady-state updates pass before measuring.
    sleep 5

    # CPU over an idle window: collection only, nobody scrapes.
    local t0 c0 u0 t1 c1 u1 cpu_pct cg_pct
    t0=$(now_s) c0=$(tree_cpu_ticks "$AGENT_PID") u0=$(cg_usage_usec)
    sleep "$CPU_WINDOW_S"
    agent_alive "$agent" "$logf"
    t1=$(now_s) c1=$(tree_cpu_ticks "$AGENT_PID") u1=$(cg_usage_usec)
    cpu_pct=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" \
        'BEGIN { printf "%.3f", d / hz / (b - a) * 100 }')
    cg_pct=$(awk -v d=$((u1 - u0)) -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", d / 1e6 / (b - a) * 100 }')
    log "  CPU ${cpu_pct}% of a core (process tree), ${cg_pct}% (cgroup) over ${CPU_WINDOW_S} s"

    # Exposition size, plain and gzip.
    local body=$WORKDIR/body-$agent-$n.txt series bytes gz_bytes ours_series
    scrape >"$body"
    series=$(grep -cv '^#' "$body" || true)
    bytes=$(wc -c <"$body")
    if [[ $agent == tally ]]; then
        ours_series=$(grep -c "pod_uid=\"${UID_PREFIX}-${RUN_ID}-" "$body" || true)
    else
        ours_series=$(grep -c "chart=\"cgroup_k8s_cntr_${NAMESPACE}_peer-${RUN_ID}-" "$body" || true)
    fi
    # Tally compresses once a scraper has asked for gzip: ask, wait for a tick, then measure.
    curl -sf --max-time 30 -H 'Accept-Encoding: gzip' "$URL" >/dev/null || true
    sleep $(((TICK_MS + 999) / 1000 + 1))
    gz_bytes=$(curl -sf --max-time 30 -H 'Accept-Encoding: gzip' "$URL" | wc -c)
    log "  $series series ($ours_series for our containers), $bytes bytes, $gz_bytes bytes gzip"

    # Scrape latency: one connection, back to back, plain then gzip.
    local plain=$WORKDIR/wrk-$agent-$n-$round.txt gz=$WORKDIR/wrk-gz-$agent-$n-$round.txt
    run_wrk "$plain"
    run_wrk "$gz" -H 'Accept-Encoding: gzip'

    agent_alive "$agent" "$logf"
    local mem rss pss
    mem=$(tree_mem_kb "$AGENT_PID")
    rss=$(awk -v k="${mem% *}" 'BEGIN { printf "%.1f", k / 1024 }')
    pss=$(awk -v k="${mem#* }" 'BEGIN { printf "%.1f", k / 1024 }')
    log "  RSS $rss MiB, PSS $pss MiB (process tree: $(tree_pids "$AGENT_PID" | wc -l) processes)"

    # Time to first series: a new container appears while the agent runs.
    local idx=$NEXT_IDX ttfs t_new seen=0
    t_new=$(now_s)
    add_workload "$idx"
    deadline=$((SECONDS + TTFS_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        # Into a file first: grep -q would close the pipe early and fail curl under pipefail.
        scrape >"$WORKDIR/poll.txt" 2>/dev/null || true
        if has_workload "$agent" "$idx" <"$WORKDIR/poll.txt"; then
            seen=1
            break
        fi
        sleep 0.2
    done
    if ((seen)); then
        ttfs=$(awk -v a="$t_new" -v b="$(now_s)" 'BEGIN { printf "%.2f", b - a }')
    else
        ttfs=NaN
    fi
    log "  new container's first series after ${ttfs} s"
    stop_agent
    drop_last_workload

    echo "$n $agent $round series=$series ours_series=$ours_series bytes=$bytes gz_bytes=$gz_bytes" \
        "cpu_pct=$cpu_pct cg_cpu_pct=$cg_pct rss_mib=$rss pss_mib=$pss" \
        "p50_ms=$(wrk_pct_ms "$plain" 50%) p99_ms=$(wrk_pct_ms "$plain" 99%)" \
        "p50gz_ms=$(wrk_pct_ms "$gz" 50%) p99gz_ms=$(wrk_pct_ms "$gz" 99%)" \
        "ttfs_s=$ttfs ready_s=$ready_s" >>"$RAW"
    if [[ $agent == netdata ]] && ((round == 1)); then
        # Show that the names came from the pod cache (the shipped script, no API).
        grep -m1 "cgroup-name.sh: INFO: cgroup .*peer-${RUN_ID}-" "$ND_ERRLOG" | cut -c1-400 \
            >"$WORKDIR/netdata-name-example.txt" || true
    fi
}

# ---------------------------------------------------------------- run

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for n in $COUNTS; do
    log "N=$n: creating workloads"
    grow_workloads "$n"
    for ((r = 1; r <= ROUNDS; r++)); do
        if ((r % 2)); then order="tally netdata"; else order="netdata tally"; fi
        for a in $order; do
            [[ " $AGENTS " == *" $a "* ]] || continue
            bench_agent "$a" "$n" "$r"
        done
    done
done

# ---------------------------------------------------------------- report

mkdir -p "$RESULTS_DIR"
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=$RESULTS_DIR/peer-$stamp.txt
{
    echo "Tally vs netdata cgroups plugin, peer benchmark, $stamp (started $STARTED)"
    echo "commit:   $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
    echo "host:     $(uname -sr), $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "cgroups:  $MODE (${ROOTS[*]})"
    echo "load:     $LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (1/5/15 min)"
    echo "tally:    $BIN (built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)), tick ${TICK_MS} ms, no CRI"
    [[ -z $EXTRA_CONFIG ]] || echo "          config: ${EXTRA_CONFIG//$'\n'/ }"
    echo "netdata:  $ND_VERSION, -D, own config dir; only the cgroups plugin (every other internal"
    echo "          and external plugin off, health/ML/registry/statsd off), update every 1 s,"
    echo "          db mode $ND_DB, check for new cgroups every ${ND_DISCOVERY_S} s, v1 controllers"
    echo "          (use unified cgroups = $([[ $MODE == v2 ]] && echo yes || echo no)), max cgroups to allow = 100000,"
    if ((ND_NETWORK)); then
        echo "          cgroup network interfaces: netdata's cgroup-network"
    else
        echo "          cgroup network interfaces: /bin/true (the sleeps share the host netns; the"
        echo "          shipped cgroup-network took ~1 s per container here to find nothing)"
    fi
    echo "names:    netdata names Kubernetes containers through cgroup-name.sh, which needs the"
    echo "          Kubernetes API; without it the fallback chart id (the cgroup path) exceeds"
    echo "          RRD_ID_LENGTH_MAX and netdata disables the container. This run pre-filled the"
    echo "          pod cache cgroup-name.sh reads first (\$TMPDIR/netdata-cgroups-containers), so"
    echo "          the shipped script named every container k8s_cntr_${NAMESPACE}_<pod>_sleep. Example:"
    sed 's/^/          /' "$WORKDIR/netdata-name-example.txt" 2>/dev/null || true
    echo "method:   rounds alternate the order (tally first in odd rounds); each agent runs alone."
    echo "          cpu = utime+stime+cutime+cstime summed over the agent's process tree over a"
    echo "          ${CPU_WINDOW_S} s idle window (no scrapes), % of one core; cg_cpu = the same window from"
    echo "          the agent's own cgroup v2 cpu.stat. rss/pss summed over the tree after the latency"
    echo "          runs. p50/p99: wrk -t1 -c1 -d$WRK_DURATION --latency (Tally /metrics, netdata"
    echo "          /api/v1/allmetrics?format=prometheus), plain and Accept-Encoding: gzip. ready = start"
    echo "          to all N containers exposed. ttfs = mkdir of a new container's cgroups to its first"
    echo "          series in a scrape (polled every 0.2 s plus the scrape time). series = all lines"
    echo "          of one scrape, ours = lines for this run's containers."
    echo "note:     background load from other builds and a VM shared the 2 CPUs (see load line);"
    echo "          CPU is CPU time consumed, which contention does not inflate much; latencies are"
    echo "          more sensitive to it."
    echo
    python3 - "$RAW" "$ROUNDS" <<'PY'
import sys, statistics
raw, rounds = sys.argv[1], sys.argv[2]
rows = {}
order_n, order_a = [], []
for line in open(raw):
    f = line.split()
    n, agent = int(f[0]), f[1]
    kv = dict(x.split("=", 1) for x in f[3:])
    rows.setdefault((n, agent), []).append(kv)
    if n not in order_n: order_n.append(n)
    if agent not in order_a: order_a.append(agent)
order_a = [a for a in ("tally", "netdata") if a in order_a]
metrics = [
    ("cpu_pct", "CPU % of a core (tree)", 3),
    ("cg_cpu_pct", "CPU % (cgroup cpu.stat)", 3),
    ("rss_mib", "RSS MiB (tree)", 1),
    ("pss_mib", "PSS MiB (tree)", 1),
    ("p50_ms", "scrape p50 ms", 3),
    ("p99_ms", "scrape p99 ms", 3),
    ("p50gz_ms", "scrape p50 ms, gzip", 3),
    ("p99gz_ms", "scrape p99 ms, gzip", 3),
    ("ttfs_s", "new container: 1st series s", 2),
    ("ready_s", "start to all N exposed s", 1),
    ("ours_series", "series, our containers", 0),
    ("series", "series, whole scrape", 0),
    ("bytes", "bytes per scrape", 0),
    ("gz_bytes", "bytes per scrape, gzip", 0),
]
def cell(vals, prec):
    vals = [float(v) for v in vals if v not in ("NaN", "")]
    if not vals: return "n/a"
    fmt = "%%.%df" % prec
    m = statistics.median(vals)
    if min(vals) == max(vals): return fmt % m
    return (fmt % m) + " (" + (fmt % min(vals)) + "-" + (fmt % max(vals)) + ")"
cols = [(n, a) for n in order_n for a in order_a]
heads = ["N=%d %s" % c for c in cols]
w0 = max(len(m[1]) for m in metrics)
cells = [[cell([r[k] for r in rows[c]], p) for c in cols] for k, _, p in metrics]
ws = [max(len(heads[j]), *(len(cells[i][j]) for i in range(len(metrics)))) for j in range(len(cols))]
print("median (min-max) over %s rounds" % rounds)
print(" ".join([" " * w0] + [h.rjust(w) for h, w in zip(heads, ws)]))
for i, (k, label, p) in enumerate(metrics):
    print(" ".join([label.ljust(w0)] + [cells[i][j].rjust(ws[j]) for j in range(len(cols))]))
print()
print("per round:")
keys = [m[0] for m in metrics]
print("%6s %-8s %5s " % ("N", "agent", "round") + " ".join(keys))
for line in open(raw):
    f = line.split()
    kv = dict(x.split("=", 1) for x in f[3:])
    print("%6s %-8s %5s " % (f[0], f[1], f[2]) + " ".join(kv.get(k, "?") for k in keys))
PY
} | tee "$out"
log "results written to $out"
