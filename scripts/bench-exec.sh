#!/usr/bin/env bash
# Execution overhead: print(1) in Python through NodeAgent.Execute vs spawning the interpreter.
# Usage: scripts/bench-exec.sh [--iterations N] [--no-cgroups]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin node-agent
cargo bench --quiet -p kowalski-exo-tests --bench exec_overhead -- "$@"
