#!/usr/bin/env bash
# The Recursive Language Model loop's own cost per iteration, model and code time removed; with
# --reference, the loop side by side with the reference implementation (pip install rlms).
# Usage: scripts/bench-rlm.sh [--turns N] [--runs N]
#        scripts/bench-rlm.sh --reference [--chunks N] [--subcall-ms N] [--root-ms N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
bench=rlm
if [[ "${1:-}" == --reference ]]; then
    bench=rlm_reference
    shift
fi
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench "$bench" -- "$@"
