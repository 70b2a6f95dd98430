#!/usr/bin/env python3
"""What finding and scraping inference servers costs the agent, side by side with it off.

    sudo bench/inference.py [--workloads 1000] [--servers 50] [--rounds 3] [--window 30]
                            [--interval 5] [--tally target/release/tally]

It makes N unit cgroups `/system.slice/tally-binf.slice/w<N>.service` in the cgroup v2
hierarchy, one `sleep` in each, and starts `--servers` fake inference servers
(target/release/fake-engine, vLLM's format, two models each) in the first of them, a fifth of
them bound to loopback inside a network namespace of their own (the rest on the node's). Then it
runs a fresh agent (1 s tick, no CRI, no eBPF) alone for each window, alternating
`[inference] enabled = true` (every `--interval` seconds) and `false`, `--rounds` times each,
and measures per window:

  CPU      the agent's utime + stime over the window (all its threads, the scrape threads
           that came and went included), as % of one core;
  tick     tally_tick_duration_seconds sampled every 0.5 s: mean, p99, max;
  round    tally_inference_round_seconds{phase} (discovery, scrape) at the window's end;
  servers  tally_inference_servers{up="1"}, which must be --servers.

It prints and writes bench/results/inference-<UTC>.txt.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

UNIFIED_CANDIDATES = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
SLICE = "system.slice/tally-binf.slice"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def unified_root():
    for root in UNIFIED_CANDIDATES:
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            return root
    sys.exit("inference.py: no cgroup v2 hierarchy")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def value(text, family, *needles):
    for line in text.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            if all(n in line for n in needles):
                return float(line.rsplit(" ", 1)[1])
    return None


def start_in(cgroup, argv, env=None):
    """Starts argv with its first instruction in `cgroup` (moved between fork and exec)."""
    procs = os.path.join(cgroup, "cgroup.procs")

    def move():
        with open(procs, "w") as f:
            f.write("0")

    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=move,
    )


def body(n):
    lines = []
    for model in ("chat", "embed"):
        lines.append(f'vllm:prompt_tokens_total{{engine="0",model_name="{model}"}} {1000 * n}')
        lines.append(f'vllm:generation_tokens_total{{engine="0",model_name="{model}"}} {100 * n}')
        lines.append(f'vllm:prompt_tokens_cached_total{{engine="0",model_name="{model}"}} {500 * n}')
        lines.append(
            f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{model}"}} {n}'
        )
        lines.append(f'vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} 0.5')
        lines.append(
            f'vllm:cache_config_info{{block_size="16",engine="0",model_name="{model}",num_gpu_blocks="1000"}} 1'
        )
    # A realistic body is longer than the mapped series: histograms the mapping skips.
    for b in range(60):
        lines.append(f'vllm:e2e_request_latency_seconds_bucket{{le="{b}",model_name="chat"}} {b}')
    return "\n".join(lines) + "\n"


def window(tally, config, secs, servers):
    work = tempfile.mkdtemp(prefix="tally-binf-")
    port = free_port()
    path = os.path.join(work, "tally.toml")
    with open(path, "w") as f:
        f.write(f'[agent]\nlisten = "127.0.0.1:{port}"\ntick_interval_ms = 1000\n' + config)
    log = open(os.path.join(work, "agent.log"), "w")
    agent = subprocess.Popen([tally, "agent", "--config", path], stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while True:
            try:
                text = scrape(port)
                if value(text, "tally_ticks_total") and value(text, "tally_ticks_total") >= 3:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit(f"inference.py: the agent never ticked; log in {work}")
            time.sleep(0.2)
        time.sleep(12)  # the servers found and scraped at least twice, caches warm
        cpu0, t0 = cpu_seconds(agent.pid), time.time()
        ticks = []
        while time.time() - t0 < secs:
            ticks.append(value(scrape(port), "tally_tick_duration_seconds"))
            time.sleep(0.5)
        cpu1, t1 = cpu_seconds(agent.pid), time.time()
        text = scrape(port)
        up = value(text, "tally_inference_servers", 'up="1"') or 0
        rounds = {
            p: value(text, "tally_inference_round_seconds", f'phase="{p}"')
            for p in ("discovery", "scrape")
        }
        ticks = sorted(t for t in ticks if t is not None)
        return {
            "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "tick_mean_ms": 1000 * statistics.mean(ticks),
            "tick_p99_ms": 1000 * ticks[min(len(ticks) - 1, int(0.99 * len(ticks)))],
            "tick_max_ms": 1000 * ticks[-1],
            "rounds": rounds,
            "up": up,
        }
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=1000)
    ap.add_argument("--servers", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--tally", default=os.path.join(REPO, "target/release/tally"))
    ap.add_argument("--fake-engine", default=os.path.join(REPO, "target/release/fake-engine"))
    args = ap.parse_args()
    for binary in (args.tally, args.fake_engine):
        if not os.access(binary, os.X_OK):
            sys.exit(
                f"inference.py: {binary} not built (cargo build --release --bin tally -p tally-agent; "
                "cargo build --release --bin fake-engine -p tally-tests)"
            )
    root = unified_root()
    slice_dir = os.path.join(root, SLICE)
    os.makedirs(slice_dir, exist_ok=True)
    children = []
    dirs = []
    work = tempfile.mkdtemp(prefix="tally-binf-bodies-")
    try:
        for i in range(args.workloads):
            d = os.path.join(slice_dir, f"w{i}.service")
            os.makedirs(d, exist_ok=True)
            dirs.append(d)
            children.append(start_in(d, ["sleep", "100000"]))
        for i in range(args.servers):
            path = os.path.join(work, f"{i}.prom")
            with open(path, "w") as f:
                f.write(body(i + 1))
            env = dict(os.environ, FAKE_ENGINE_BODY=path)
            port = str(free_port())
            argv = ["vllm", "serve", f"model-{i}", "--port", port]
            if i % 5 == 0:
                script = f"ip link set lo up && exec -a vllm {args.fake_engine} {' '.join(argv[1:])}"
                cmd = ["unshare", "--net", "bash", "-c", script]
            else:
                cmd = ["bash", "-c", f"exec -a vllm {args.fake_engine} {' '.join(argv[1:])}"]
            children.append(start_in(dirs[i], cmd, env))
        time.sleep(1)
        base = "[cri]\nendpoints = []\n[ebpf]\nenabled = false\n[gpu]\npod_resources_socket = \"\"\n"
        on = base + f"[inference]\nenabled = true\ninterval_secs = {args.interval}\n"
        off = base + "[inference]\nenabled = false\n"
        results = {"on": [], "off": []}
        for r in range(args.rounds):
            for name, config in (("on", on), ("off", off)):
                res = window(args.tally, config, args.window, args.servers)
                results[name].append(res)
                print(f"round {r + 1} inference {name}: {res}", flush=True)
        lines = [
            f"bench/inference.py: {args.workloads} workloads, {args.servers} servers "
            f"({(args.servers + 4) // 5} in their own network namespace), interval {args.interval} s, "
            f"{args.rounds} alternating rounds of {args.window:.0f} s, 1 s tick, agent alone",
            f"{'':14} {'CPU % core':>11} {'tick mean ms':>13} {'tick p99 ms':>12} {'tick max ms':>12} "
            f"{'discovery ms':>13} {'scrape ms':>10} {'servers up':>11}",
        ]
        for name in ("on", "off"):
            rs = results[name]
            med = lambda k: statistics.median(x[k] for x in rs)
            phase = lambda p: statistics.median(
                (x["rounds"][p] or 0) * 1000 for x in rs
            )
            lines.append(
                f"inference {name:4} {med('cpu_pct'):11.2f} {med('tick_mean_ms'):13.3f} "
                f"{med('tick_p99_ms'):12.3f} {med('tick_max_ms'):12.3f} "
                f"{phase('discovery') if name == 'on' else 0:13.2f} "
                f"{phase('scrape') if name == 'on' else 0:10.2f} {med('up'):11.0f}"
            )
        lines.append(
            "CPU per round: on "
            + ", ".join(f"{x['cpu_pct']:.2f}" for x in results["on"])
            + "; off "
            + ", ".join(f"{x['cpu_pct']:.2f}" for x in results["off"])
        )
        text = "\n".join(lines) + "\n"
        print(text)
        os.makedirs(os.path.join(REPO, "bench/results"), exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
        with open(os.path.join(REPO, f"bench/results/inference-{stamp}.txt"), "w") as f:
            f.write(text)
    finally:
        for c in children:
            c.kill()
        for c in children:
            c.wait()
        for d in dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.05)
        try:
            os.rmdir(slice_dir)
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
