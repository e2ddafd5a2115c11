#!/usr/bin/env bash
# Regenerates client-c/include/ferry.h from client-c/src/ffi.rs with cbindgen.
# With --check, writes nothing and fails when the committed header is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
CBINDGEN_VERSION=0.29.4
if ! command -v cbindgen >/dev/null || [[ "$(cbindgen --version)" != "cbindgen $CBINDGEN_VERSION" ]]; then
    echo "installing cbindgen $CBINDGEN_VERSION" >&2
    cargo install --quiet --locked cbindgen --version "$CBINDGEN_VERSION"
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cbindgen --quiet --config client-c/cbindgen.toml --crate ferry-client --output "$out" client-c
if [[ "${1:-}" == "--check" ]]; then
    if ! diff -u client-c/include/ferry.h "$out"; then
        echo "client-c/include/ferry.h is stale: run scripts/gen-header.sh and commit it" >&2
        exit 1
    fi
    echo "ferry.h is up to date"
else
    cp "$out" client-c/include/ferry.h
    echo "wrote client-c/include/ferry.h"
fi
