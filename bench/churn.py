#!/usr/bin/env python3
"""Churn benchmark: short-lived workloads created and removed at a steady rate, billed by Tally.

    sudo bench/churn.py [--rate 100] [--duration 600] [--tally target/release/tally]

Every 1/rate seconds it makes a unit cgroup `/system.slice/tally-churn.slice/c<N>.service` in the
cgroup v2 hierarchy, starts a bash there the way container runtimes start their first process
(asleep until it has been moved; at nice 15, the launcher at -10, so the busy loops do not slow
the rate on a small node), and lets it burn CPU for 50-500 ms of wall time, then send one
UDP datagram of 100-1,099 bytes to a local socket and exit; the cgroup is removed as soon as it is
empty. The agent runs alone with a 1 s tick and no CRI endpoint.

Ground truth:
  CPU      the parent slice's own cpu.stat usage_usec, which keeps its dead children's time;
  network  the datagrams' sizes plus 28 bytes of IPv4 and UDP headers each.
Tally's figures are the largest value each `c<N>.service` row showed in scrapes every 2 s (rows
leave /metrics after the grace period, so the last scrape alone would miss early ones).

It prints and writes to bench/results/churn-<UTC>.txt: containers made, billed CPU against the
slice's, billed UDP bytes against what was sent, rows seen, tally_workloads_missed_total, the
agent's RSS each minute (after a minute of warm-up it should not grow) and its CPU.
"""

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

UNIFIED_CANDIDATES = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
SLICE = "system.slice/tally-churn.slice"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unified_root():
    for root in UNIFIED_CANDIDATES:
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            return root
    sys.exit("churn.py: no cgroup v2 hierarchy")


def usage_usec(path):
    with open(os.path.join(path, "cpu.stat")) as f:
        for line in f:
            key, value = line.split()
            if key == "usage_usec":
                return int(value)
    raise RuntimeError(f"no usage_usec in {path}/cpu.stat")


def proc_stat(pid):
    """(CPU seconds, RSS MiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    return cpu, rss


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


SERIES = re.compile(r'^(tally_[a-z_]+)\{([^}]*)\} (\S+)$')


def rows(text):
    """{unit: {family: value}} for the benchmark's units, and the missed counts."""
    out, missed = {}, {}
    for line in text.splitlines():
        m = SERIES.match(line)
        if not m:
            continue
        family, labels, value = m.groups()
        if family == "tally_workloads_missed_total":
            missed[re.search(r'reason="([^"]*)"', labels).group(1)] = float(value)
            continue
        unit = re.search(r'unit="(c\d+\.service)"', labels)
        if not unit:
            continue
        if family == "tally_workload_network_transmit_bytes_total":
            family += "|" + re.search(r'scope="([^"]*)"', labels).group(1)
        out.setdefault(unit.group(1), {})[family] = float(value)
    return out, missed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=100.0, help="containers a second")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of churn")
    ap.add_argument("--tally", default=os.environ.get("TALLY_BIN", ""))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("churn.py: run as root")
    tally = args.tally
    if not tally:
        subprocess.run(["cargo", "build", "--release", "-p", "tally-agent"], cwd=REPO, check=True)
        tally = os.path.join(REPO, "target/release/tally")

    root = unified_root()
    slice_dir = os.path.join(root, SLICE)
    os.makedirs(slice_dir, exist_ok=True)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]

    work = tempfile.mkdtemp(prefix="tally-churn-")
    port = random.randrange(20000, 30000)
    config = os.path.join(work, "tally.toml")
    with open(config, "w") as f:
        f.write(f'[agent]\nlisten = "127.0.0.1:{port}"\ntick_interval_ms = 1000\n'
                f'[cri]\nendpoints = []\n[gpu]\npod_resources_socket = ""\n'
                f'[enforcement]\nstate_dir = "{work}/state"\n')
    log = open(os.path.join(work, "agent.log"), "w")
    agent = subprocess.Popen([tally, "agent", "--config", config], stdout=log, stderr=log)
    for _ in range(100):
        try:
            scrape(port)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"churn.py: agent not serving; log in {work}/agent.log")

    seen, missed = {}, {}
    stop = threading.Event()

    def scraper():
        nonlocal missed
        while not stop.wait(2.0):
            try:
                now, m = rows(scrape(port))
            except OSError:
                continue
            missed = m
            for unit, values in now.items():
                row = seen.setdefault(unit, {})
                for k, v in values.items():
                    row[k] = max(row.get(k, 0.0), v)

    threading.Thread(target=scraper, daemon=True).start()

    sent = {}
    children = []
    lock = threading.Lock()
    cpu0_slice = usage_usec(slice_dir)
    cpu0_agent, _ = proc_stat(agent.pid)
    rss = []
    made = 0
    began = time.monotonic()
    next_at = began
    next_rss = began + 60

    def reap():
        """Waits for finished children and removes their cgroups."""
        with lock:
            for child in list(children):
                proc, path = child
                if proc.poll() is None:
                    continue
                for _ in range(50):
                    try:
                        os.rmdir(path)
                        break
                    except OSError:
                        time.sleep(0.002)
                children.remove(child)

    os.nice(-10)
    rnd = random.Random(7)
    last_reap = began
    while time.monotonic() - began < args.duration:
        now = time.monotonic()
        if now - last_reap > 0.02:
            # Behind schedule or not, finished containers are removed at once.
            reap()
            last_reap = now
        if now >= next_rss:
            rss.append(proc_stat(agent.pid)[1])
            next_rss += 60
        if now < next_at:
            reap()
            time.sleep(max(0.0, min(next_at - time.monotonic(), 0.005)))
            continue
        next_at += 1.0 / args.rate
        name = f"c{made}.service"
        path = os.path.join(slice_dir, name)
        os.mkdir(path)
        life = rnd.uniform(0.05, 0.5)
        size = rnd.randrange(100, 1100)
        script = (f'read _; timeout {life:.3f} bash -c "while :; do :; done"; '
                  f'printf "%{size}s" > /dev/udp/127.0.0.1/{sink_port}')
        # The containers run at a lower priority than the launcher, so their busy loops on a
        # small node do not slow the rate they are made at.
        proc = subprocess.Popen(["nice", "-n", "15", "bash", "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Placed asleep in read(2), as runtimes place theirs.
        while True:
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{proc.pid}/syscall") as f:
                    in_read = f.read().startswith("0 ")
            except OSError:
                state, in_read = "", False
            if state == "S" and in_read:
                break
            time.sleep(0.0005)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        proc.stdin.write(b"\n")
        proc.stdin.close()
        sent[name] = size + 28
        made += 1
        with lock:
            children.append((proc, path))
    while children:
        reap()
        time.sleep(0.01)
    elapsed = time.monotonic() - began
    time.sleep(6)  # the grace of late counts: a few ticks
    stop.set()
    time.sleep(2.5)
    final, missed = rows(scrape(port))
    for unit, values in final.items():
        row = seen.setdefault(unit, {})
        for k, v in values.items():
            row[k] = max(row.get(k, 0.0), v)
    cpu_agent = proc_stat(agent.pid)[0] - cpu0_agent
    truth_cpu = (usage_usec(slice_dir) - cpu0_slice) / 1e6
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=20)

    billed_cpu = sum(r.get("tally_workload_cpu_seconds_total", 0.0) for r in seen.values())
    billed_udp = sum(r.get("tally_workload_network_transmit_bytes_total|node", 0.0)
                     for r in seen.values())
    sent_udp = sum(sent.values())
    exact_udp = sum(1 for n, b in sent.items()
                    if seen.get(n, {}).get("tally_workload_network_transmit_bytes_total|node") == b)
    with_cpu = sum(1 for n in sent if seen.get(n, {}).get("tally_workload_cpu_seconds_total", 0) > 0)
    lines = [
        f"churn: {made} containers in {elapsed:.1f} s ({made / elapsed:.1f}/s), "
        f"each 50-500 ms of busy loop, then one UDP datagram",
        f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()}, "
        f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load {open('/proc/loadavg').read().split()[:3]}",
        "",
        f"rows seen:                 {len([n for n in sent if n in seen])} of {made}",
        f"rows with CPU:             {with_cpu} of {made}",
        f"CPU billed:                {billed_cpu:.3f} s",
        f"CPU, the slice's cpu.stat: {truth_cpu:.3f} s",
        f"CPU billed / truth:        {100 * billed_cpu / truth_cpu:.2f} %",
        f"UDP bytes billed:          {billed_udp:.0f} of {sent_udp} sent "
        f"({exact_udp} of {made} rows exact)",
        f"tally_workloads_missed_total: {missed}",
        f"agent CPU:                 {100 * cpu_agent / elapsed:.2f} % of a core",
        f"agent RSS each minute, MiB: {[round(r, 1) for r in rss]}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    out = os.path.join(REPO, "bench/results", f"churn-{stamp}.txt")
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}")
    try:
        os.rmdir(slice_dir)
    except OSError:
        pass
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
