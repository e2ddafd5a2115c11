#!/usr/bin/env bash
# The GPU-gated tests, for a machine with a CUDA GPU. Those machines have no
# Rust toolchain, so this runs in two steps:
#
#   scripts/gpu-tests.sh build   # here: builds and gathers everything into target/gpu-carry
#   scripts/gpu-tests.sh run     # on the GPU machine, with target/gpu-carry carried along
#
# `run` executes the cuda crate's ignored tests (device buffers, a
# two-process CUDA IPC hand-off, dma-buf export, pinned staging with copies
# in flight), the GPU delivery tests through a real ferryd (every byte
# checked in GPU memory, a killed GPU consumer redelivered, a forged
# release), the C ABI tests and the Python tests (PyTorch CUDA tensors and
# the IterableDataset there), the demo with its Python consumer on cuda:0,
# then the benchmarks: `ferry-bench gpu` and
# bench/train_loop.py. Results (JSON lines) go to $OUT when set, else
# target/gpu-results. CI never runs this (scripts/test.sh runs the same
# tests against the fake driver in tests/fakecuda instead).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry

case "${1:-}" in
build)
    source scripts/setup.sh
    cargo build --release --quiet -p ferry-daemon -p ferry-cli -p ferry-client -p ferry-bench -p ferry-tests
    rm -rf "$CARRY"
    mkdir -p "$CARRY"
    cp "$(scripts/test-binary.sh ferry-cuda gpu --release)" "$CARRY/cuda-gpu-tests"
    cp "$(scripts/test-binary.sh ferry-tests gpu_delivery --release)" "$CARRY/gpu-delivery-tests"
    cp target/release/ferryd target/release/ferry target/release/libferry.so \
        target/release/ferry-bench target/release/ferry-test-consumer "$CARRY/"
    # ferryd links the system hwloc (placement); the device machine may
    # not have it, so it travels along (LD_LIBRARY_PATH in `run`).
    for lib in libhwloc.so.15 libudev.so.1; do
        cp -L "$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')" "$CARRY/"
    done
    gcc -std=c11 -O1 -g -I client-c/include client-c/tests/c/test_abi.c \
        -L "$CARRY" -lferry -Wl,-rpath,'$ORIGIN' -o "$CARRY/test_abi"
    for prog in producer consumer; do
        gcc -std=c11 -O2 -I client-c/include "client-c/examples/$prog.c" \
            -L "$CARRY" -lferry -lz -Wl,-rpath,'$ORIGIN' -o "$CARRY/demo-$prog"
    done
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
    # hwloc (and udev) as built against, for machines without them; the
    # system's own come first when present.
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/lib/x86_64-linux-gnu:$PWD/$CARRY"
    results=${OUT:-target/gpu-results}
    mkdir -p "$results"
    nvidia-smi -L || true
    status=0
    "$CARRY/cuda-gpu-tests" --include-ignored --test-threads=1 --nocapture || status=1
    skip=()
    if (( $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') < 2 )); then skip=(--skip two_gpus); fi
    FERRY_BIN_DIR="$PWD/$CARRY" "$CARRY/gpu-delivery-tests" --include-ignored --test-threads=1 "${skip[@]}" || status=1
    dir=$(mktemp -d)
    printf '[daemon]\nsocket = "%s/ferryd.sock"\n' "$dir" > "$dir/ferryd.toml"
    "$CARRY/ferryd" --config "$dir/ferryd.toml" 2> "$dir/ferryd.log" &
    pid=$!
    for _ in $(seq 100); do [[ -S "$dir/ferryd.sock" ]] && break; sleep 0.05; done
    FERRY_SOCKET="$dir/ferryd.sock" "$CARRY/test_abi" || { status=1; cat "$dir/ferryd.log"; }
    kill $pid; wait $pid || true
    FERRY_BIN_DIR="$PWD/$CARRY" FERRY_LIB="$PWD/$CARRY/libferry.so" \
        python3 -m pytest -q -p no:cacheprovider client-c/python/tests || status=1
    python3 scripts/demo.py --bin-dir "$CARRY" --device cuda:0 --seconds 5 || status=1
    "$CARRY/ferry-bench" gpu --quick | tee "$results/bench-gpu.jsonl" || status=1
    FERRY_BIN_DIR="$PWD/$CARRY" python3 bench/train_loop.py ${FERRY_TRAIN_ARGS:-} \
        | tee "$results/train-loop.jsonl" || status=1
    exit $status
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
