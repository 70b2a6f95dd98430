# Shell functions the benchmark scripts share; each script defines `log` and `die` first.

# rmdir each argument (in order), then retry the ones the kernel still holds busy (exiting
# tasks) for up to 10 s plus 1 s per 200 directories. Through xargs: 10,000 containers' paths
# are longer than one command line may be (ARG_MAX), and a single rmdir would not even start.
rmdir_all() {
    (($# > 0)) || return 0
    printf '%s\0' "$@" | xargs -0 rmdir -- 2>/dev/null || true
    local d left deadline=$((SECONDS + 10 + $# / 200))
    while ((SECONDS < deadline)); do
        left=()
        for d in "$@"; do
            [[ -d $d ]] && left+=("$d")
        done
        ((${#left[@]} > 0)) || return 0
        sleep 0.1
        printf '%s\0' "${left[@]}" | xargs -0 rmdir -- 2>/dev/null || true
    done
    for d in "${left[@]}"; do
        log "warning: could not remove $d"
    done
}

# A free TCP port on loopback.
pick_port() {
    local p i
    for ((i = 0; i < 100; i++)); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# The latency percentile `$2` (e.g. 99%) of the wrk --latency output in file `$1`, in ms.
wrk_pct_ms() {
    awk -v p="$2" '
        $1 == p && seen {
            v = $2; n = v + 0
            if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n *= 1; else if (v ~ /s$/) n *= 1000
            printf "%.3f\n", n; exit
        }
        /Latency Distribution/ { seen = 1 }' "$1"
}
