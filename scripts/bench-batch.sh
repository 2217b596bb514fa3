#!/usr/bin/env bash
# coordinator batch throughput over 3 local agents: warm sessions beside cold runs.
# Usage: scripts/bench-batch.sh [--tasks N] [--cold-tasks N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench batch -- "$@"
