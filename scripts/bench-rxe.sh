#!/usr/bin/env bash
# Runs `ferry-bench fabric --provider ibv` inside the rxe VM: Ferry's ibv
# backend and its baseline, perftest (ib_write_bw, ib_write_lat) on the same
# rxe device, in the same VM boot. Prints both as JSON lines. The VM runs
# under TCG emulation, so absolute figures are functional speed only; the
# ratios are what to read. Extra arguments go to ferry-bench (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --quiet -p ferry-bench
exec scripts/rxe-vm.sh target/release/ferry-bench fabric --provider ibv --device rxe0 \
    --gid-index 1 --perftest-host 192.0.2.1 "$@"
