#!/usr/bin/env bash
# Budget enforcement benchmark: detection-to-throttle latency (p50/p99) and achieved-vs-target
# shares for CPU (30/70 at once), the freeze duty cycle (30 %) and egress (10 MB/s), in one run.
# Run as root on an otherwise idle machine: `sudo bench/enforcement.sh` (MEASURE=secs, CYCLES=n).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tally
exec python3 bench/enforcement.py "$@"
