#!/usr/bin/env bash
# Runs every test of the project: formatting, clippy, the Rust tests (unit,
# workspace integration against real ferryd processes, the fabric conformance
# suite on the soft backend), the same conformance suite on real kernel verbs
# (soft-RoCE in a qemu VM, scripts/rxe-vm.sh), the C ABI tests under
# AddressSanitizer and UndefinedBehaviorSanitizer, the Python tests (with
# PyTorch, which scripts/setup.sh installs), the ferry.h staleness check,
# the loom models of the rings, the monitoring files (promtool), the installer
# and the systemd unit (scripts/test-install.sh), a smoke run of the
# benchmarks (shm, fabric, log, gpu, the CPU training loop), and the GPU paths against a fake CUDA driver
# (tests/fakecuda). With FERRY_FUZZ_SECONDS set, also
# fuzzes the soft fabric's frame decoder for that long. Installs what it
# needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FERRY_SETUP_TORCH=1 source scripts/setup.sh
# The PyTorch tests must run here, not skip.
export FERRY_REQUIRE_TORCH=1

step() { echo; echo "=== $*"; }
WORK=$(mktemp -d /tmp/ferry-test.XXXXXX)
DAEMON_PID=
cleanup() {
    [[ -n "$DAEMON_PID" ]] && kill "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "build"
cargo build --workspace --quiet   # binaries and libferry.so

step "Rust tests"
cargo test --workspace --quiet

step "ferry.h is generated from the code"
scripts/gen-header.sh --check

step "C ABI tests (gcc -fsanitize=address,undefined)"
printf '[daemon]\nsocket = "%s/ferryd.sock"\n' "$WORK" > "$WORK/ferryd.toml"
target/debug/ferryd --config "$WORK/ferryd.toml" 2> "$WORK/ferryd.log" &
DAEMON_PID=$!
for _ in $(seq 100); do [[ -S "$WORK/ferryd.sock" ]] && break; sleep 0.05; done
gcc -std=c11 -Wall -Wextra -Werror -g -fsanitize=address,undefined -fno-omit-frame-pointer \
    -fno-sanitize-recover=undefined -I client-c/include client-c/tests/c/test_abi.c \
    -L target/debug -lferry -Wl,-rpath,"$ROOT/target/debug" -o "$WORK/test_abi"
FERRY_SOCKET="$WORK/ferryd.sock" ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 "$WORK/test_abi" ||
    { cat "$WORK/ferryd.log"; exit 1; }
# The demo's C programs must build warning-free too.
for prog in producer consumer; do
    gcc -std=c11 -O2 -Wall -Wextra -Werror -I client-c/include "client-c/examples/$prog.c" \
        -L target/debug -lferry -lz -Wl,-rpath,"$ROOT/target/debug" -o "$WORK/$prog"
done
kill "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=

step "GPU paths against the fake CUDA driver (tests/fakecuda: host memory, async copies)"
# Not a GPU: it proves ferryd's and libferry's GPU logic (pools, IPC
# hand-off, copy ordering, releases, redelivery), not the real driver.
FAKE="$ROOT/target/fakecuda"
mkdir -p "$FAKE"
gcc -std=gnu11 -Wall -Wextra -Werror -shared -fPIC -O1 -pthread -o "$FAKE/libcuda.so" tests/fakecuda/fakecuda.c
export FERRY_FAKE_CUDA=1
LD_LIBRARY_PATH="$FAKE" cargo test --quiet -p ferry-cuda --test gpu -- --ignored --test-threads=1
# Two fake GPUs: the two_gpus test (peer copies) runs too.
LD_LIBRARY_PATH="$FAKE" FAKECUDA_DEVICES=2 cargo test --quiet -p ferry-tests --test gpu_delivery -- --ignored
LD_LIBRARY_PATH="$FAKE" target/debug/ferryd --config "$WORK/ferryd.toml" 2> "$WORK/ferryd-gpu.log" &
DAEMON_PID=$!
for _ in $(seq 100); do [[ -S "$WORK/ferryd.sock" ]] && break; sleep 0.05; done
LD_LIBRARY_PATH="$FAKE" FERRY_SOCKET="$WORK/ferryd.sock" ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    "$WORK/test_abi" || { cat "$WORK/ferryd-gpu.log"; exit 1; }
kill "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=
(cd client-c/python && LD_LIBRARY_PATH="$FAKE" python3 -m pytest -q -p no:cacheprovider tests -k gpu)
unset FERRY_FAKE_CUDA

step "fabric conformance suite on kernel soft-RoCE (rdma_rxe in a qemu VM)"
IBV_TEST=$(scripts/test-binary.sh ferry-verbs ibv)
scripts/rxe-vm.sh "$IBV_TEST" --include-ignored

step "two ferryd daemons on kernel soft-RoCE (the rxe VM): the cross-host path on real verbs"
CLUSTER_TEST=$(scripts/test-binary.sh ferry-tests cluster)
FERRY_RXE_BINS="$ROOT/target/debug/ferryd" scripts/rxe-vm.sh "$CLUSTER_TEST" --ignored --exact \
    two_daemons_on_real_verbs_move_batches_both_ways

step "monitoring files: the Prometheus alert rules (promtool check and its unit tests), the Grafana dashboard's JSON"
promtool check rules deploy/prometheus/ferry-rules.yml
(cd deploy/prometheus && promtool test rules ferry-rules.test.yml)
python3 -m json.tool deploy/grafana/ferry.json > /dev/null

step "scripts/install.sh and the systemd unit (systemd-analyze verify; started as the unit would be; uninstall)"
scripts/test-install.sh

step "Python tests"
(cd client-c/python && python3 -m pytest -q -p no:cacheprovider tests)

step "loom models of the rings"
RUSTFLAGS="--cfg loom" cargo test --quiet -p ferry-shm --test loom_ring --release --target-dir target-loom
# Mutation check: each deliberately broken variant of the ring protocol
# (shm/src/ring.rs, mod mutant) must make a model fail, with loom's own
# finding (a causality violation on a descriptor, or a deadlock).
for mutant in seq_relaxed head_early wake_load check_first; do
    if FERRY_RING_MUTANT=$mutant RUSTFLAGS="--cfg loom" cargo test --quiet -p ferry-shm \
        --test loom_ring --release --target-dir target-loom > "$WORK/mutant.log" 2>&1; then
        echo "the loom models pass with the broken ring variant $mutant" >&2
        exit 1
    fi
    grep -qE "Causality violation|deadlock" "$WORK/mutant.log" || {
        cat "$WORK/mutant.log" >&2
        echo "ring variant $mutant failed, but not with a loom finding" >&2
        exit 1
    }
    echo "ring variant $mutant: caught"
done

step "benchmark smoke run (checks it runs, not speed)"
cargo build --release --quiet -p ferry-bench -p ferry-daemon -p ferry-cli -p ferry-client
target/release/ferry-bench shm --smoke > "$WORK/bench.jsonl"
target/release/ferry-bench fabric --smoke >> "$WORK/bench.jsonl"
# Two daemons as two hosts, against a TCP loop and a redis-server of its own.
target/release/ferry-bench stream --smoke >> "$WORK/bench.jsonl"
# A disk stream under each fsync policy, against a raw write loop and a
# redis-server with its append-only file.
target/release/ferry-bench log --smoke >> "$WORK/bench.jsonl"
# The hand-off and throughput while /metrics is scraped, against no scrape.
target/release/ferry-bench scrape --smoke >> "$WORK/bench.jsonl"
# On the fake CUDA driver: proves the GPU benchmark runs, measures nothing.
FAKECUDA_COPY_DELAY_US=0 LD_LIBRARY_PATH="$FAKE" target/release/ferry-bench gpu --smoke >> "$WORK/bench.jsonl"
python3 -m py_compile bench/train_loop.py
# The CPU training loop, Ferry against a DataLoader (PyTorch on the CPU).
python3 bench/cpu_loop.py --smoke 2>/dev/null | grep '^{' >> "$WORK/bench.jsonl"
python3 - "$WORK/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = {"bench", "case", "unit", "value", "baseline", "baseline_value"}
assert rows, "no benchmark output"
for r in rows:
    assert keys <= r.keys(), r
    assert r["value"] > 0 and r["baseline_value"] > 0, r
print(f"{len(rows)} benchmark results, all well-formed")
PY

if [[ -n "${FERRY_FUZZ_SECONDS:-}" ]]; then
    step "fuzzing the soft backend's frame decoder for ${FERRY_FUZZ_SECONDS} s"
    command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz --version 0.13.2
    # cargo-fuzz asks for nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets
    # the stable toolchain accept them (no other toolchain can be fetched).
    (cd verbs/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time="$FERRY_FUZZ_SECONDS")
fi

echo
echo "all tests passed"
