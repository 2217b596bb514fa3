#!/usr/bin/env bash
# The Recursive Language Model loop's own cost per iteration, model and code time removed.
# Usage: scripts/bench-rlm.sh [--turns N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench rlm -- "$@"
