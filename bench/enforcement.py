#!/usr/bin/env python3
"""Budget enforcement benchmark: detection-to-throttle latency and achieved-vs-target shares.

Runs the built agent (TALLY_BIN, default target/release/tally) on real cgroups of this machine
(hybrid: cgroup2 at /sys/fs/cgroup/unified plus v1 cpu and cpuacct; pure v2 is used when that is
all there is) and measures, in one run:

  * CPU: two busy loops under 30 % and 70 % budgets (action `cpu`): shares over MEASURE seconds;
  * freeze: a busy loop under a 30 % budget held by the freeze duty cycle;
  * network: a loopback TCP sender under a 10 MB/s egress budget (action `network`);
  * latency: CYCLES enforce/release cycles of a CPU budget; each enforce event's
    `latency_ms` (from the start of the tick that detected it to the throttle in place) is
    taken from the agent's log.

Prints a table and writes it under bench/results/. Needs root.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TALLY_BIN", os.path.join(ROOT, "target", "release", "tally"))
MEASURE = float(os.environ.get("MEASURE", "10"))
CYCLES = int(os.environ.get("CYCLES", "20"))
PORT = 19000 + os.getpid() % 500
CG = "/sys/fs/cgroup"


def hierarchies():
    if os.path.exists(f"{CG}/unified/cgroup.controllers"):
        return [f"{CG}/unified", f"{CG}/cpu", f"{CG}/cpuacct"]
    return [CG]


ROOTS = hierarchies()


class Unit:
    def __init__(self, tag):
        self.name = f"tally-bench-{tag}-{os.getpid()}.service"
        self.dirs = [f"{r}/system.slice/{self.name}" for r in ROOTS]
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        self.procs = []

    def spawn(self, argv):
        dirs = self.dirs

        def enter():
            for d in dirs:
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write("0")

        p = subprocess.Popen(argv, preexec_fn=enter, stdout=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def burn(self):
        return self.spawn(["sh", "-c", "while :; do :; done"])

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def cpu_seconds(self):
        for d in self.dirs:
            if "/cpuacct/" in d:
                return int(open(f"{d}/cpuacct.usage").read()) / 1e9
        stat = open(f"{self.dirs[0]}/cpu.stat").read()
        return int(re.search(r"usage_usec (\d+)", stat).group(1)) / 1e6

    def remove(self):
        self.stop()
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def budget(name, unit, resource, limit, window, action):
    return (
        f'[[budget]]\nname = "{name}"\nresource = "{resource}"\nlimit = {limit}\n'
        f'window = "{window}"\naction = "{action}"\nselect.unit = "{unit}"\n'
    )


class Agent:
    def __init__(self, budgets, state):
        self.dir = tempfile.mkdtemp(prefix="tally-bench-")
        self.config = f"{self.dir}/tally.toml"
        with open(self.config, "w") as f:
            f.write(
                f'[agent]\nlisten = "127.0.0.1:{PORT}"\n[cri]\nendpoints = []\n'
                f'[gpu]\npod_resources_socket = ""\n[enforcement]\nstate_dir = "{state}"\n'
                + budgets
            )
        self.log = f"{self.dir}/agent.log"
        self.proc = subprocess.Popen(
            [BIN, "agent", "--config", self.config],
            stderr=open(self.log, "w"),
            env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
        )
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/readyz", timeout=1)
                return
            except Exception:
                time.sleep(0.1)
        raise SystemExit(f"agent not ready; log:\n{open(self.log).read()}")

    def metrics(self):
        return urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read().decode()

    def active(self, name):
        for line in self.metrics().splitlines():
            if line.startswith("tally_enforcement_active{") and f'budget="{name}"' in line:
                return line.endswith(" 1")
        return False

    def wait(self, pred, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            if pred():
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)

    def latencies(self):
        out = []
        for line in open(self.log):
            if "budget exceeded: enforcing" in line:
                m = re.search(r"latency_ms=([0-9.]+)", line)
                if m:
                    out.append(float(m.group(1)))
        return out


def shares(units, secs):
    before = [u.cpu_seconds() for u in units]
    t0 = time.time()
    time.sleep(secs)
    dt = time.time() - t0
    return [(u.cpu_seconds() - b) / dt for u, b in zip(units, before)]


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root (real cgroups)")
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} not built: cargo build --release --bin tally")
    state = tempfile.mkdtemp(prefix="tally-bench-state-")
    results = {}

    # CPU 30/70 at once.
    a, b = Unit("cpu30"), Unit("cpu70")
    agent = Agent(
        budget("thirty", a.name, "cpu_seconds", 1.2, "4s", "cpu")
        + budget("seventy", b.name, "cpu_seconds", 2.8, "4s", "cpu"),
        state,
    )
    a.burn()
    b.burn()
    agent.wait(lambda: agent.active("thirty") and agent.active("seventy"))
    time.sleep(1)
    results["cpu"] = shares([a, b], MEASURE)
    agent.stop()
    a.remove()
    b.remove()

    # Freeze 30 %.
    f = Unit("freeze")
    agent = Agent(budget("duty", f.name, "cpu_seconds", 1.2, "4s", "freeze"), state)
    f.burn()
    agent.wait(lambda: agent.active("duty"))
    time.sleep(4)  # the share is steered from the measured rate
    results["freeze"] = shares([f], MEASURE)[0]
    agent.stop()
    f.remove()

    # Network 10 MB/s.
    n = Unit("net")
    agent = Agent(budget("egress", n.name, "network_egress_bytes", 50e6, "5s", "network"), state)
    received = [0]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", PORT + 1))
    server.listen(1)

    def receive():
        c, _ = server.accept()
        while True:
            d = c.recv(1 << 16)
            if not d:
                return
            received[0] += len(d)

    threading.Thread(target=receive, daemon=True).start()
    sender = (
        "import socket,time\n"
        f"s=socket.create_connection(('127.0.0.1',{PORT + 1}))\n"
        "b=b'x'*65536\nend=time.time()+600\nwhile time.time()<end: s.sendall(b)\n"
    )
    n.spawn([sys.executable, "-c", sender])
    agent.wait(lambda: agent.active("egress"))
    time.sleep(2)
    r0, t0 = received[0], time.time()
    time.sleep(MEASURE)
    results["network_bytes_per_sec"] = (received[0] - r0) / (time.time() - t0)
    agent.stop()
    n.remove()
    server.close()

    # Latency over enforce/release cycles.
    c = Unit("cycle")
    agent = Agent(budget("cycle", c.name, "cpu_seconds", 0.6, "2s", "cpu"), state)
    for _ in range(CYCLES):
        c.burn()
        agent.wait(lambda: agent.active("cycle"), timeout=15)
        c.stop()
        agent.wait(lambda: not agent.active("cycle"), timeout=15)
    latencies = agent.latencies()
    agent.stop()
    c.remove()

    lines = [
        f"# tally enforcement benchmark, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"# {os.uname().release}, {os.cpu_count()} CPUs, measure {MEASURE}s, {CYCLES} cycles",
        f"cpu 30% budget: achieved {results['cpu'][0] * 100:.1f}% (target 30.0%)",
        f"cpu 70% budget: achieved {results['cpu'][1] * 100:.1f}% (target 70.0%)",
        f"freeze 30% budget: achieved {results['freeze'] * 100:.1f}% (target 30.0%)",
        f"network 10 MB/s budget: achieved {results['network_bytes_per_sec'] / 1e6:.2f} MB/s "
        f"({(results['network_bytes_per_sec'] / 10e6 - 1) * 100:+.1f}%)",
        f"detection-to-throttle latency over {len(latencies)} enforcements: "
        f"p50 {pct(latencies, 0.5):.2f} ms, p99 {pct(latencies, 0.99):.2f} ms, "
        f"max {max(latencies) if latencies else float('nan'):.2f} ms",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = os.path.join(ROOT, "bench", "results",
                       f"enforcement-{time.strftime('%Y-%m-%dT%H%M%SZ', time.gmtime())}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
        fh.write(json.dumps({"latencies_ms": latencies, **results}) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
