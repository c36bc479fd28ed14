#!/usr/bin/env bash
# Builds the Wasm player into web/player/ (served at /player/ by the server): cargo for
# wasm32, wasm-bindgen for the JS glue, wasm-opt (Debian binaryen) for size, and .gz copies that
# the server sends to browsers that accept gzip. Prints the bundle size the budget is about.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${PLAYER_OUT:-web/player}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -p onair-player --target wasm32-unknown-unknown --profile wasm-release --locked

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# wasm-opt runs on rustc's output, before wasm-bindgen: Debian's binaryen (108) mangles the
# externref table that wasm-bindgen adds (the page fails with "WebAssembly.Table.set(): Argument
# 1 is invalid"). rustc's wasm32 target enables these features by default; wasm-opt must be told.
wasm-opt -Oz --converge --strip-debug --strip-producers \
    --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-reference-types --enable-multivalue --enable-mutable-globals \
    "$TARGET_DIR/wasm32-unknown-unknown/wasm-release/onair_player.wasm" -o "$tmp/onair_player.wasm"
wasm-bindgen --target web --no-typescript --out-name onair --out-dir "$tmp" "$tmp/onair_player.wasm"

mkdir -p "$OUT"
for f in onair.js onair_bg.wasm; do
    cp "$tmp/$f" "$OUT/$f"
    gzip -9 -n -c "$OUT/$f" > "$OUT/$f.gz"
done
wasm_gz=$(stat -c %s "$OUT/onair_bg.wasm.gz")
js_gz=$(stat -c %s "$OUT/onair.js.gz")
echo "player: $OUT/onair_bg.wasm $(stat -c %s "$OUT/onair_bg.wasm") B ($wasm_gz gzip -9)," \
    "onair.js $(stat -c %s "$OUT/onair.js") B ($js_gz gzip -9); bundle $((wasm_gz + js_gz)) B gzipped"
# The budget (docs/benchmarks.md): wasm + JS glue under 50 KiB gzipped. mpegts.js is 62 KB.
BUDGET=51200
if [ $((wasm_gz + js_gz)) -gt $BUDGET ]; then
    echo "player: bundle $((wasm_gz + js_gz)) B gzipped is over the $BUDGET B budget" >&2
    exit 1
fi
