#!/usr/bin/env bash
# The coordinator with thousands of simulated agents (real registry streams and heartbeats):
# CPU, memory, placement latency and false suspicion, side by side for each size.
# Usage: scripts/bench-scale.sh [--agents 1000,5000,10000] [--runs N] [--quiet-secs N]
set -euo pipefail
cd "$(dirname "$0")/.."
# Every simulated node is a stream, and every node placed on a connection of the coordinator's.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench scale -- "$@"
