#!/usr/bin/env bash
# Exact disk bytes under load: how many single rounds of the disk source's direct-I/O check come
# out exact while other cgroups keep the disk busy.
#
#   sudo bench/disk_exact.sh              # 50 rounds
#   sudo ROUNDS=100 LOADERS=4 bench/disk_exact.sh
#
# Each round runs the test `direct_io_is_charged_to_the_cgroup_doing_it` (ebpf/tests/disk.rs)
# once: it loads the disk programs (tp_btf), has `dd` in a fresh cgroup write 8 MiB with O_DIRECT
# and read them back, and passes only when that cgroup is charged exactly 8 MiB written and
# 8 MiB read, in one round, with no retry. Meanwhile LOADERS shell loops in a cgroup of their own
# write and read 64 MiB files with O_DIRECT (bs 1M, reads in 64 KiB) and write 32 MiB buffered
# files with fsync, on the same filesystem (/var/tmp). The report lists every round and the count
# of exact rounds, and is written to bench/results/disk-exact-<UTC time>.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
rounds="${ROUNDS:-50}"
loaders="${LOADERS:-2}"
[[ $(id -u) -eq 0 ]] || { echo "bench/disk_exact.sh: needs root (BPF, cgroups)" >&2; exit 1; }
unified=/sys/fs/cgroup/unified
[[ -e $unified/cgroup.controllers ]] || unified=/sys/fs/cgroup

test_bin="$(cd "$repo" && cargo test -p tally-ebpf --test disk --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "disk" and m.get("executable"):
        print(m["executable"])')"
[[ -x "$test_bin" ]] || { echo "bench/disk_exact.sh: could not build the disk test" >&2; exit 1; }

load_cg="$unified/tally-bench-disk-load-$$"
mkdir "$load_cg"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [[ -s "$load_cg/cgroup.procs" ]] || break
    sleep 0.5
  done
  rmdir "$load_cg" 2>/dev/null || true
  rm -f /var/tmp/tally-bench-disk-load-$$-*
}
trap cleanup EXIT
for i in $(seq 1 "$loaders"); do
  f="/var/tmp/tally-bench-disk-load-$$-$i"
  setsid sh -c "echo \$\$ > $load_cg/cgroup.procs && while true; do
      dd if=/dev/zero of=$f bs=1M count=64 oflag=direct status=none
      dd if=$f of=/dev/null bs=64k iflag=direct status=none
      dd if=/dev/zero of=$f-b bs=1M count=32 conv=fsync status=none
    done" >/dev/null 2>&1 &
  pids+=("$!")
done
sleep 2

mkdir -p "$here/results"
out="$here/results/disk-exact-$(date -u +%Y-%m-%dT%H%M%SZ).txt"
{
  echo "# bench/disk_exact.sh: $rounds rounds, $loaders loaders; $(uname -r); $(nproc) CPUs"
  echo "# disk: $(findmnt -no SOURCE --target /var/tmp) ($(findmnt -no FSTYPE --target /var/tmp)); commit $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet -- ebpf || echo ' + local changes')"
} | tee "$out"
exact=0
for r in $(seq 1 "$rounds"); do
  if log="$("$test_bin" --exact direct_io_is_charged_to_the_cgroup_doing_it 2>&1)"; then
    exact=$((exact + 1))
    echo "round $r: exact" | tee -a "$out"
  else
    why="$(grep -m1 -A1 'panicked at' <<<"$log" | tail -1)"
    echo "round $r: NOT exact: $why" | tee -a "$out"
  fi
done
echo "exact rounds: $exact/$rounds" | tee -a "$out"
