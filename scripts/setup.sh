#!/usr/bin/env bash
# Installs what onair's build and tests need on a fresh Debian machine. Idempotent: it only
# installs what is missing, so `make test` can run it every time.
set -euo pipefail

# ffmpeg: the real publisher and decoder in tests. procps: `kill`, used to send SIGTERM.
# gcc/libc6-dev: the linker rustc needs. make: the entry point itself. binaryen: wasm-opt for
# the player. chromium + chromium-driver: the real browser the player is tested in.
# iproute2: `ip netns`, veth and `tc … tbf`, for the tests' own shaped links (tests/src/netns.rs).
# g++: libFuzzer, which the fuzz targets link (scripts/fuzz.sh). python3: ffmpeg 9 comes from PyPI.
APT_PACKAGES=(ffmpeg procps gcc g++ libc6-dev make binaryen chromium chromium-driver iproute2 python3)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# node + npm: the benchmark's comparison peer, node-media-server, comes from npm (the load
# tool installs it into target/bench/nms). Machines of this kind ship Node.js 20; install
# Debian's only where none is present, so an existing Node.js is never replaced.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: installing nodejs npm"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# clippy and rustfmt are part of `make test`; wasm32 is checked for the protocol crate.
components=$(rustup component list --installed 2>/dev/null || true)
for c in clippy rustfmt; do
    grep -q "^$c" <<<"$components" || rustup component add "$c"
done
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

# wasm-bindgen-cli must be the exact version of the wasm-bindgen crate in Cargo.lock, or the
# glue it writes does not match the module. Not --locked: the registry mirror lags behind the
# CLI's own lock file.
WB_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WB_VERSION" ]; then
    echo "setup: installing wasm-bindgen-cli $WB_VERSION"
    cargo install wasm-bindgen-cli --version "=$WB_VERSION"
fi

# ffmpeg 9 for the Enhanced RTMP tests (HEVC, AV1, multitrack), which Debian's 5.1 cannot
# send: PyPI's imageio-ffmpeg wheel carries a static build (design.md).
if ! python3 -c "import imageio_ffmpeg, os, sys; sys.exit(not os.path.exists(imageio_ffmpeg.get_ffmpeg_exe()))" 2>/dev/null; then
    echo "setup: installing imageio-ffmpeg 0.8.1 (ffmpeg 9)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    python3 -m pip install -q imageio-ffmpeg==0.8.1 2>/dev/null \
        || python3 -m pip install -q --break-system-packages imageio-ffmpeg==0.8.1
fi

for tool in ffmpeg npm wasm-opt wasm-bindgen chromium chromedriver; do
    command -v "$tool" >/dev/null || { echo "setup: $tool still missing" >&2; exit 1; }
done
