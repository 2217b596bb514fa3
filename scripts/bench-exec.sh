#!/usr/bin/env bash
# Execution overhead: print(1) in Python through NodeAgent.Execute vs spawning the interpreter,
# then a cluster exec through a plaintext coordinator vs one run with --tls.
# Usage: scripts/bench-exec.sh [--iterations N] [--no-cgroups] [--cluster-iterations N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent --bin coordinator
cargo bench --quiet -p kowalski-exo-tests --bench exec_overhead -- "$@"
