#!/usr/bin/env bash
# The GPU-gated tests, for a machine with a CUDA GPU. Those machines have no
# Rust toolchain, so this runs in two steps:
#
#   scripts/gpu-tests.sh build   # here: builds and gathers everything into target/gpu-carry
#   scripts/gpu-tests.sh run     # on the GPU machine, with target/gpu-carry carried along
#
# `run` executes the cuda crate's ignored tests (device buffers, a
# two-process CUDA IPC hand-off, dma-buf export, pinned staging with copies
# in flight) and the Python tests, which include the PyTorch IterableDataset
# test there (torch is installed on those machines). CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry

case "${1:-}" in
build)
    source scripts/setup.sh
    cargo build --release --quiet -p ferry-daemon -p ferry-client
    test_bin=$(scripts/test-binary.sh ferry-cuda gpu --release)
    rm -rf "$CARRY"
    mkdir -p "$CARRY"
    cp "$test_bin" "$CARRY/cuda-gpu-tests"
    cp target/release/ferryd target/release/ferry target/release/libferry.so "$CARRY/"
    # The device machines take at most 64 MiB along: drop debug info.
    strip --strip-debug "$CARRY"/*
    echo "built $CARRY ($(du -sh "$CARRY" | cut -f1)); carry it and run: scripts/gpu-tests.sh run"
    ;;
run)
    if [[ ! -e /dev/nvidiactl ]] && ! command -v nvidia-smi >/dev/null; then
        echo "no NVIDIA GPU here: run this on a GPU machine" >&2
        exit 2
    fi
    [[ -x "$CARRY/cuda-gpu-tests" ]] || { echo "$CARRY missing: run 'scripts/gpu-tests.sh build' first and carry it" >&2; exit 2; }
    status=0
    "$CARRY/cuda-gpu-tests" --include-ignored --test-threads=1 --nocapture || status=1
    FERRY_BIN_DIR="$PWD/$CARRY" FERRY_LIB="$PWD/$CARRY/libferry.so" \
        python3 -m pytest -q -p no:cacheprovider client-c/python/tests || status=1
    exit $status
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
