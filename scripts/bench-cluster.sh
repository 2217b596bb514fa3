#!/usr/bin/env bash
# Cluster benchmarks: failure detection, failover overhead, throughput against direct spawning.
# Usage: scripts/bench-cluster.sh [--rounds N] [--tasks N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench cluster -- "$@"
