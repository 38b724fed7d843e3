#!/usr/bin/env bash
# Run every test: build the guest components, then the workspace's tests (release:
# one build of wasmtime serves the node, the tests and the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-guests.sh
cargo test --release --workspace "$@"
# The guest SDK's own tests run on the host target (its macros and helpers are plain Rust).
cargo test --locked --manifest-path guest-sdk/Cargo.toml --target-dir target/guest-sdk-host
