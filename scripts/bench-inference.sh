#!/usr/bin/env bash
# Inference benchmarks: first-token and per-token overhead of a streamed chat completion through
# the coordinator and an agent against the backend directly, and the pause a client sees when
# the answering agent is killed mid-answer.
# Usage: scripts/bench-inference.sh [--rounds N] [--tokens N] [--llama-rounds N] [--failover-rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench inference -- "$@"
