#!/usr/bin/env python3
"""Throughput cost of Tally's cgroup_skb programs, measured by switching them on and off many
times inside one loopback iperf3 stream.

Whole iperf3 runs drift by +-10 % on a shared 2-vCPU VM (other tenants), so runs seconds apart
cannot resolve a 1 % effect. Here the drift is cancelled at the scale of a second instead:
`bench_attach --toggle` keeps the programs loaded and attaches or detaches them on command (with
`bpf_stats` on while attached, as the agent holds it), and this script reads iperf3's 0.1 s
interval reports as they are printed. Blocks of BLOCK seconds alternate in the order
D A A D D A A D ... (D = detached, A = attached), so each D/A pair is adjacent and the pair order
alternates, which cancels a linear drift. The first interval after each switch is dropped (it
straddles the switch). For each pair, d = A/D - 1 over the mean interval throughput of the two
blocks; the report gives the median of d, a 95 % interval for it (bootstrap over pairs, fixed
seed), and the verdict against the 1 % target.

Usage (root): ebpf_toggle.py --bench-attach BIN [--cgroup DIR] [--seconds 120] [--block 1.0]
              [--port 5211] [--programs net_egress net_ingress] [--no-pin] [--no-stats]
Prints a report on stdout; exits 1 if something breaks, 2 with --strict when the target is missed.
"""

import argparse
import random
import re
import statistics
import subprocess
import sys
import time

INTERVAL = re.compile(
    r"^\[\s*\d+\]\s+([\d.]+)-([\d.]+)\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+(\w?)bits/sec"
)
UNIT = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def die(msg):
    print(f"ebpf_toggle: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-attach", required=True)
    ap.add_argument("--cgroup", default="/sys/fs/cgroup/unified")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--block", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=5211)
    ap.add_argument("--programs", nargs="+", default=["net_egress", "net_ingress"])
    ap.add_argument("--no-pin", action="store_true", help="do not pin client and server to CPUs")
    ap.add_argument("--target", type=float, default=1.0, help="largest acceptable loss, percent")
    ap.add_argument("--no-stats", action="store_true", help="leave bpf_stats off while attached")
    ap.add_argument("--raw", help="also write every interval (block, state, bits/s) to this file")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()

    interval = 0.1
    per_block = round(args.block / interval)
    if per_block < 3:
        die("--block must hold at least 3 intervals of 0.1 s")

    pin_server = [] if args.no_pin else ["-A", "1"]
    pin_client = [] if args.no_pin else ["-A", "0"]
    server = subprocess.Popen(
        ["iperf3", "-s", "-p", str(args.port), "-1", *pin_server],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    attach = subprocess.Popen(
        [
            args.bench_attach, "--toggle", "--cgroup", args.cgroup,
            *(["--no-stats"] if args.no_stats else []), *args.programs,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    client = None
    try:
        expect(attach, "ready")
        time.sleep(0.5)
        client = subprocess.Popen(
            [
                "iperf3", "-c", "127.0.0.1", "-p", str(args.port), "-t", str(args.seconds),
                "-i", str(interval), "--forceflush", "-f", "g", *pin_client,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        samples = run(client, attach, per_block, args.seconds)
        client.wait()
        if client.returncode != 0:
            die(f"iperf3 client exited with {client.returncode}")
    finally:
        if client and client.poll() is None:
            client.kill()
        if attach.poll() is None:
            attach.stdin.close()
        server.kill()
    stats = attach.stdout.read()
    if attach.wait() != 0:
        die(f"bench_attach exited with {attach.returncode}")
    if args.raw:
        with open(args.raw, "w") as f:
            f.writelines(f"{b}\t{s}\t{bps:.0f}\n" for b, s, bps in samples)
    report(args, samples, per_block, stats)


def expect(attach, word):
    line = attach.stdout.readline().strip()
    if line != word:
        die(f"bench_attach said {line!r}, expected {word!r}")


def run(client, attach, per_block, seconds):
    """Reads interval lines; switches state at block boundaries following D A A D. Returns
    [(block index, state, bits/s)] for the intervals that lie wholly within one state."""
    pattern = "DAAD"
    state = "D"
    skip = False
    samples = []
    seen = 0
    for line in client.stdout:
        m = INTERVAL.match(line)
        if not m:
            continue
        start, end = float(m.group(1)), float(m.group(2))
        if end - start > 0.5:  # the summary lines at the end
            continue
        bps = float(m.group(3)) * UNIT[m.group(4)]
        block = seen // per_block
        if not skip:
            samples.append((block, state, bps))
        skip = False
        seen += 1
        if seen % per_block == 0 and end < seconds - 0.05:
            wanted = pattern[(seen // per_block) % 4]
            if wanted != state:
                command = "attach" if wanted == "A" else "detach"
                attach.stdin.write(command + "\n")
                attach.stdin.flush()
                expect(attach, command + "ed")
                state = wanted
                skip = True
    return samples


def report(args, samples, per_block, stats):
    blocks = {}
    for block, state, bps in samples:
        blocks.setdefault(block, (state, []))[1].append(bps)
    means = {b: (s, statistics.fmean(v)) for b, (s, v) in blocks.items() if len(v) >= 2}
    # Pairs: blocks (0,1), (2,3), ...: D A, then A D, and so on.
    diffs = []
    for first in range(0, max(means, default=-1) + 1, 2):
        if first in means and first + 1 in means:
            (s1, m1), (s2, m2) = means[first], means[first + 1]
            if {s1, s2} != {"A", "D"}:
                continue
            att, det = (m1, m2) if s1 == "A" else (m2, m1)
            diffs.append(att / det - 1.0)
    if len(diffs) < 10:
        die(f"only {len(diffs)} complete pairs; raise --seconds")
    med = statistics.median(diffs)
    rng = random.Random(1)
    boot = sorted(
        statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000)
    )
    lo, hi = boot[49], boot[1949]
    det = [bps for _, s, bps in samples if s == "D"]
    att = [bps for _, s, bps in samples if s == "A"]
    loss = -med * 100
    worst = -lo * 100  # the largest loss the interval allows
    best = -hi * 100
    print(
        f"(c) programs switched on and off within one iperf3 stream: {', '.join(args.programs)}"
        f" (bpf_stats {'off' if args.no_stats else 'on'} while attached)"
    )
    print(
        f"    iperf3 -c 127.0.0.1 -t {args.seconds:g} -i 0.1"
        f"{'' if args.no_pin else ' -A 0 (server -A 1)'}; blocks of {args.block:g} s "
        f"({per_block} intervals), order D A A D ..., first interval after a switch dropped"
    )
    print(
        f"    intervals: {len(det)} detached, {len(att)} attached; mean "
        f"{statistics.fmean(det) / 1e9:.2f} Gbit/s detached, "
        f"{statistics.fmean(att) / 1e9:.2f} Gbit/s attached"
    )
    worse = sum(1 for d in diffs if d < 0)
    print(
        f"    pairs: {len(diffs)}; attached worse in {worse}; paired d = attached/detached - 1: "
        f"median {med * 100:+.2f}%, 95% interval {lo * 100:+.2f}% .. {hi * 100:+.2f}%, "
        f"quartiles {quantile(diffs, 0.25) * 100:+.2f}% / {quantile(diffs, 0.75) * 100:+.2f}%"
    )
    for line in stats.splitlines():
        if line.startswith("program="):
            print(f"    bpf_stats while attached: {line}")
    if worst <= args.target:
        verdict = "PASS"
        text = f"throughput loss {loss:.2f}% <= {args.target:g}% (95% interval up to {worst:.2f}%)"
    elif best > args.target:
        verdict = "MISS"
        text = f"throughput loss {loss:.2f}% > {args.target:g}% (95% interval from {best:.2f}%)"
    else:
        verdict = "NOISY"
        text = (
            f"throughput loss {loss:.2f}% vs {args.target:g}% (95% interval {best:.2f}% .. "
            f"{worst:.2f}%: cannot resolve; raise --seconds)"
        )
    print(f"VERDICT {verdict}  {text}")
    if args.strict and verdict != "PASS":
        sys.exit(2)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
