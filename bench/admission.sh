#!/usr/bin/env bash
# NRI admission benchmark: the CreateContainer round trip (p50/p99/max as the runtime sees it) at
# 1,000 workloads and 50 admission budgets. Root, on an otherwise idle machine:
# `sudo bench/admission.sh` (BENCH_WORKLOADS, BENCH_BUDGETS, BENCH_CALLS). The result goes to
# bench/results/admission-<UTC timestamp>.txt with the commit and load.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tally
cargo build --release --locked -p tally-tests --example nri_admission
out="bench/results/admission-$(date -u +%Y-%m-%dT%H%M%SZ).txt"
{
  echo "commit $(git rev-parse --short HEAD) kernel $(uname -r) cpus $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg)"
  TALLY_BIN=target/release/tally target/release/examples/nri_admission
} | tee "$out"
