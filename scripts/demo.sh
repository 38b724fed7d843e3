#!/usr/bin/env bash
# The main demo: a three-node cluster of node processes on loopback, the bank example
# with three copies, transfers from eight clients, the primary's node killed with
# SIGKILL, the failover timeline, the checks (nothing acknowledged lost, money
# conserved), and the node back as a backup. Builds what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building the example functions to WebAssembly components"
./scripts/build-guests.sh

step "Building the node (release; the first build takes several minutes)"
cargo build --release --bin understudy 2>&1 | tail -n 1

exec ./target/release/understudy demo "$@"
