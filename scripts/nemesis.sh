#!/usr/bin/env bash
# A long run of the fault-injection suite (tests/all/nemesis.rs): three nodes in network
# namespaces under a seeded nemesis (kill -9, SIGSTOP, partitions, one-way partitions,
# packet loss), list-append and bank workloads, histories checked at the end.
# Needs root, iproute2, iptables and nftables (as .ci/run installs them).
#
#   scripts/nemesis.sh [--minutes N] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=5
seed=""
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        *) echo "usage: scripts/nemesis.sh [--minutes N] [--seed S]" >&2; exit 2 ;;
    esac
done
./scripts/build-guests.sh
export NEMESIS_SECONDS=$((minutes * 60))
if [ -n "$seed" ]; then export NEMESIS_SEED="$seed"; fi
exec cargo test --release --test all nemesis:: -- --nocapture --test-threads 1
