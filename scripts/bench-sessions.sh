#!/usr/bin/env bash
# Session benchmarks: warm latency and throughput against cold runs, and llm_query_batched
# spread over 1, 2 and 3 agents.
# Usage: scripts/bench-sessions.sh [--rounds N] [--tasks N] [--cold-tasks N] [--prompts N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench sessions -- "$@"
